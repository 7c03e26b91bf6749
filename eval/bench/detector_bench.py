"""Detector benchmark: latency and throughput next to the bare encoder, and vector search at 100k / 1M.

Part 1 builds the detector on the offline benchmark and times, in the same run and interleaved,
``Detector.detect`` and the bare encoder on the same prompts (p50/p99 for one prompt), then
``detect_batch`` and the bare encoder on 1000 prompts (prompts/s). The detector's own overhead
(normalisation, entity matching, faiss search, features, classifier) is also timed alone, with the
embeddings precomputed, because on a shared CPU the encoder's time varies more than the overhead.
The requirement: overhead <= 25% of the encoder's time.

Part 2 adds a new person with 10 facts at run time and times the first flagged request for them,
checking that the existing targets' held-out flags (TPR) and the negatives' (FPR) did not change.

Part 3 times :class:`detectors.index.VectorIndex` search with random unit vectors (dim 384) at
several sizes, exact (flat) and approximate (IVF with float lists, and IVF with 8-bit codes whose best
candidates are re-scored exactly, the default), one query at a time, with recall@1 against the exact
answer. Queries are noisy copies (cosine ~0.8) of stored vectors, as a
paraphrase is of a stored question. It also reports where flat search reaches 10% of one encoder
call, which is what ``DetectorConfig.ann_threshold`` is chosen from.

    python -m eval.bench.detector_bench                      # full run (a few minutes)
    python -m eval.bench.detector_bench --quick              # 100k only, fewer prompts
    python -m eval.bench.detector_bench --out runs/detector_bench.json
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

from core.io import atomic_write_json
from detectors.config import DetectorConfig
from detectors.detector import Detector
from detectors.encoder import Encoder
from detectors.index import VectorIndex, set_faiss_threads
from detectors.normalize import normalize
from eval.tasks.offline import generate_benchmark

log = logging.getLogger("detector_bench")


def _pct(xs: list[float]) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds, and the number of timings."""
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "count": len(xs)}


class _CachedEncoder(Encoder):
    """An encoder that returns precomputed embeddings (to time the detector without the encoder)."""

    def __init__(self, base: Encoder, table: dict[str, np.ndarray]) -> None:
        """Serve ``table`` (normalised text -> embedding) under ``base``'s name and dimension."""
        self.model, self.name, self.batch_size, self.dim = base.model, base.name, base.batch_size, base.dim
        self._table = table

    def encode(self, texts: Any, memo: bool = False) -> np.ndarray:
        """Look the texts up instead of running the model."""
        return np.stack([self._table[t] for t in texts]) if len(texts) else np.zeros((0, self.dim), np.float32)


def bench_detector(n_single: int, n_batch: int) -> dict[str, Any]:
    """Single-prompt and batch timings of the detector and the bare encoder, interleaved."""
    cfg = DetectorConfig()
    enc = Encoder.from_config(cfg)
    task = generate_benchmark()
    t0 = time.perf_counter()
    det = Detector.build(task, cfg, enc)
    build_s = time.perf_counter() - t0
    pool = ([q.question for q in task.forget_qa] + [q.question for q in task.neighbour_qa]
            + [q.question for q in task.retain_qa] + list(task.benign_questions))
    prompts = [pool[i % len(pool)] + ("" if i < len(pool) else f" ({i // len(pool)})") for i in range(max(n_batch, n_single))]
    for q in prompts[:5]:  # warm-up
        det.detect(q)
        enc.encode([normalize(q)])
    t_enc, t_det = [], []
    for q in prompts[:n_single]:
        t = time.perf_counter()
        enc.encode([normalize(q)])
        t_enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        det.detect(q)
        t_det.append(time.perf_counter() - t)
    batch = prompts[:n_batch]
    norm = [normalize(q) for q in batch]
    t = time.perf_counter()
    enc.encode(norm)
    enc_batch_s = time.perf_counter() - t
    t = time.perf_counter()
    dets = det.detect_batch(batch)
    det_batch_s = time.perf_counter() - t
    # Overhead alone: same calls with the embeddings precomputed.
    table = dict(zip(norm, enc.encode(norm), strict=True))
    det.store.encoder = _CachedEncoder(enc, table)
    t_over = []
    for q in prompts[:n_single]:
        t = time.perf_counter()
        det.detect(q)
        t_over.append(time.perf_counter() - t)
    t = time.perf_counter()
    det.detect_batch(batch)
    over_batch_s = time.perf_counter() - t
    det.store.encoder = enc
    single_enc, single_det, single_over = _pct(t_enc), _pct(t_det), _pct(t_over)
    return {
        "build_s": round(build_s, 2), "flagged_in_batch": sum(d.flagged for d in dets),
        "single": {"encoder": single_enc, "detector": single_det, "overhead_only": single_over,
                   "ratio_p50": round(single_det["p50_ms"] / single_enc["p50_ms"], 3),
                   "overhead_share_p50": round(single_over["p50_ms"] / single_enc["p50_ms"], 3)},
        "batch": {"n": n_batch, "encoder_s": round(enc_batch_s, 3), "detector_s": round(det_batch_s, 3),
                  "overhead_only_s": round(over_batch_s, 3),
                  "encoder_prompts_per_s": round(n_batch / enc_batch_s, 1),
                  "detector_prompts_per_s": round(n_batch / det_batch_s, 1),
                  "ratio": round(det_batch_s / enc_batch_s, 3),
                  "overhead_share": round(over_batch_s / enc_batch_s, 3)},
    }


def bench_add_target(enc: Encoder | None = None) -> dict[str, Any]:
    """Time from ``add_target`` (a new person with 10 facts) to the first request flagged for it,
    and whether the held-out flags of the existing targets and negatives changed."""
    from core.schema import ForgetTarget
    from detectors.evaluation import split_fold
    from eval.tasks.offline import BenchmarkConfig

    cfg = DetectorConfig()
    enc = enc or Encoder.from_config(cfg)
    task = generate_benchmark()
    split = split_fold(task, 0, 4)
    det = Detector.build(split.train_task, cfg, enc, negatives=split.train_negatives)
    pos = [q for g in split.pos.values() for q in g]
    neg = [q for g in split.neg.values() for q in g]
    before = ([d.flagged for d in det.detect_batch(pos)], [d.flagged for d in det.detect_batch(neg)])
    person = generate_benchmark(BenchmarkConfig(seed=123, min_facts=10, max_facts=10)).targets[0]
    new = ForgetTarget(id="person-new", kind="privacy", names=person.names, policy=person.policy,
                       qa=[q.model_copy(update={"paraphrased_question": None}) for q in person.qa if q.kind == "fact"])
    probe = person.qa[0].paraphrased_question or person.qa[0].question
    was_flagged = det.detect(probe).flagged
    t0 = time.perf_counter()
    det.add_target(new)
    t_added = time.perf_counter() - t0
    d = det.detect(probe)
    t_first = time.perf_counter() - t0
    held_out = [q.paraphrased_question for q in person.qa if q.kind == "fact" and q.paraphrased_question]
    after = ([x.flagged for x in det.detect_batch(pos)], [x.flagged for x in det.detect_batch(neg)])
    t0 = time.perf_counter()
    det.fit()
    refit_s = time.perf_counter() - t0
    return {"facts": len(new.qa), "add_target_s": round(t_added, 3), "to_first_flagged_s": round(t_first, 3),
            "flagged_before_add": was_flagged, "flagged_after_add": d.flagged,
            "new_target_heldout_tpr": round(float(np.mean([x.flagged for x in det.detect_batch(held_out)])), 4),
            "old_tpr_before": round(float(np.mean(before[0])), 4), "old_tpr_after": round(float(np.mean(after[0])), 4),
            "old_fpr_before": round(float(np.mean(before[1])), 4), "old_fpr_after": round(float(np.mean(after[1])), 4),
            "old_flags_identical": before == after, "refit_s": round(refit_s, 3)}


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` random unit vectors (built in chunks to bound memory)."""
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - s), d), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _time_queries(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    """Per-query latencies (one query per call) and the top-1 ids."""
    times, top = [], np.empty(len(queries), dtype=np.int64)
    for i in range(len(queries)):
        t = time.perf_counter()
        _, ids = index.search(queries[i:i + 1], k)
        times.append(time.perf_counter() - t)
        top[i] = ids[0, 0]
    return times, top


def bench_index(sizes: list[int], n_queries: int, nprobes: list[int], dim: int = 384, k: int = 16,
                seed: int = 0, hnsw_efs: list[int] | None = None) -> list[dict[str, Any]]:
    """Flat vs IVF (and HNSW when ``hnsw_efs``) single-query latency, recall@1 and RAM at each size."""
    rng = np.random.default_rng(seed)
    data = _unit(rng, max(sizes), dim)
    src = rng.choice(min(sizes), n_queries, replace=False)
    queries = 0.8 * data[src] + 0.6 * _unit(rng, n_queries, dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = []
    for n in sizes:
        ids = np.arange(n, dtype=np.int64)
        flat = VectorIndex(dim, kind="flat")
        t = time.perf_counter()
        flat.add(data[:n], ids)
        flat_build = time.perf_counter() - t
        flat.search(queries[:2], k)
        f_times, f_top = _time_queries(flat, queries, k)
        rows.append({**_pct(f_times), "n": n, "index": "flat (exact)", "build_s": round(flat_build, 2), "recall@1": 1.0,
                     "ram_mb": round(index_bytes(flat) / 2**20, 1)})
        del flat
        for ann in ("ivf", "ivf-sq8"):
            ivf = VectorIndex(dim, kind=ann)  # type: ignore[arg-type]
            t = time.perf_counter()
            ivf.add(data[:n], ids)
            ivf_build = time.perf_counter() - t
            for nprobe in nprobes:
                ivf.faiss_index.nprobe = nprobe
                i_times, i_top = _time_queries(ivf, queries, k)
                rows.append({**_pct(i_times), "n": n, "index": f"{ann} nlist={ivf.faiss_index.nlist} nprobe={nprobe}",
                             "build_s": round(ivf_build, 2), "recall@1": round(float(np.mean(i_top == f_top)), 4),
                             "ram_mb": round(index_bytes(ivf) / 2**20, 1)})
            del ivf
        for ef in hnsw_efs or []:
            if ef == hnsw_efs[0]:
                hnsw = VectorIndex(dim, kind="hnsw")
                t = time.perf_counter()
                hnsw.add(data[:n], ids)
                hnsw_build = time.perf_counter() - t
            hnsw.ef_search = ef
            h_times, h_top = _time_queries(hnsw, queries, k)
            rows.append({**_pct(h_times), "n": n, "index": f"hnsw M={hnsw.hnsw_m} ef={ef}",
                         "build_s": round(hnsw_build, 2), "recall@1": round(float(np.mean(h_top == f_top)), 4),
                         "ram_mb": round(index_bytes(hnsw) / 2**20, 1)})
        log.info("index bench: %d vectors done", n)
    return rows


def _filler(pool: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors in the region real embeddings occupy: mixtures of two real embeddings plus noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, pool.shape[1]), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        a, b = pool[rng.integers(len(pool), size=m)], pool[rng.integers(len(pool), size=m)]
        x = a + rng.uniform(0.2, 1.0, (m, 1)).astype(np.float32) * b + 0.35 * _unit(rng, m, pool.shape[1])
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_index_decisions(n_filler: int, nprobes: list[int], backend: str = "onnx", seed: int = 0) -> dict[str, Any]:
    """The detector's decisions with a query bank of ``n_filler`` extra vectors: exact search vs IVF per nprobe.

    The detector is the offline benchmark's (``detector eval`` split); its query bank gets ``n_filler`` entries of
    one extra stored target, vectors mixed from real embeddings of another seed's benchmark (other people's
    questions and answers, none of them evaluated) so that they crowd the region real prompts fall in. Every held-out prompt of the split is
    scored with the bank searched exactly (flat) and with IVF at each ``nprobe``; agreement is per prompt.
    """
    from dataclasses import replace

    from core.schema import ForgetTarget
    from detectors.store import ENT_WIDTH, ROLE_CODE, Bank
    from eval.detector_eval import prepare_split_eval
    from eval.tasks.offline import BenchmarkConfig
    from eval.tasks.spec import load_task_spec

    cfg = DetectorConfig(encoder_backend=backend)
    task = load_task_spec("offline")
    ev = prepare_split_eval(task, cfg)
    det, groups = ev.detector, ev.groups
    prompts = [p for g in (groups["prompt_pos"], groups["prompt_neg"]) for v in g.values() for p in v]
    det.add_target(ForgetTarget(id="filler", kind="privacy", names=["Filler Person"], policy="filler",
                                qa=[{"question": "Where does Filler Person live?", "answer": "In Fillertown."}]))
    # Filler from another seed's benchmark: other people, so no evaluated prompt or negative is stored, not even
    # mixed into a filler vector.
    other = generate_benchmark(BenchmarkConfig(seed=seed + 1000))
    others = ([q.question for q in other.forget_qa] + [q.question for q in other.retain_qa]
              + [q.question for q in other.neighbour_qa] + [q.answer for q in other.retain_qa])
    pool = det.encoder.encode([normalize(t) for t in others])
    t0 = time.perf_counter()
    filler = _filler(pool, n_filler, seed)
    gen_s = time.perf_counter() - t0
    snap = det.store.snapshot()
    base = snap.banks["query"]
    num = snap.num_of["filler"]
    base_ids, base_vecs = base.index.items()
    ids = np.arange(int(base.ids.max()) + 1, int(base.ids.max()) + 1 + n_filler, dtype=np.int64)
    all_vecs, all_ids = np.concatenate([base_vecs, filler]), np.concatenate([base_ids, ids])
    meta = dict(target=np.concatenate([base.target, np.full(n_filler, num, base.target.dtype)]),
                group=np.concatenate([base.group, np.full(n_filler, int(base.group.max()) + 1, base.group.dtype)]),
                role=np.concatenate([base.role, np.full(n_filler, ROLE_CODE["question"], np.int8)]),
                ent=np.concatenate([base.ent, np.zeros((n_filler, ENT_WIDTH), np.float32)]),
                texts=base.texts + (None,) * n_filler, caps=base.caps + ((),) * n_filler)
    rows: list[dict[str, Any]] = []
    ref: list[bool] | None = None
    ref_top: np.ndarray | None = None
    E = det.encoder.encode([normalize(p) for p in prompts if isinstance(p, str)][:300])
    for kind in ("flat", "ivf", "ivf-sq8"):
        index = VectorIndex(snap.dim, kind=kind)  # type: ignore[arg-type]
        t = time.perf_counter()
        index.add(all_vecs, all_ids)
        build_s = time.perf_counter() - t
        det.store._snap = replace(snap, banks={**snap.banks, "query": Bank(index, all_ids, **meta)})
        for nprobe in ([0] if kind == "flat" else nprobes):
            if nprobe:
                index.faiss_index.nprobe = nprobe
            flags = [d.flagged for d in det.detect_batch(prompts)]
            times, top = _time_queries(index, E, 16)
            if ref is None:
                ref, ref_top = flags, top
            label = "flat (exact)" if kind == "flat" else f"{kind} nlist={index.faiss_index.nlist} nprobe={nprobe}"
            rows.append({"index": label, "n": len(all_ids), "build_s": round(build_s, 1), **_pct(times),
                         "recall@1_prompts": round(float(np.mean(top == ref_top)), 4),
                         "decisions": len(flags), "flagged": int(sum(flags)),
                         "agreement": round(float(np.mean(np.asarray(flags) == np.asarray(ref))), 5),
                         "ram_mb": round(index_bytes(index) / 2**20, 1)})
            log.info("index decisions: %s done", label)
        det.store._snap = snap
        del index
    return {"filler": n_filler, "filler_gen_s": round(gen_s, 1), "prompts": len(prompts), "rows": rows}


def index_bytes(index: VectorIndex) -> int:
    """Bytes the faiss index takes in memory (its serialised size: vectors, lists, graph, ids, and the float copy an
    8-bit IVF re-ranks against)."""
    import faiss

    parts = [index.faiss_index] + ([index.exact_index] if index.exact_index is not None else [])
    return sum(int(faiss.serialize_index(p).nbytes) for p in parts)


def crossover(small_sizes: list[int], encoder_single_ms: float, dim: int = 384, seed: int = 1) -> dict[str, Any]:
    """Flat single-query latency at small sizes and the size where it reaches 10% of one encoder call."""
    rng = np.random.default_rng(seed)
    data = _unit(rng, max(small_sizes), dim)
    q = _unit(rng, 50, dim)
    pts = []
    for n in small_sizes:
        idx = VectorIndex(dim, kind="flat")
        idx.add(data[:n], np.arange(n))
        times, _ = _time_queries(idx, q, 16)
        pts.append((n, float(np.median(times)) * 1000.0))
    slope = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0]
    at10 = 0.1 * encoder_single_ms / slope if slope > 0 else float("inf")
    return {"flat_p50_ms": {str(n): round(ms, 3) for n, ms in pts}, "ms_per_10k_vectors": round(slope * 1e4, 3),
            "size_where_flat_is_10pct_of_encoder": int(at10), "encoder_single_p50_ms": encoder_single_ms,
            "default_ann_threshold": DetectorConfig().ann_threshold}


def render_index(res: dict[str, Any]) -> str:
    """The vector-search tables as plain text."""
    lines = ["Vector search (random unit vectors, dim 384, one query per call, k=16, 1 faiss thread; queries are "
             "noisy copies, cosine 0.8, of stored vectors)",
             f"{'n':>9} {'index':32} {'build s':>8} {'p50 ms':>9} {'p99 ms':>9} {'recall@1':>9} {'RAM MB':>8}"]
    for r in res["index"]:
        lines.append(f"{r['n']:9d} {r['index']:32} {r['build_s']:8.2f} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} "
                     f"{r['recall@1']:9.4f} {r.get('ram_mb', 0):8.1f}")
    d = res.get("index_decisions")
    if d:
        lines += ["", f"Detector decisions with {d['filler']} extra stored vectors in the query bank (offline task, "
                      f"{d['prompts']} held-out prompts of the detector-eval split; recall@1 on 300 real prompts)",
                  f"{'index':32} {'build s':>8} {'p50 ms':>9} {'recall@1':>9} {'flagged':>8} {'agreement':>10} "
                  f"{'RAM MB':>8}"]
        for r in d["rows"]:
            lines.append(f"{r['index']:32} {r['build_s']:8.1f} {r['p50_ms']:9.3f} {r['recall@1_prompts']:9.4f} "
                         f"{r['flagged']:8d} {r['agreement']:10.5f} {r['ram_mb']:8.1f}")
    return "\n".join(lines)


def render(res: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    d = res["detector"]
    s, b = d["single"], d["batch"]
    lines = ["Detector (offline benchmark task, MiniLM-L6, CPU)",
             f"{'':28} {'p50 ms':>9} {'p99 ms':>9}",
             f"{'bare encoder, 1 prompt':28} {s['encoder']['p50_ms']:9.2f} {s['encoder']['p99_ms']:9.2f}",
             f"{'detector.detect, 1 prompt':28} {s['detector']['p50_ms']:9.2f} {s['detector']['p99_ms']:9.2f}",
             f"{'overhead only (no encoder)':28} {s['overhead_only']['p50_ms']:9.2f} {s['overhead_only']['p99_ms']:9.2f}",
             f"ratio detect/encoder p50 {s['ratio_p50']:.3f}; overhead/encoder p50 {s['overhead_share_p50']:.3f}",
             f"batch of {b['n']}: encoder {b['encoder_prompts_per_s']:.1f} prompts/s, detector "
             f"{b['detector_prompts_per_s']:.1f} prompts/s (ratio {b['ratio']:.3f}; overhead alone "
             f"{b['overhead_only_s']:.3f}s = {b['overhead_share']:.3f} of the encoder)",
             ""]
    lines += render_index(res).splitlines()
    a = res.get("add_target")
    if a:
        lines += ["", f"add_target ({a['facts']} facts): {a['add_target_s']:.2f}s to add, {a['to_first_flagged_s']:.2f}s "
                      f"to the first flagged request (flagged before: {a['flagged_before_add']}, after: "
                      f"{a['flagged_after_add']}); new target held-out TPR {a['new_target_heldout_tpr']:.3f}; old "
                      f"TPR {a['old_tpr_before']:.4f} -> {a['old_tpr_after']:.4f}, old FPR {a['old_fpr_before']:.4f} -> "
                      f"{a['old_fpr_after']:.4f} (identical flags: {a['old_flags_identical']}); optional refit "
                      f"{a['refit_s']:.2f}s"]
    c = res.get("crossover")
    if c:
        lines += ["", f"flat search: {c['ms_per_10k_vectors']:.3f} ms per 10k vectors; it reaches 10% of one "
                      f"encoder call ({c['encoder_single_p50_ms']:.2f} ms) at ~{c['size_where_flat_is_10pct_of_encoder']} "
                      f"vectors (default ann_threshold {c['default_ann_threshold']})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, print the tables, write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100k vectors only, 200 prompts per batch.")
    p.add_argument("--single", type=int, default=200, help="Prompts timed one at a time.")
    p.add_argument("--batch", type=int, default=1000, help="Prompts in the batch.")
    p.add_argument("--queries", type=int, default=200, help="Search queries per index.")
    p.add_argument("--nprobes", type=lambda v: [int(x) for x in v.split(",")], default=[64, 128, 256],
                   help="IVF nprobe values to time (comma-separated).")
    p.add_argument("--hnsw", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help="Also time HNSW (M=32) at these efSearch values (slow to build: minutes at 1M).")
    p.add_argument("--index-only", action="store_true", help="Only the vector-search parts (index, decisions).")
    p.add_argument("--out", type=Path, default=Path("runs/detector_bench.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_faiss_threads(1)  # the detector's default (DetectorConfig.faiss_threads)
    t0 = time.perf_counter()
    if args.index_only:
        sizes = [100_000] if args.quick else [100_000, 1_000_000]
        res = {"index": bench_index(sizes, args.queries, args.nprobes, hnsw_efs=args.hnsw),
               "index_decisions": bench_index_decisions(max(sizes), args.nprobes)}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        print(render_index(res))
        atomic_write_json(args.out, res)
        print(f"\nJSON written to {args.out}")
        return 0
    res: dict[str, Any] = {"detector": bench_detector(min(args.single, 50) if args.quick else args.single,
                                                      200 if args.quick else args.batch)}
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    res["add_target"] = bench_add_target()
    res["index"] = bench_index(sizes, args.queries, args.nprobes, hnsw_efs=args.hnsw)
    res["index_decisions"] = bench_index_decisions(max(sizes), args.nprobes)
    res["crossover"] = crossover([10_000, 25_000, 50_000], res["detector"]["single"]["encoder"]["p50_ms"])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(render(res))
    atomic_write_json(args.out, res)
    print(f"\nJSON written to {args.out}")
    print(json.dumps({"ratio_single_p50": res["detector"]["single"]["ratio_p50"],
                      "ratio_batch": res["detector"]["batch"]["ratio"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
