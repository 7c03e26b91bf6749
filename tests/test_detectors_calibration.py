"""Conformal calibration, the logistic scorer and the vector index."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detectors.calibration import (
    auroc,
    calibrate,
    conformal_rank,
    conformal_threshold,
    midpoint_threshold,
    rate_above,
)
from detectors.classifier import ClassifierError, LogisticScorer
from detectors.index import VectorIndex, VectorIndexError, ivf_nlist


@pytest.mark.parametrize(("n", "alpha", "rank"), [(99, 0.01, 99), (100, 0.01, 100), (199, 0.01, 198),
                                                  (1000, 0.01, 991), (9, 0.1, 9), (19, 0.05, 19), (50, 0.01, 51)])
def test_conformal_rank(n: int, alpha: float, rank: int) -> None:
    assert conformal_rank(n, alpha) == rank == math.ceil(round((n + 1) * (1 - alpha), 9))


def test_conformal_threshold_is_order_statistic() -> None:
    scores = np.arange(1, 200) / 200.0  # 199 distinct scores
    thr, rank, ok = conformal_threshold(scores, 0.01)
    assert ok and rank == 198 and thr == pytest.approx(198 / 200.0)
    assert rate_above(scores, thr) == pytest.approx(1 / 199)


def test_conformal_small_n_falls_back_to_max() -> None:
    thr, rank, ok = conformal_threshold([0.1, 0.5, 0.3], 0.01)
    assert (thr, rank, ok) == (0.5, 3, False)
    with pytest.raises(ValueError):
        conformal_threshold([], 0.01)
    with pytest.raises(ValueError):
        conformal_threshold([0.1, float("nan")], 0.01)


@pytest.mark.parametrize("dist", ["uniform", "beta", "ties"])
def test_conformal_guarantee_holds_on_average(dist: str) -> None:
    """Marginal guarantee: over many calibration draws, E[P(new negative > thr)] <= alpha."""
    rng = np.random.default_rng(0)
    alpha, n, trials = 0.05, 199, 400
    draw = {"uniform": lambda k: rng.random(k), "beta": lambda k: rng.beta(2, 8, k),
            "ties": lambda k: rng.integers(0, 20, k) / 20.0}[dist]
    fprs = []
    for _ in range(trials):
        thr, _, ok = conformal_threshold(draw(n), alpha)
        assert ok
        fprs.append(np.mean(draw(2000) > thr))
    mean_fpr = float(np.mean(fprs))
    assert mean_fpr <= alpha + 0.004  # Monte-Carlo slack; the exact bound is alpha
    if dist != "ties":
        assert mean_fpr >= alpha - 0.02  # and it is not needlessly conservative


def test_group_calibration_and_midpoint_keep_guarantee() -> None:
    rng = np.random.default_rng(1)
    easy, hard = rng.beta(1, 30, 500), rng.beta(3, 10, 60)
    neg = np.concatenate([easy, hard])
    groups = ["benign"] * len(easy) + ["neighbour"] * len(hard)
    pos = rng.beta(30, 1, 300)
    pooled = calibrate(neg, 0.01, pos, groups, per_group=False)
    grouped = calibrate(neg, 0.01, pos, groups, per_group=True)
    assert grouped.threshold >= pooled.threshold
    assert grouped.group_thresholds["neighbour"] == pytest.approx(hard.max())  # 60 < 99: max, no guarantee
    assert grouped.group_guaranteed == {"benign": True, "neighbour": False}
    assert grouped.fpr_by_group["neighbour"] == 0.0
    mid = calibrate(neg, 0.01, pos, groups, per_group=True, placement="midpoint")
    assert mid.conformal_threshold == pytest.approx(grouped.threshold)
    assert grouped.threshold <= mid.threshold < float(np.quantile(pos, 0.02))  # raised, but below the positives
    assert mid.fpr_calibration <= grouped.fpr_calibration and mid.tpr >= 0.98


def test_midpoint_never_lowers() -> None:
    assert midpoint_threshold(0.9, np.array([0.1, 0.2]), 0.02) == 0.9
    assert midpoint_threshold(0.5, np.array([]), 0.02) == 0.5
    assert midpoint_threshold(0.1, np.full(10, 0.9), 0.02) == pytest.approx(0.5)  # logit midpoint of 0.1 and 0.9


def test_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 500)
    pos[:20] = neg[:20]  # ties
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(500)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(expected)
    assert math.isnan(auroc([], neg))


def test_logistic_scorer_fit_predict_roundtrip() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 3))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    s = LogisticScorer.fit(X, y, ("a", "b", "c"))
    p = s.predict(X)
    assert ((p > 0.5) == y).mean() > 0.95
    assert s.weights()["a"] > s.weights()["b"] > abs(s.weights()["c"])
    s2 = LogisticScorer.from_arrays(s.to_arrays("x"), "x", ("a", "b", "c"))
    assert np.array_equal(s2.predict(X), p)
    with pytest.raises(ClassifierError):
        LogisticScorer.fit(X, np.zeros(400), ("a", "b", "c"))
    with pytest.raises(ClassifierError):
        s.predict(X[:, :2])
    with pytest.raises(ClassifierError):
        LogisticScorer.from_arrays(s.to_arrays("x"), "x", ("a", "b"))


# -- vector index -----------------------------------------------------------------------------------

def _unit(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_search_remove_items() -> None:
    rng = np.random.default_rng(4)
    x = _unit(rng, 300)
    idx = VectorIndex(32, ann_threshold=1000)
    idx.add(x, np.arange(100, 400))
    s, ids = idx.search(x[:5], 3)
    assert idx.kind == "flat" and ids[:, 0].tolist() == [100, 101, 102, 103, 104]
    assert np.allclose(s[:, 0], 1.0, atol=1e-5) and np.all(s[:, 0] >= s[:, 1])
    assert idx.remove(np.array([100, 101, 999])) == 2
    _, ids = idx.search(x[:2], 1)
    assert 100 not in ids and 101 not in ids
    got_ids, got = idx.items()
    assert got_ids.tolist() == list(range(102, 400)) and np.allclose(got, x[2:])
    s, ids = idx.search(x[:1], 500)  # more than stored: padded
    assert ids[0, -1] == -1 and np.isneginf(s[0, -1])
    with pytest.raises(VectorIndexError):
        idx.add(x[:2, :10], np.arange(2))


def test_index_switches_to_ivf_and_back_with_good_recall() -> None:
    rng = np.random.default_rng(5)
    x = _unit(rng, 3000)
    q = x[:200] * 0.8 + _unit(rng, 200) * 0.6
    idx = VectorIndex(32, ann_threshold=2000, nprobe=16, ann="ivf")
    idx.add(x[:1500], np.arange(1500))
    assert idx.kind == "flat"
    idx.add(x[1500:], np.arange(1500, 3000))
    assert idx.kind == "ivf" and idx.ntotal == 3000 and idx.faiss_index.nlist == ivf_nlist(3000)
    exact = VectorIndex(32, kind="flat")
    exact.add(x, np.arange(3000))
    _, a = idx.search(q, 1)
    _, b = exact.search(q, 1)
    assert np.mean(a[:, 0] == b[:, 0]) >= 0.9
    idx.remove(np.arange(2500))  # 500 left < threshold / 2: back to exact
    assert idx.kind == "flat" and idx.items()[0].tolist() == list(range(2500, 3000))


def test_ivf_remove_and_clone_are_independent() -> None:
    rng = np.random.default_rng(6)
    x = _unit(rng, 2000)
    idx = VectorIndex(32, ann_threshold=1000, kind="ivf")
    idx.add(x, np.arange(2000))
    twin = idx.clone()
    twin.remove(np.arange(10))
    assert (idx.ntotal, twin.ntotal) == (2000, 1990)
    _, ids = twin.search(x[:10], 5)
    assert not np.isin(ids, np.arange(10)).any()
    got_ids, got = idx.items()
    assert got_ids.tolist() == list(range(2000)) and np.allclose(got, x)


def test_8bit_ivf_reranks_exactly_removes_clones_and_round_trips(tmp_path) -> None:
    import faiss

    rng = np.random.default_rng(9)
    x = _unit(rng, 4000)
    q = x[:300] * 0.8 + _unit(rng, 300) * 0.6
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    idx = VectorIndex(32, ann_threshold=2000, nprobe=16)  # the default structure
    idx.add(x[:1500], np.arange(1500))
    assert idx.kind == "flat" and idx.exact_index is None
    idx.add(x[1500:], np.arange(1500, 4000))
    assert idx.kind == "ivf-sq8" and idx.ntotal == 4000 and idx.exact_index.ntotal == 4000
    exact = VectorIndex(32, kind="flat")
    exact.add(x, np.arange(4000))
    s, ids = idx.search(q, 5)
    es, eids = exact.search(q, 5)
    assert np.mean(ids[:, 0] == eids[:, 0]) >= 0.95
    # Scores are exact cosines (re-scored on the float vectors), not 8-bit approximations, and sorted.
    np.testing.assert_allclose(s, np.einsum("qkd,qd->qk", x[ids], q), atol=1e-5)
    assert (np.diff(s, axis=1) <= 0).all()
    twin = idx.clone()
    assert twin.remove(np.arange(10)) == 10
    assert (idx.ntotal, twin.ntotal, twin.exact_index.ntotal) == (4000, 3990, 3990)
    assert not np.isin(twin.search(x[:10], 5)[1], np.arange(10)).any()
    got_ids, got = idx.items()
    assert got_ids.tolist() == list(range(4000)) and np.array_equal(got, x)  # the float vectors, not decoded codes
    faiss.write_index(twin.faiss_index, str(tmp_path / "i.faiss"))
    faiss.write_index(twin.exact_index, str(tmp_path / "e.faiss"))
    back = VectorIndex.from_faiss(faiss.read_index(str(tmp_path / "i.faiss")), ann_threshold=2000, nprobe=16,
                                  exact=faiss.read_index(str(tmp_path / "e.faiss")))
    assert back.kind == "ivf-sq8" and back.ntotal == 3990
    np.testing.assert_array_equal(back.search(q, 5)[1], twin.search(q, 5)[1])
    with pytest.raises(VectorIndexError, match="exact vectors"):
        VectorIndex.from_faiss(faiss.read_index(str(tmp_path / "i.faiss")))
    forced = VectorIndex(32, kind="ivf-sq8")  # asked for by name: approximate from 1000 vectors, whatever the size
    forced.add(x[:1500], np.arange(1500))
    assert forced.kind == "ivf-sq8" and forced.exact_index.ntotal == 1500
    with pytest.raises(ValueError, match="'ivf-sq8'"):
        VectorIndex(32, ann="pq")  # type: ignore[arg-type]
    twin.remove(np.arange(10, 3100))  # 900 left < threshold / 2: back to exact, without the float copy
    assert twin.kind == "flat" and twin.exact_index is None and twin.items()[0].tolist() == list(range(3100, 4000))


def test_hnsw_tombstones_search_items_clone_and_compaction() -> None:
    rng = np.random.default_rng(7)
    x = _unit(rng, 2000)
    idx = VectorIndex(32, ann_threshold=1000, kind="hnsw", ef_search=32)
    idx.add(x, np.arange(2000))
    assert idx.kind == "hnsw" and idx.ntotal == 2000
    twin = idx.clone()
    assert twin.remove(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 5000])) == 10
    assert twin.remove(np.array([3])) == 0  # already gone
    assert (idx.ntotal, twin.ntotal) == (2000, 1990)
    _, ids = twin.search(x[:10], 5)
    assert not np.isin(ids, np.arange(10)).any() and (ids >= 0).all()
    assert twin.items()[0].tolist() == list(range(10, 2000))
    _, ids = idx.search(x[:10], 1)  # the original still has them
    assert ids[:, 0].tolist() == list(range(10))
    twin.remove(np.arange(10, 600))  # over a quarter dead: the graph is rebuilt without them
    assert twin.kind == "hnsw" and twin.ntotal == 1400 and twin.faiss_index.ntotal == 1400
    np.testing.assert_allclose(twin.items()[1], x[600:])


def test_hnsw_recall_switching_and_reload_forget_removed_entries(tmp_path) -> None:
    import faiss

    rng = np.random.default_rng(8)
    x = _unit(rng, 3000)
    q = x[:300] * 0.8 + _unit(rng, 300) * 0.6
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    idx = VectorIndex(32, ann_threshold=2000, ann="hnsw")
    idx.add(x[:1500], np.arange(1500))
    assert idx.kind == "flat"
    idx.add(x[1500:], np.arange(1500, 3000))
    assert idx.kind == "hnsw"
    exact = VectorIndex(32, kind="flat")
    exact.add(x, np.arange(3000))
    assert np.mean(idx.search(q, 1)[1][:, 0] == exact.search(q, 1)[1][:, 0]) >= 0.99
    idx.remove(np.arange(100))
    faiss.write_index(idx.faiss_index, str(tmp_path / "i.faiss"))
    back = VectorIndex.from_faiss(faiss.read_index(str(tmp_path / "i.faiss")), ann_threshold=2000)
    assert back.kind == "hnsw" and back.ntotal == 3000  # the graph still holds the removed entries...
    back.retain_only(np.arange(100, 3000))  # ...until told which ids are live, as the detector's loader does
    assert back.ntotal == 2900 and not np.isin(back.search(x[:100], 3)[1], np.arange(100)).any()
    idx.remove(np.arange(100, 2100))  # 900 left < threshold / 2: back to exact
    assert idx.kind == "flat" and idx.items()[0].tolist() == list(range(2100, 3000))


def test_small_groups_are_pooled_and_reported_not_guaranteed() -> None:
    rng = np.random.default_rng(4)
    big, a, b = rng.beta(1, 30, 400), rng.beta(3, 10, 30), rng.beta(3, 10, 80)
    neg = np.concatenate([big, a, b])
    groups = ["benign"] * 400 + ["neighbour"] * 30 + ["retain"] * 80
    rep = calibrate(neg, 0.01, None, groups, per_group=True)
    assert rep.not_guaranteed == {"neighbour": 30, "retain": 80}
    pooled, _, ok = conformal_threshold(np.concatenate([a, b]), 0.01)  # 110 >= 99: the pool has a guarantee
    assert ok and rep.group_thresholds["neighbour"] == rep.group_thresholds["retain"] == pytest.approx(pooled)
    assert rep.group_guaranteed["(small groups)"] is True and rep.threshold >= pooled
    note = rep.guarantee_note()
    assert note.startswith("target FPR 0.01; not guaranteed per group:") and "neighbour n=30" in note
    assert calibrate(big, 0.01, None, ["benign"] * 400, per_group=True).guarantee_note() == "target FPR 0.01"
