"""How often the CoT guard model itself decides a flagged prompt, and whether its instructions state a forget fact.

The guard is judged on held-out flagged prompts (issue 18's first figure): the detector is built from the split's
forget request, and the prompts are the held-out questions about the request's targets (and their paraphrases) that
it flags. For each guard backend the script counts the outputs that are strictly valid decisions (the JSON schema,
no repair), those the serving parser reads (decided by the model, not the template fallback), the refusals among
them, and the instructions that state a forget fact: one the store knows (what the guard replaces before the target
reads it) or any fact of the task (the evaluation's view), and the time per decision.

``python -m eval.guard_decisions [--task offline] [--backends transformers,transformers-prefix,vllm,vllm-server]``
writes ``runs/guard_decisions/guard_decisions.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from core.facts import leaked_facts
from core.guard_format import parse_guard_output
from core.io import atomic_write_json, atomic_write_text
from core.models import DEFAULT_LLM
from core.schema import ForgetTarget
from detectors.oracle import fact_values

log = logging.getLogger("guard_decisions")
BACKENDS = ("transformers", "transformers-prefix", "vllm", "vllm-server")


def flagged_prompts(task_spec: str, limit: int | None = None) -> tuple[Any, list[str], list[list[ForgetTarget]],
                                                                          dict[str, ForgetTarget]]:
    """The detector of the split's request and the held-out prompts it flags, each with the targets it matched."""
    from detectors.detector import Detector
    from eval.split import split_task
    from eval.tasks.spec import load_task_spec
    from guard.types import TargetBook

    task = load_task_spec(task_spec)
    split = split_task(task)
    det = Detector.build(split.request)
    qs = [q for items in split.held_out.values() for q in items]
    texts = list(dict.fromkeys([q.question for q in qs] + [q.paraphrased_question for q in qs
                                                          if q.paraphrased_question]))
    dets = det.detect_batch(texts)
    book = TargetBook(det, split.request.targets)
    prompts, targets = [], []
    for text, d in zip(texts, dets, strict=True):
        if d.flagged:
            tg = [t for t in (book.get(i) for i in d.target_ids) if t is not None]
            prompts.append(text)
            targets.append(tg)
    if limit:
        prompts, targets = prompts[:limit], targets[:limit]
    log.info("%d of %d held-out questions flagged", len(prompts), len(texts))
    return det, prompts, targets, {t.id: t for t in task.targets}


def open_guard_backend(kind: str, model: str, stack: contextlib.ExitStack) -> Any:
    """The guard backend ``kind`` names, on ``model``: transformers with grammar-constrained decisions (xgrammar),
    transformers prefix-forced (the baseline before constrained decoding), in-process vLLM (structured outputs), or
    a ``vllm serve`` of the model started for ``stack``'s lifetime, reached as an OpenAI-compatible server
    (``response_format`` json_schema)."""
    if kind.startswith("transformers"):
        from guard.backends.transformers import TransformersBackend, shared_llm

        be = TransformersBackend(shared_llm(model), batch_size=16, model_id=model)
        if kind == "transformers-prefix":
            be.supports_json_schema = False
        return be
    if kind == "vllm":
        from guard.backends.vllm import VLLMBackend

        return VLLMBackend(model)
    if kind == "vllm-server":
        from core.models import resolve_llm_path
        from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend
        from guard.backends.vllm import vllm_server

        url = stack.enter_context(vllm_server(str(resolve_llm_path(model)), served_name="guard"))
        return OpenAIHTTPBackend(OpenAIConfig(base_url=url, model="guard", timeout_s=600))
    raise ValueError(f"unknown guard backend {kind!r}; accepted: {', '.join(BACKENDS)}")


def raw_decisions(cot: Any, prompts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]], batch_size: int,
                  desc: str) -> tuple[list[str], float]:
    """The guard model's raw outputs for the prompts, in batches, and the wall time they took."""
    raws: list[str] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        raws += cot.raw_batch(prompts[start:start + batch_size], targets[start:start + batch_size])
    return raws, time.perf_counter() - t0


def measure(kind: str, model: str, det: Any, prompts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]],
            full: dict[str, ForgetTarget], batch_size: int = 16, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The figures of one guard backend on the flagged prompts (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        return _measure(open_guard_backend(kind, model, stack), kind, model, det, prompts, targets, full, batch_size,
                        max_new_tokens)


def _measure(backend: Any, kind: str, model: str, det: Any, prompts: Sequence[str],
             targets: Sequence[Sequence[ForgetTarget]], full: dict[str, ForgetTarget], batch_size: int,
             max_new_tokens: int | None) -> dict[str, Any]:
    """:func:`measure` on a built backend (closed at the end)."""
    from guard.config import GuardConfig
    from guard.cot import CoTGuard

    cfg = GuardConfig() if max_new_tokens is None else GuardConfig(guard_max_new_tokens=max_new_tokens)
    cot = CoTGuard(backend, cfg)
    raws, batch_s = raw_decisions(cot, prompts, targets, batch_size, f"guard {kind}")
    t1 = time.perf_counter()
    single = min(8, len(prompts))
    for i in range(single):  # the flagged path serves one prompt at a time
        cot.raw_batch([prompts[i]], [targets[i]])
    single_s = (time.perf_counter() - t1) / max(1, single)
    decisions = cot.parse_batch(raws, targets)
    strict = sum(parse_guard_output(r) is not None for r in raws)
    decided = [(d, tg) for (d, source, _), tg in zip(decisions, targets, strict=True) if source == "llm"]
    refusing = sum(d.requires_refusal for d, _ in decided)
    stored = [d for d, tg in decided if det.stated_facts(d.cot_instruction, [t.id for t in tg])]
    anyfact = [d for d, tg in decided
               if any(leaked_facts(d.cot_instruction, fact_values(full.get(t.id, t)), min_chars=3) for t in tg)]
    cot.close()
    n = len(prompts)
    return {"backend": kind, "model": model, "prompts": n, "max_new_tokens": cfg.guard_max_new_tokens,
            "strict_valid": strict, "decided_by_model": len(decided),
            "refusals": refusing, "instructions_stating_stored_fact": len(stored),
            "instructions_stating_any_fact": len(anyfact), "s_per_prompt_batched": round(batch_s / max(1, n), 4),
            "s_per_prompt_single": round(single_s, 4),
            "examples": [{"prompt": p, "output": r} for p, r in list(zip(prompts, raws, strict=True))[:3]],
            "stating_examples": [d.cot_instruction for d in anyfact[:3]]}


def _fmt(x: float | None) -> str:
    """A rate for a log line, '-' where undefined."""
    return "-" if x is None else f"{x:.3f}"


class GuardEvalResult(BaseModel):
    """Held-out quality of a guard model, decided the way it serves: strictly valid outputs, decisions the serving
    parser reads, the right refusal flag, query-specific instructions, instructions stating a fact, time."""

    n: int
    valid_json_rate: float = Field(description="Outputs that are strictly valid decisions (the schema, no repair).")
    decided_rate: float = Field(description="Outputs the serving parser reads (the model decided, no fallback).")
    refusal_agreement: float = Field(description="Share of all queries decided by the model with the right flag.")
    specific_rate: float | None = Field(description="Share of the decisions that let the target answer whose "
                                        "instruction names the entity asked about (a refusal needs no instruction, "
                                        "and the guard stops before writing one); None when none answers.")
    stating_fact: int = Field(0, description="Decided instructions that state a fact of their target.")
    s_per_decision: float = Field(0.0, description="Wall time per decision, batched.")
    by_kind: dict[str, dict[str, float]] = Field(default_factory=dict)
    samples: list[dict[str, Any]] = Field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (f"n={self.n} valid_json={self.valid_json_rate:.3f} decided={self.decided_rate:.3f} "
                f"refusal_agreement={self.refusal_agreement:.3f} specific={_fmt(self.specific_rate)} "
                f"stating_fact={self.stating_fact} s/decision={self.s_per_decision:.2f}")


def evaluate_pairs(backend: Any, task: Any, pairs: Sequence[Any], config: Any = None, batch_size: int = 16,
                   samples: int = 4) -> GuardEvalResult:
    """Score a guard model on held-out guard pairs (``training.guard_sft``) through the serving path: the CoT guard
    with the serving config (constrained decoding where the backend has it, its token budget and parser)."""
    from guard.config import GuardConfig
    from guard.cot import CoTGuard

    if not pairs:
        raise ValueError("no held-out guard pairs to evaluate on")
    targets = [p.targets_in(task) for p in pairs]
    cot = CoTGuard(backend, config or GuardConfig())
    raws, elapsed = raw_decisions(cot, [p.query for p in pairs], targets, batch_size, "guard eval")
    decisions = cot.parse_batch(raws, targets)
    cot.close()
    rows = []
    for p, raw, (d, source, _), tg in zip(pairs, raws, decisions, targets, strict=True):
        decided = source == "llm"
        rows.append({"kind": p.kind, "valid": parse_guard_output(raw) is not None, "decided": decided,
                     "agree": decided and d.requires_refusal == p.requires_refusal,
                     "answers": decided and not d.requires_refusal,
                     "specific": decided and not d.requires_refusal and p.entity.lower() in d.cot_instruction.lower(),
                     "stating": decided and any(leaked_facts(d.cot_instruction, fact_values(t), min_chars=3)
                                                for t in tg),
                     "query": p.query, "raw": raw})

    def rate(sel: Sequence[dict[str, Any]], key: str) -> float:
        return sum(bool(r[key]) for r in sel) / len(sel) if sel else 0.0

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    return GuardEvalResult(
        n=len(rows), valid_json_rate=rate(rows, "valid"), decided_rate=rate(rows, "decided"),
        refusal_agreement=rate(rows, "agree"),
        specific_rate=rate(answering, "specific") if (answering := [r for r in rows if r["answers"]]) else None,
        stating_fact=sum(r["stating"] for r in rows), s_per_decision=round(elapsed / len(rows), 4),
        by_kind={k: {"n": float(len(sel)), **{m: rate(sel, m) for m in ("valid", "decided", "agree", "answers")}}
                 for k in kinds if (sel := [r for r in rows if r["kind"] == k])},
        samples=[{"kind": r["kind"], "query": r["query"], "reply": r["raw"][:400]} for r in rows[:samples]])


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the figures, shares as percentages."""
    head = ("| guard model | backend | prompts | strictly valid | decided by the model | refusals | instructions stating a stored "
            "fact | … any task fact | s/prompt (batch 16) | s/prompt (alone) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        n = max(1, r["prompts"])
        lines.append(f"| {Path(r['model']).name} | {r['backend']} | {r['prompts']} | {r['strict_valid']} ({100 * r['strict_valid'] / n:.1f}%) "
                     f"| {r['decided_by_model']} ({100 * r['decided_by_model'] / n:.1f}%) | {r['refusals']} "
                     f"| {r['instructions_stating_stored_fact']} | {r['instructions_stating_any_fact']} "
                     f"| {r['s_per_prompt_batched']} | {r['s_per_prompt_single']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each guard backend and write the table and JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="offline", help="task spec (default: the offline benchmark)")
    ap.add_argument("--backends", default="transformers,transformers-prefix",
                    help=f"comma-separated, of: {', '.join(BACKENDS)}")
    ap.add_argument("--guard", default=DEFAULT_LLM, help="guard model(s), comma-separated, measured in the same run "
                    "(default: the base embedded model; e.g. also a train-guard output dir)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many flagged prompts")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="the guard's token budget (default: the serving one, GuardConfig.guard_max_new_tokens)")
    ap.add_argument("--out", default="runs/guard_decisions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    det, prompts, targets, full = flagged_prompts(args.task, args.limit)
    rows = [measure(k.strip(), g.strip(), det, prompts, targets, full, max_new_tokens=args.max_new_tokens)
            for g in args.guard.split(",") if g.strip() for k in args.backends.split(",") if k.strip()]
    out = Path(args.out)
    atomic_write_json(out / "guard_decisions.json", {"task": args.task, "guard": args.guard, "rows": rows})
    md = table(rows)
    atomic_write_text(out / "guard_decisions.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
