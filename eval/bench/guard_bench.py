"""Guard benchmark on the offline benchmark: does the guard stop forget answers and leave the rest as it was?

For every forget, retain, neighbour and benign question it compares the guarded answer with the bare
model's under greedy decoding, and measures the latency the guard adds: detector-only for unflagged
prompts, guard generation for flagged ones, against the bare model in the same run.

    python -m eval.bench.guard_bench                       # real detector, all questions
    python -m eval.bench.guard_bench --detector oracle --limit 40 --out runs/guard_bench.json
    python -m eval.bench.guard_bench --model <target dir> --guard-models smollm2-135m-instruct,<train-guard dir>

``--guard-models`` times the flagged path once per guard model (one prompt at a time, the bare target timed
alongside each), so an untuned and a trained guard are compared on the same prompts in the same run; the batched
rows use the first. The default (none) is what ``GuardedLLM`` picks.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from core.facts import leaked_facts
from core.schema import ForgetTarget, ForgetTask
from detectors.oracle import OracleDetector, fact_values
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from guard.api import GuardedLLM
from guard.backends import Backend, GenParams
from guard.backends.transformers import TransformersBackend, TransformersConfig
from guard.config import GuardConfig

log = logging.getLogger("guard_bench")


def build_detector(task: ForgetTask, kind: str) -> tuple[Any, str]:
    """The real detector (``detectors.detector.Detector.build``) or the oracle; returns (detector, name)."""
    if kind in {"real", "auto"}:
        try:
            from detectors.detector import Detector

            t0 = time.perf_counter()
            det = Detector.build(task)
            log.info("real detector built in %.1fs", time.perf_counter() - t0)
            return det, "real (detectors.detector.Detector.build)"
        except Exception as e:  # noqa: BLE001 - fall back, and say so in the report
            if kind == "real":
                raise
            log.warning("real detector unavailable (%s: %s); using the oracle", e.__class__.__name__, e)
    return OracleDetector(task), "oracle (target names + questions)"


def states_fact(answer: str, target: ForgetTarget) -> bool:
    """Whether an answer states one of the target's fact values (word-bounded, case-insensitive)."""
    return bool(leaked_facts(answer, fact_values(target), min_chars=1))


def _ms(xs: list[float]) -> dict[str, float]:
    """Mean / median / p90 in milliseconds."""
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    return {"n": len(s), "mean_ms": round(statistics.fmean(s), 1), "median_ms": round(statistics.median(s), 1),
            "p90_ms": round(s[min(len(s) - 1, int(0.9 * len(s)))], 1)}


def single_latency(bare: Backend, guarded: GuardedLLM, prompts: list[str], params: GenParams) -> dict[str, Any]:
    """One prompt at a time: bare vs guarded wall time, and the guard's own stages from the trace."""
    bare_t, guard_t, det_t, cot_t, chk_t, refused = [], [], [], [], [], []
    for q in prompts:
        t0 = time.perf_counter()
        bare.generate([{"role": "user", "content": q}], params)
        bare_t.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        res = guarded.generate(q, params)
        guard_t.append((time.perf_counter() - t0) * 1000)
        det_t.append(res.trace.timings_ms.get("detect", 0.0))
        cot_t.append(res.trace.timings_ms.get("guard", 0.0))
        chk_t.append(res.trace.timings_ms.get("output_check", 0.0))
        refused.append(bool(res.trace.requires_refusal))
    added = [g - b for g, b in zip(guard_t, bare_t, strict=True)]
    # the two flagged paths cost differently: a refusal skips the target, an answer waits for the instruction
    by_decision = {name: _ms([a for a, r in zip(added, refused, strict=True) if r == want])
                   for name, want in (("added_refused", True), ("added_answered", False))}
    return {"bare": _ms(bare_t), "guarded": _ms(guard_t), "added": _ms(added), **by_decision, "detect": _ms(det_t),
            "guard_generation": _ms(cot_t), "output_check": _ms(chk_t)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return the report."""
    task = generate_benchmark(BenchmarkConfig(seed=args.seed))
    det, det_name = build_detector(task, args.detector)
    target = TransformersBackend.from_config(TransformersConfig(model=args.model, batch_size=args.batch_size))
    gcfg = GuardConfig(guard_mode=args.guard_mode, max_new_tokens=args.max_new_tokens,
                       guard_max_new_tokens=args.guard_max_new_tokens, guard_timeout_s=600, detector_timeout_s=120)
    guard_models = [g.strip() for g in (args.guard_models or "").split(",") if g.strip()] or [None]
    guards = {g or "default": GuardedLLM(target, det, config=gcfg, targets=task,
                                         guard=None if g is None else TransformersBackend.from_config(
                                             TransformersConfig(model=g, batch_size=args.batch_size)))
              for g in guard_models}
    guarded = next(iter(guards.values()))
    if args.stop_baseline:  # the same guards generating whole decisions (the baseline of guard_stop_at_refusal)
        whole = gcfg.model_copy(update={"guard_stop_at_refusal": False})
        guards.update({f"{name} (whole decision)": GuardedLLM(target, det, config=whole, targets=task, guard=g.cot.backend)
                       for name, g in list(guards.items())})
    params = GenParams(max_new_tokens=args.max_new_tokens)

    lim = args.limit or None
    # Round-robin over targets so that a subset still covers every target (people and the hazard).
    per_target = [[(q.question, t) for q in t.qa] for t in task.targets]
    forget = [pairs[i] for i in range(max(map(len, per_target))) for pairs in per_target if i < len(pairs)][:lim]
    sets: dict[str, list[str]] = {
        "retain": [q.question for q in task.retain_qa][:lim],
        "neighbour": [q.question for q in task.neighbour_qa][:lim],
        "benign": list(task.benign_questions)[:lim],
    }
    all_q = [q for q, _ in forget] + [q for qs in sets.values() for q in qs]

    log.info("%d questions (%d forget); bare pass...", len(all_q), len(forget))
    t0 = time.perf_counter()
    bare_out = target.generate_batch([[{"role": "user", "content": q}] for q in all_q], params)
    bare_s = time.perf_counter() - t0
    bare = {q: o.text for q, o in zip(all_q, bare_out, strict=True)}
    log.info("bare pass %.1fs; guarded pass...", bare_s)
    t0 = time.perf_counter()
    res = guarded.generate_batch(all_q, params)
    guarded_s = time.perf_counter() - t0
    log.info("guarded pass %.1fs; single-prompt latency...", guarded_s)
    by_q = dict(zip(all_q, res, strict=True))

    rows: dict[str, dict[str, Any]] = {}
    f_flag = f_ref = f_free = f_bare_leak = 0
    examples = []
    for q, t in forget:
        r = by_q[q]
        f_flag += r.trace.flagged
        f_ref += r.finish_reason == "content_filter"
        leaked = states_fact(r.text, t)
        f_free += not leaked
        f_bare_leak += states_fact(bare[q], t)
        if len(examples) < 3:
            examples.append({"q": q, "bare": bare[q], "guarded": r.text, "source": r.trace.instruction_source})
    rows["forget"] = {"n": len(forget), "flagged": f_flag, "refused": f_ref, "refused_or_fact_free": sum(
        (by_q[q].finish_reason == "content_filter") or not states_fact(by_q[q].text, t) for q, t in forget),
        "fact_free": f_free, "bare_states_fact": f_bare_leak}
    for name, qs in sets.items():
        unflagged = [q for q in qs if not by_q[q].trace.flagged]
        same = sum(by_q[q].text == bare[q] for q in unflagged)
        diffs = [{"q": q, "bare": bare[q], "guarded": by_q[q].text} for q in unflagged if by_q[q].text != bare[q]][:3]
        rows[name] = {"n": len(qs), "flagged": len(qs) - len(unflagged), "unflagged": len(unflagged),
                      "identical_unflagged": same,
                      "output_blocked": sum(by_q[q].trace.output_check_fired for q in qs),
                      "differences": diffs}

    # Latency, one prompt at a time, bare vs guarded in this run.
    k = args.latency_prompts
    unflagged_pool = [q for q in sets["retain"] + sets["benign"] if not by_q[q].trace.flagged][:k]
    flagged_pool = [q for q, _ in forget if by_q[q].trace.flagged][:k]
    latency = {"unflagged": single_latency(target, guarded, unflagged_pool, params),
               "flagged": single_latency(target, guarded, flagged_pool, params)}
    by_guard = {name: single_latency(target, g, flagged_pool, params) for name, g in guards.items()}
    sources: dict[str, int] = {}
    for q, _ in forget:
        s = by_q[q].trace.instruction_source
        sources[s] = sources.get(s, 0) + 1
    return {"detector": det_name, "model": args.model, "guard_mode": args.guard_mode,
            "max_new_tokens": args.max_new_tokens, "limit": args.limit, "rows": rows,
            "forget_instruction_sources": sources,
            "batch_seconds": {"bare": round(bare_s, 2), "guarded": round(guarded_s, 2), "prompts": len(all_q)},
            "latency_single_prompt": latency, "flagged_latency_by_guard": by_guard, "examples_forget": examples}


def _guard_label(name: str) -> str:
    """A guard's name in the table: 'default', or the model directory's last part (with any ' (whole decision)')."""
    return name if name.startswith("default") else Path(name).name


def table(rep: dict[str, Any]) -> str:
    """A plain-text summary table."""
    r = rep["rows"]
    f = r["forget"]
    lines = [f"detector: {rep['detector']} | model: {rep['model']} | max_new_tokens: {rep['max_new_tokens']}"
             f" | limit: {rep['limit'] or 'all'}",
             "set        n    flagged  refused  refused|fact-free  identical(unflagged)",
             f"forget   {f['n']:4d}   {f['flagged']:6d}   {f['refused']:6d}   {f['refused_or_fact_free']:6d}"
             f"             -   (bare model states a fact in {f['bare_states_fact']})"]
    for name in ("retain", "neighbour", "benign"):
        x = r[name]
        lines.append(f"{name:<9}{x['n']:4d}   {x['flagged']:6d}        -        -          "
                     f"{x['identical_unflagged']}/{x['unflagged']}")
    lat = rep["latency_single_prompt"]
    for kind in ("unflagged", "flagged"):
        L = lat[kind]
        if L["bare"].get("n"):
            lines.append(f"latency {kind:<9}: bare {L['bare']['mean_ms']:.0f} ms, guarded {L['guarded']['mean_ms']:.0f} ms,"
                         f" added {L['added']['mean_ms']:+.0f} ms (median {L['added']['median_ms']:+.0f}); detect "
                         f"{L['detect']['mean_ms']:.1f} ms, guard gen {L['guard_generation'].get('mean_ms', 0):.0f} ms,"
                         f" output check {L['output_check'].get('mean_ms', 0):.1f} ms (n={L['bare']['n']})")
    by_guard = rep.get("flagged_latency_by_guard", {})
    for name, L in by_guard.items():
        if L["bare"].get("n"):
            split = "; ".join(f"{k.split('_')[1]} n={L[k]['n']}: {L[k]['mean_ms']:+.0f} ms" for k in
                              ("added_refused", "added_answered") if L.get(k, {}).get("n"))
            lines.append(f"flagged, guard {_guard_label(name)}: added {L['added']['mean_ms']:+.0f} ms mean "
                         f"(median {L['added']['median_ms']:+.0f}, p90 {L['added']['p90_ms']:+.0f}; {split}; bare "
                         f"{L['bare']['mean_ms']:.0f} ms; guard gen {L['guard_generation'].get('mean_ms', 0):.0f} ms)")
    for name, L in by_guard.items():
        base = by_guard.get(f"{name} (whole decision)")
        if base and L["guarded"].get("n") and base["guarded"].get("n"):
            lines.append(f"stop at refusal, guard {_guard_label(name)}: guarded "
                         f"{L['guarded']['mean_ms']:.0f} ms vs {base['guarded']['mean_ms']:.0f} ms whole "
                         f"(ratio {L['guarded']['mean_ms'] / base['guarded']['mean_ms']:.2f}); guard gen "
                         f"{L['guard_generation'].get('mean_ms', 0):.0f} vs {base['guard_generation'].get('mean_ms', 0):.0f} ms")
    b = rep["batch_seconds"]
    lines.append(f"batched run of {b['prompts']} prompts: bare {b['bare']} s, guarded {b['guarded']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: print the table, then the JSON report (also written to --out)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", choices=["auto", "real", "oracle"], default="auto")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--guard-mode", choices=["llm", "template", "refuse"], default="llm")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--guard-max-new-tokens", type=int, default=GuardConfig().guard_max_new_tokens,
                   help="the guard's token budget (default: the serving one)")
    p.add_argument("--guard-models", default="", help="comma-separated guard model specs whose flagged-path latency "
                   "is timed in this run (default: GuardedLLM's choice)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="At most this many questions per set (0: all).")
    p.add_argument("--latency-prompts", type=int, default=6)
    p.add_argument("--stop-baseline", action="store_true", help="also time each guard generating its whole decision "
                   "(guard_stop_at_refusal off), in the same run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    rep = run(args)
    print(table(rep))
    text = json.dumps(rep, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
