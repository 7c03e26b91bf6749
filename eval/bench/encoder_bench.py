"""Encoder runtimes side by side: torch fp32 vs ONNX Runtime (fp32, int8) vs OpenVINO, speed and decisions.

Part 1 (speed) loads every runtime of the same sentence encoder (:mod:`core.encoder_export`) and
times them interleaved on the same texts, so they share the machine's noise: ms per text at batch 1
(p50 / p99 over single prompts) and at batch 32 (total time / texts), with the ratio against torch
measured in the same run, and each runtime's cosine to torch's embeddings.

Part 2 (decisions) builds, for every runtime, the detector of ``detector eval``'s split from the same
forget request, calibrated with that runtime's own embeddings (so each gets its own thresholds), and
scores every held-out prompt and answer of the split (shaped prompts included). It reports how many
decisions agree with the torch detector's, the thresholds, and the held-out TPR / FPR of each. A
runtime may become the default only at >= 99.9% agreement.

    python -m eval.bench.encoder_bench                           # offline task
    python -m eval.bench.encoder_bench --tasks offline tofu:forget10 lume:task3 --out runs/encoder_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.encoder_export import ENCODER_BACKENDS, EncoderBackendError
from core.io import atomic_write_json
from core.models import load_encoder
from detectors.config import DetectorConfig
from detectors.encoder import Encoder
from detectors.normalize import normalize

log = logging.getLogger("encoder_bench")
AGREEMENT_TARGET = 0.999


def _pct(xs: list[float]) -> dict[str, float]:
    """p50 / p99 in milliseconds."""
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def load_backends(name: str, backends: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Every runtime of ``name`` that loads here, and why the others did not."""
    models, skipped = {}, {}
    for b in backends:
        t = time.perf_counter()
        try:
            models[b] = load_encoder(name, backend=b)
        except EncoderBackendError as e:
            skipped[b] = str(e)
            continue
        log.info("loaded %s (%s) in %.1fs", name, b, time.perf_counter() - t)
    return models, skipped


def bench_speed(models: dict[str, Any], texts: list[str], n_single: int, batch: int = 32,
                rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Per-runtime ms/text at batch 1 and ``batch``, interleaved, and cosine to torch's embeddings."""
    norm = [normalize(t) for t in texts]
    for m in models.values():  # warm-up
        m.encode(norm[:batch], batch_size=batch, normalize_embeddings=True)
        m.encode(norm[:1], batch_size=1, normalize_embeddings=True)
    single: dict[str, list[float]] = {b: [] for b in models}
    for t in tqdm(norm[:n_single], desc="batch 1", unit="text"):
        for b, m in models.items():
            s = time.perf_counter()
            m.encode([t], batch_size=1, normalize_embeddings=True)
            single[b].append(time.perf_counter() - s)
    batched: dict[str, list[float]] = {b: [] for b in models}
    embs: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for b, m in models.items():
            s = time.perf_counter()
            embs[b] = m.encode(norm, batch_size=batch, normalize_embeddings=True)
            batched[b].append((time.perf_counter() - s) / len(norm))
    ref = embs.get("torch")
    out = {}
    for b in models:
        row: dict[str, Any] = {"batch1": _pct(single[b]), f"batch{batch}_ms_per_text": round(min(batched[b]) * 1000, 3)}
        if ref is not None:
            cos = (embs[b] * ref).sum(1)
            row["cos_to_torch_min"], row["cos_to_torch_mean"] = round(float(cos.min()), 5), round(float(cos.mean()), 6)
        out[b] = row
    if "torch" in out:
        for row in out.values():
            row["speedup_batch1_p50"] = round(out["torch"]["batch1"]["p50_ms"] / row["batch1"]["p50_ms"], 2)
            row[f"speedup_batch{batch}"] = round(out["torch"][f"batch{batch}_ms_per_text"]
                                                 / row[f"batch{batch}_ms_per_text"], 2)
    return out


def _flags(det: Any, groups: dict[str, dict[str, list[Any]]]) -> tuple[list[bool], dict[str, float]]:
    """Every held-out decision in a fixed order, and the rate per group."""
    flags: list[bool] = []
    rates = {}
    for side in ("prompt_pos", "prompt_neg", "leak_pos", "leak_neg"):
        for g, items in groups[side].items():
            if not items:
                continue
            dets = det.detect_batch(items) if side.startswith("prompt") else det.detect_leak_batch(items)
            f = [d.flagged for d in dets]
            flags.extend(f)
            rates[f"{side}/{g}"] = round(float(np.mean(f)), 4)
    return flags, rates


def bench_decisions(models: dict[str, Any], task_spec: str, cfg: DetectorConfig) -> dict[str, Any]:
    """Per-runtime detector (its own calibration) on ``detector eval``'s split; agreement with torch's decisions."""
    from eval.detector_eval import prepare_split_eval
    from eval.tasks.spec import load_task_spec

    task = load_task_spec(task_spec)
    res: dict[str, Any] = {"task": task_spec, "runtimes": {}}
    ref_flags: list[bool] | None = None
    for b, m in models.items():
        t = time.perf_counter()
        ev = prepare_split_eval(task, cfg.model_copy(update={"encoder_backend": b}),
                                encoder=Encoder(m, name=cfg.encoder, batch_size=cfg.batch_size))
        det, groups = ev.detector, ev.groups
        flags, rates = _flags(det, groups)
        row: dict[str, Any] = {
            "seconds": round(time.perf_counter() - t, 1), "decisions": len(flags),
            "thresholds": {ch: round(float(r.threshold), 5) for ch, r in det.calibration.items()},
            "tpr_prompt": round(float(np.mean([v for k, v in rates.items() if k.startswith("prompt_pos")])), 4),
            "fpr_prompt": round(float(np.mean([v for k, v in rates.items() if k.startswith("prompt_neg")])), 4),
            "rates": rates}
        if b == "torch":
            ref_flags = flags
        if ref_flags is not None:
            if len(ref_flags) != len(flags):
                raise RuntimeError(f"{b}: {len(flags)} decisions but torch made {len(ref_flags)}; the split differs")
            agree = float(np.mean(np.asarray(flags) == np.asarray(ref_flags)))
            row["agreement_with_torch"] = round(agree, 5)
            row["disagreements"] = int(np.sum(np.asarray(flags) != np.asarray(ref_flags)))
            row["meets_target"] = agree >= AGREEMENT_TARGET
        res["runtimes"][b] = row
        log.info("%s on %s: %d decisions in %.0fs", b, task_spec, len(flags), row["seconds"])
    return res


def render(res: dict[str, Any]) -> str:
    """The tables as plain text."""
    lines = [f"Encoder runtimes ({res['encoder']}, CPU, {res['threads']} threads; interleaved timings)",
             f"{'runtime':10} {'b1 p50 ms':>10} {'b1 p99 ms':>10} {'b32 ms/text':>12} {'x b1':>6} {'x b32':>6} "
             f"{'cos min':>8} {'cos mean':>9}"]
    for b, r in res["speed"].items():
        lines.append(f"{b:10} {r['batch1']['p50_ms']:10.2f} {r['batch1']['p99_ms']:10.2f} "
                     f"{r['batch32_ms_per_text']:12.3f} {r.get('speedup_batch1_p50', 0):6.2f} "
                     f"{r.get('speedup_batch32', 0):6.2f} {r.get('cos_to_torch_min', 0):8.5f} "
                     f"{r.get('cos_to_torch_mean', 0):9.6f}")
    for b, why in res.get("skipped", {}).items():
        lines.append(f"{b:10} skipped: {why}")
    for d in res["decisions"]:
        lines += ["", f"Decisions on {d['task']} (detector eval split; each runtime calibrated on its own embeddings)",
                  f"{'runtime':10} {'decisions':>9} {'agree':>8} {'differ':>6} {'prompt thr':>10} {'leak thr':>9} "
                  f"{'TPR':>7} {'FPR':>7} {'>=99.9%':>8}"]
        for b, r in d["runtimes"].items():
            th = r["thresholds"]
            lines.append(f"{b:10} {r['decisions']:9d} {r.get('agreement_with_torch', 1.0):8.5f} "
                         f"{r.get('disagreements', 0):6d} {th.get('prompt', float('nan')):10.4f} "
                         f"{th.get('leak', float('nan')):9.4f} {r['tpr_prompt']:7.4f} {r['fpr_prompt']:7.4f} "
                         f"{str(r.get('meets_target', True)):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run both parts, print the tables, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="minilm-l6")
    p.add_argument("--backends", default=",".join(ENCODER_BACKENDS), help="Comma-separated runtimes.")
    p.add_argument("--tasks", nargs="+", default=["offline"], help="Task specs for the decision part.")
    p.add_argument("--single", type=int, default=300, help="Texts timed one at a time, per runtime.")
    p.add_argument("--texts", type=int, default=1024, help="Texts in the batch-32 timing.")
    p.add_argument("--no-decisions", action="store_true", help="Speed only.")
    p.add_argument("--out", type=Path, default=Path("runs/encoder_bench.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from eval.tasks.offline import generate_benchmark

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "torch" not in backends:
        backends.insert(0, "torch")
    t0 = time.perf_counter()
    models, skipped = load_backends(args.encoder, backends)
    task = generate_benchmark()
    pool = ([q.question for q in task.forget_qa] + [q.question for q in task.neighbour_qa]
            + [q.question for q in task.retain_qa] + list(task.benign_questions) + [q.answer for q in task.forget_qa])
    texts = [pool[i % len(pool)] for i in range(args.texts)]
    res: dict[str, Any] = {"encoder": args.encoder, "threads": torch.get_num_threads(), "skipped": skipped,
                           "speed": bench_speed(models, texts, args.single)}
    res["decisions"] = [] if args.no_decisions else [
        bench_decisions(models, t, DetectorConfig(encoder=args.encoder)) for t in args.tasks]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(render(res))
    atomic_write_json(args.out, res)
    print(f"\nJSON written to {args.out}")
    print(json.dumps({b: r.get("speedup_batch1_p50") for b, r in res["speed"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
