"""How often the CoT guard model itself decides a flagged prompt, and whether its instructions state a forget fact.

The guard is judged on held-out flagged prompts (issue 18's first figure): the detector is built from the split's
forget request, and the prompts are the held-out questions about the request's targets (and their paraphrases) that
it flags. For each guard backend the script counts the outputs that are strictly valid decisions (the JSON schema,
no repair), those the serving parser reads (decided by the model, not the template fallback), the refusals among
them, and the instructions that state a forget fact: one the store knows (what the guard replaces before the target
reads it) or any fact of the task (the evaluation's view), and the time per decision.

``python -m eval.guard_decisions [--task offline] [--backends transformers,transformers-prefix,vllm]``
writes ``runs/guard_decisions/guard_decisions.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core.facts import leaked_facts
from core.guard_format import parse_guard_output
from core.io import atomic_write_json, atomic_write_text
from core.models import DEFAULT_LLM
from core.schema import ForgetTarget
from detectors.oracle import fact_values

log = logging.getLogger("guard_decisions")
BACKENDS = ("transformers", "transformers-prefix", "vllm")


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


def make_backend(kind: str, model: str) -> Any:
    """The guard backend ``kind`` names, on ``model``: transformers with grammar-constrained decisions (xgrammar),
    transformers prefix-forced (the baseline before constrained decoding), or in-process vLLM (structured outputs)."""
    if kind.startswith("transformers"):
        from guard.backends.transformers import TransformersBackend, shared_llm

        be = TransformersBackend(shared_llm(model), batch_size=16, model_id=model)
        if kind == "transformers-prefix":
            be.supports_json_schema = False
        return be
    if kind == "vllm":
        from guard.backends.vllm import VLLMBackend

        return VLLMBackend(model)
    raise ValueError(f"unknown guard backend {kind!r}; accepted: {', '.join(BACKENDS)}")


def measure(kind: str, model: str, det: Any, prompts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]],
            full: dict[str, ForgetTarget], batch_size: int = 16, max_new_tokens: int = 64) -> dict[str, Any]:
    """The figures of one guard backend on the flagged prompts (see the module docstring)."""
    from guard.config import GuardConfig
    from guard.cot import CoTGuard

    cot = CoTGuard(make_backend(kind, model), GuardConfig(guard_max_new_tokens=max_new_tokens))
    raws: list[str] = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"guard {kind}", leave=False):
        raws += cot.raw_batch(prompts[start:start + batch_size], targets[start:start + batch_size])
    batch_s = time.perf_counter() - t0
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
    return {"backend": kind, "model": model, "prompts": n, "strict_valid": strict, "decided_by_model": len(decided),
            "refusals": refusing, "instructions_stating_stored_fact": len(stored),
            "instructions_stating_any_fact": len(anyfact), "s_per_prompt_batched": round(batch_s / max(1, n), 4),
            "s_per_prompt_single": round(single_s, 4),
            "examples": [{"prompt": p, "output": r} for p, r in list(zip(prompts, raws, strict=True))[:3]],
            "stating_examples": [d.cot_instruction for d in anyfact[:3]]}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the figures, shares as percentages."""
    head = ("| backend | prompts | strictly valid | decided by the model | refusals | instructions stating a stored "
            "fact | … any task fact | s/prompt (batch 16) | s/prompt (alone) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        n = max(1, r["prompts"])
        lines.append(f"| {r['backend']} | {r['prompts']} | {r['strict_valid']} ({100 * r['strict_valid'] / n:.1f}%) "
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
    ap.add_argument("--guard", default=DEFAULT_LLM, help="guard model (default: the base embedded model)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many flagged prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="the guard's token budget (serving default 64)")
    ap.add_argument("--out", default="runs/guard_decisions")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    det, prompts, targets, full = flagged_prompts(args.task, args.limit)
    rows = [measure(k.strip(), args.guard, det, prompts, targets, full, max_new_tokens=args.max_new_tokens)
            for k in args.backends.split(",") if k.strip()]
    out = Path(args.out)
    atomic_write_json(out / "guard_decisions.json", {"task": args.task, "guard": args.guard, "rows": rows})
    md = table(rows)
    atomic_write_text(out / "guard_decisions.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
