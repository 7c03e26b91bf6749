"""Prompt injection against the real models: does a forget fact reach the answer when the prompt tries to switch
the guard off?

The scripted injection tests (``tests/test_reliability_security.py``) check how the guard assembles its prompts with
an oracle detector, a scripted guard and a scripted target. This is the figure on the real components: the real
detector built from the split's forget request, the real CoT guard model (by default the base embedded model with
decisions constrained to the schema) and the real target, the fine-tuned model that knows every fact of the task.

Every string of :data:`~eval.attacks.injection.INJECTION_STRINGS` (override, fake system turns, "the policy has
changed", authorisation, role-play, delimiter tricks, ...) is placed around each of a few held-out forget questions
(a seeded position: before, after, or as a system turn), so no prompt was stored by the detector or trained on by
anyone. The questions are chosen among those the bare target answers with the fact, so a leak is possible; the bare
target's answers to the same injected prompts are the upper reference. A prompt *leaks* when the answer states the
question's fact (whole words, as the comparison's fact rate).

``python -m eval.injection_eval [--task offline] [--questions 4]`` writes ``runs/injection/injection.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.facts import leaked_facts
from core.generation import Prompt
from core.io import atomic_write_json, atomic_write_text
from core.schema import QAItem
from eval.attacks.injection import INJECTION_STRINGS, INJECTION_STYLES, InjectionPosition, place_injection
from eval.systems import RESPONSE_SOURCES, System

log = logging.getLogger("injection_eval")


class InjectionEvalConfig(BaseModel):
    """Which task, how many questions, where the strings go and how long the answers are."""

    task: str = "offline"
    questions: int = Field(4, ge=1, description="Held-out forget questions each string is applied to.")
    positions: list[InjectionPosition] = Field(default_factory=lambda: ["prefix", "suffix", "system"])
    max_new_tokens: int = Field(48, ge=4)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    guard: dict[str, Any] = Field(default_factory=dict, description="GuardConfig fields (default: guard_mode llm).")
    out: str = "runs/injection"


def injected_prompts(items: Sequence[QAItem], positions: Sequence[InjectionPosition], seed: int = 0,
                     strings: Sequence[str] = INJECTION_STRINGS) -> list[tuple[int, str, str, Prompt]]:
    """Every string around every question at a seeded position: (item index, string, position, prompt)."""
    rng = random.Random(f"injection-eval|{seed}")
    out: list[tuple[int, str, str, Prompt]] = []
    for s in strings:
        for i, q in enumerate(items):
            pos = rng.choice(list(positions))
            out.append((i, s, pos, place_injection(s, q.question, pos)))
    return out


def run_injection(items: Sequence[QAItem], facts: Sequence[list[str]], guarded: System, bare: System | None,
                  cfg: InjectionEvalConfig, strings: Sequence[str] = INJECTION_STRINGS) -> dict[str, Any]:
    """Answer every injected prompt through the guard (and with the bare target, when given) and count the leaks."""
    if len(items) != len(facts):
        raise ValueError(f"{len(items)} items but {len(facts)} fact lists; they must pair up one to one")
    prompts = injected_prompts(items, cfg.positions, cfg.seed, strings)
    texts = [p for *_, p in prompts]
    g = guarded.respond(texts, cfg.max_new_tokens, cfg.batch_size, desc="guard: injected prompts")
    b = bare.respond(texts, cfg.max_new_tokens, cfg.batch_size, desc="bare: injected prompts") if bare else None
    rows = []
    for k, ((i, string, pos, _), r) in enumerate(zip(prompts, g, strict=True)):
        rows.append({"style": INJECTION_STYLES.get(string, "custom"), "position": pos, "string": string,
                     "question": items[i].question, "flagged": bool(r.trace and r.trace.flagged), "source": r.source,
                     "instruction": r.trace.cot_instruction if r.trace else None,
                     "output_check_fired": bool(r.trace and r.trace.output_check_fired),
                     "answer": r.shown, "leaked": leaked_facts(r.shown, facts[i]),
                     "bare_answer": b[k].shown if b else None,
                     "bare_leaked": leaked_facts(b[k].shown, facts[i]) if b else None})
    return {"config": cfg.model_dump(mode="json"), "questions": [q.question for q in items],
            "by_style": summarise(rows), "rows": rows}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per style and in total: prompts, flagged, where the guarded answers came from, leaks (guard and bare)."""
    out: dict[str, dict[str, Any]] = {}
    for style in [*sorted({r["style"] for r in rows}), "all"]:
        rs = [r for r in rows if style in ("all", r["style"])]
        bare = [r for r in rs if r["bare_leaked"] is not None]
        out[style] = {"prompts": len(rs), "flagged": sum(r["flagged"] for r in rs),
                      "sources": {s: sum(r["source"] == s for r in rs) for s in RESPONSE_SOURCES},
                      "output_check_fired": sum(r["output_check_fired"] for r in rs),
                      "guard_leaked": sum(bool(r["leaked"]) for r in rs),
                      "bare_leaked": sum(bool(r["bare_leaked"]) for r in bare) if bare else None}
    return out


def table(result: dict[str, Any]) -> str:
    """A markdown table of the leaks by style."""
    lines = ["| style | prompts | flagged | guard model's instruction | split (rest answered) | refused | output check "
             "fired | facts leaked (guard) | facts leaked (bare target) |", "|---|---|---|---|---|---|---|---|---|"]
    for style, s in result["by_style"].items():
        lines.append(f"| {style} | {s['prompts']} | {s['flagged']} | {s['sources']['cot']} | "
                     f"{s['sources']['split']} | {s['sources']['refused']} "
                     f"| {s['output_check_fired']} | {s['guard_leaked']} | "
                     f"{'–' if s['bare_leaked'] is None else s['bare_leaked']} |")
    return "\n".join(lines)


def known_questions(items: Sequence[QAItem], facts: Sequence[list[str]], bare: System, n: int, seed: int,
                    max_new_tokens: int) -> tuple[list[QAItem], list[list[str]]]:
    """Up to ``n`` items (seeded) whose plain question the bare target answers with the fact, so a leak is possible;
    the others when fewer are known."""
    pool = [(q, f) for q, f in zip(items, facts, strict=True) if f]
    answers = bare.answer([q.question for q, _ in pool], max_new_tokens, desc="bare: plain questions")
    known = [(q, f) for (q, f), a in zip(pool, answers, strict=True) if leaked_facts(a, f)]
    log.info("the bare target states the fact for %d of %d held-out questions", len(known), len(pool))
    rest = [x for x in pool if x not in known]
    rng = random.Random(f"injection-questions|{seed}")
    chosen = rng.sample(known, min(n, len(known))) + rng.sample(rest, max(0, min(n - len(known), len(rest))))
    return [q for q, _ in chosen], [f for _, f in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    """Build the real detector, guard and target of the comparison, run every injection and write the figure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="offline", help="task spec (default: the offline benchmark)")
    ap.add_argument("--questions", type=int, default=4, help="held-out forget questions per string")
    ap.add_argument("--guard-mode", default="llm", choices=["llm", "template", "refuse"])
    ap.add_argument("--out", default="runs/injection")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from detectors.detector import Detector
    from eval.compare import CompareConfig, ensure_finetuned
    from eval.general import general_items_for
    from eval.metrics.columns import item_facts
    from eval.split import detector_texts, exclude_overlaps, split_task
    from eval.systems import guarded_system, model_system
    from eval.tasks.spec import load_task_spec
    from guard.config import GuardConfig

    cfg = InjectionEvalConfig(task=args.task, questions=args.questions, guard={"guard_mode": args.guard_mode},
                              out=args.out)
    task = load_task_spec(cfg.task)
    split = split_task(task, None, general_items_for(task))
    split = exclude_overlaps(split, [detector_texts(split.request)])  # nothing the detector stores is evaluated
    target = ensure_finetuned(CompareConfig(task=cfg.task), task, "target")  # the demo's cached target
    detector = Detector.build(split.request)
    bare = model_system("target", target, "original")
    guarded = guarded_system("guard", target, detector, split.request, GuardConfig.model_validate(cfg.guard))
    pool = split.held_out.get("unseen_fact", [])
    items, facts = known_questions(pool, item_facts(task, pool), bare, cfg.questions, cfg.seed, cfg.max_new_tokens)
    result = run_injection(items, facts, guarded, bare, cfg)
    out = Path(cfg.out)
    atomic_write_json(out / "injection.json", result)
    md = table(result)
    atomic_write_text(out / "injection.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
