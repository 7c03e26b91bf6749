"""Cosine top-k search over unit vectors with stable int64 ids, exact when small, approximate when large.

Below ``ann_threshold`` vectors the index is an exact ``IndexFlatIP`` inside an ``IndexIDMap2``
(removal by id is supported and cheap at that size). Above it the vectors move to an approximate
structure. ``ann="ivf-sq8"`` (the default): an ``IndexIVFScalarQuantizer`` with 8-bit codes finds
candidates, and the best ``RERANK_DEPTH`` of them are re-scored exactly against the float vectors, kept
beside it in an ``IndexIDMap2(IndexFlatIP)`` (faiss's own ``IndexRefineFlat`` does the same but can
neither add with ids nor remove, so the two structures are kept here); scores returned are exact.
``ann="ivf"``: an ``IndexIVFFlat`` (inner product), exact scores in the lists themselves, 25% less RAM,
slower per probed vector. Both remove by id natively and add without a rebuild. ``ann="hnsw"`` uses an
HNSW graph instead, with removals kept as
tombstones that every search skips (faiss graphs cannot delete) and a rebuild once a quarter is dead;
a saved graph keeps its removed entries, so the detector's loader tombstones every id its metadata
no longer has (:meth:`VectorIndex.retain_only`).

Figures from ``eval/bench/detector_bench.py --index-only`` (2026-12-03, 2-core CPU, one faiss thread,
dim 384, random unit vectors, queries noisy copies at cosine 0.8 of stored ones, the hard case):
IVF with ~4 sqrt(n) lists (4000 at 1M) and nprobe 256 answers in 5.2 ms p50 at 1M with recall@1
0.985 (nprobe 128: 2.9 ms, 0.970); at 100k in 1.7 ms with recall 1.0. Flat search at 1M takes 69 ms.
The same lists with 8-bit codes and exact re-ranking of 64 candidates (the default): nprobe 384 answers in
3.6 ms p50 with recall@1 1.0 (320: 3.0 ms, 0.99; the float lists need 7.0 ms at 384), for 1.85 GB per million
entries instead of 1.48; on real prompts against 1M stored vectors it made the same decision as exact search on
all 839 prompts at 5.0 ms p50.
HNSW (M=32, efConstruction 40) took 296 s to build at 1M and found the true neighbour of only 25%
of these queries at efSearch 64 (38% at 128): random high-dimensional data defeats the graph, so it
is an option, not the default. Against a 1M bank of vectors mixed from real embeddings of other
people, real prompts got the same detector decision at every nprobe from 64 (1.1 ms) and the exact
neighbour from nprobe 192 (0.993 at 128).
The default threshold (100k) is older than these figures: exact search costs ~0.63 ms per 10k
vectors here, so at 100k (6.3 ms) it costs more than one encoder call (4.4 ms on ONNX); lowering it
trades exactness for speed between ~10k and 100k and is left for a measured change.
All vectors must be L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, get_args

import faiss
import numpy as np

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "ivf-sq8", "hnsw"]
AnnKind = Literal["ivf", "ivf-sq8", "hnsw"]
ANN_KINDS: tuple[str, ...] = get_args(AnnKind)
DEFAULT_ANN: AnnKind = "ivf-sq8"
DEFAULT_ANN_THRESHOLD = 100_000
_TRAIN_PER_LIST = 64
DEFAULT_NPROBE = 384
RERANK_DEPTH = 64
"""Candidates the 8-bit IVF returns per query for exact re-scoring (at least k)."""
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 64
DEFAULT_EF_CONSTRUCTION = 40
_MAX_DEAD_SHARE = 0.25


class VectorIndexError(RuntimeError):
    """An index operation got inconsistent input (wrong dimension, duplicate or unknown ids)."""


def _as_f32(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Return a C-contiguous float32 2-D array of width ``dim`` or raise naming ``what``."""
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise VectorIndexError(f"{what}: expected shape (n, {dim}), got {tuple(arr.shape)}")
    return arr


def set_faiss_threads(n: int | None) -> None:
    """Set faiss's OpenMP thread count (process-wide); None leaves faiss's default.

    One thread is the detector's default: its searches are one query or one batch against small
    banks, where an OpenMP team costs more than it saves (measured on a shared 2-core CPU: a
    single query on 300 vectors takes 16 ms with 2 threads and 0.03 ms with 1).
    """
    if n is not None:
        if n < 1:
            raise ValueError(f"faiss threads must be >= 1, got {n}")
        faiss.omp_set_num_threads(n)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: about 4 sqrt(n), within [16, 4096] (4000 lists at 1M)."""
    return int(min(4096, max(16, round(4 * math.sqrt(n)))))


def index_options(cfg: Any) -> dict[str, Any]:
    """The :class:`VectorIndex` settings of a :class:`detectors.config.DetectorConfig`."""
    return {"ann_threshold": cfg.ann_threshold, "nprobe": cfg.ivf_nprobe, "ann": cfg.ann_index,
            "hnsw_m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search}


class VectorIndex:
    """Top-k inner-product search with ids; switches flat -> IVF above ``ann_threshold`` vectors."""

    def __init__(self, dim: int, ann_threshold: int = DEFAULT_ANN_THRESHOLD, nprobe: int = DEFAULT_NPROBE,
                 kind: IndexKind | Literal["auto"] = "auto", ann: AnnKind = DEFAULT_ANN, hnsw_m: int = DEFAULT_HNSW_M,
                 ef_search: int = DEFAULT_EF_SEARCH, ef_construction: int = DEFAULT_EF_CONSTRUCTION) -> None:
        """Create an empty index; ``kind="auto"`` picks flat or the ``ann`` structure by size on every change."""
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if ann_threshold < 1000:
            raise ValueError(f"ann_threshold must be >= 1000 (IVF needs enough vectors to train), got {ann_threshold}")
        if ann not in ANN_KINDS:
            raise ValueError(f"ann must be one of {', '.join(map(repr, ANN_KINDS))}, got {ann!r}")
        if min(hnsw_m, ef_search, ef_construction) < 1:
            raise ValueError("hnsw_m, ef_search and ef_construction must be >= 1")
        self.dim = dim
        self.ann_threshold = ann_threshold
        self.nprobe = nprobe
        self.mode = kind
        self.ann: AnnKind = kind if kind in ANN_KINDS else ann  # type: ignore[assignment]
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self._exact: faiss.Index | None = None
        """ivf-sq8 only: the float vectors (IndexIDMap2(IndexFlatIP)) that candidates are re-scored against."""
        self._index: faiss.Index = self._new_flat()
        self._trained_size = 0  # vectors IVF was trained on (it retrains after 4x growth)
        self._dead = np.zeros(0, dtype=np.int64)
        """Ids removed from an HNSW graph (which cannot delete): skipped by every search, dropped at the next rebuild."""

    # -- construction helpers -------------------------------------------------------------------
    def _new_flat(self) -> faiss.Index:
        """An empty exact index with id mapping."""
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_ivf(self, train: np.ndarray, sq8: bool = False) -> faiss.Index:
        """An empty IVF index (float lists, or 8-bit codes with ``sq8``) trained on ``train`` (10 k-means rounds on
        at most 64 points per list; the 8-bit ranges on the same sample)."""
        nlist = ivf_nlist(len(train))
        quantizer = faiss.IndexFlatIP(self.dim)
        if sq8:
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = train
        if len(train) > _TRAIN_PER_LIST * nlist:
            rng = np.random.default_rng(0)
            sample = train[np.sort(rng.choice(len(train), _TRAIN_PER_LIST * nlist, replace=False))]
        ivf.cp.min_points_per_centroid = 1
        ivf.cp.max_points_per_centroid = _TRAIN_PER_LIST
        ivf.cp.niter = 10
        ivf.train(sample)
        ivf.nprobe = min(self.nprobe, nlist)
        self._trained_size = len(train)
        return ivf

    def _new_hnsw(self) -> faiss.Index:
        """An empty HNSW graph (flat vectors) with id mapping."""
        hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.ef_construction
        hnsw.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(hnsw)

    def _install(self, kind: IndexKind, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Replace the structure by a new one of ``kind`` holding exactly ``vecs`` under ``ids`` (IVF trains on them)."""
        self._exact = self._new_flat() if kind == "ivf-sq8" else None
        if kind in ("ivf", "ivf-sq8"):
            self._index = self._new_ivf(vecs, sq8=kind == "ivf-sq8")
        else:
            self._index = self._new_hnsw() if kind == "hnsw" else self._new_flat()
        self._dead = np.zeros(0, dtype=np.int64)
        if len(ids):
            self._index.add_with_ids(vecs, ids)
            if self._exact is not None:
                self._exact.add_with_ids(vecs, ids)

    @property
    def _index(self) -> faiss.Index:
        return self._faiss

    @_index.setter
    def _index(self, index: faiss.Index) -> None:
        """Swap the faiss structure and note its kind (searches read it; faiss's downcast costs per call)."""
        self._faiss = index
        if isinstance(index, faiss.IndexIVF):
            self._kind: IndexKind = "ivf-sq8" if isinstance(index, faiss.IndexIVFScalarQuantizer) else "ivf"
        else:
            inner = index.index if isinstance(index, faiss.IndexIDMap2) else index
            self._kind = "hnsw" if isinstance(faiss.downcast_index(inner), faiss.IndexHNSW) else "flat"

    @property
    def _dead(self) -> np.ndarray:
        return self._tombstones

    @_dead.setter
    def _dead(self, ids: np.ndarray) -> None:
        """Replace the tombstones and the search filter built from them (once per change, not per search)."""
        self._tombstones = ids
        self._skip_dead = faiss.IDSelectorNot(faiss.IDSelectorBatch(ids)) if len(ids) else None

    @property
    def kind(self) -> IndexKind:
        """Which structure is in use now: "flat" (exact), "ivf", "ivf-sq8" or "hnsw" (approximate)."""
        return self._kind

    @property
    def ntotal(self) -> int:
        """Number of stored (live) vectors."""
        return int(self._index.ntotal) - len(self._dead)

    def __len__(self) -> int:
        return self.ntotal

    # -- mutation ---------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add unit vectors under the given (new, unique) int64 ids."""
        vec = _as_f32(vectors, self.dim, "vectors")
        idx = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(idx) != len(vec):
            raise VectorIndexError(f"got {len(vec)} vectors but {len(idx)} ids")
        if len(vec) == 0:
            return
        n_after = self.ntotal + len(vec)
        if self.kind == "flat" and self.mode != "flat" and n_after >= 1000 and (
                self.mode in ANN_KINDS or n_after > self.ann_threshold):
            # Going approximate: train on everything at once instead of adding to flat first.
            old_ids, old_vecs = self.items()
            all_vecs = np.concatenate([old_vecs, vec]) if len(old_ids) else vec
            all_ids = np.concatenate([old_ids, idx]) if len(old_ids) else idx
            log.info("vector index: building %s over %d vectors", self.ann.upper(), n_after)
            self._install(self.ann, all_ids, all_vecs)
            return
        self._index.add_with_ids(vec, idx)
        if self._exact is not None:
            self._exact.add_with_ids(vec, idx)
        self._maybe_switch()

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed."""
        idx = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(idx) == 0:
            return 0
        if self.kind == "hnsw":
            live = np.setdiff1d(np.intersect1d(idx, self._stored_ids()), self._dead)
            self._dead = np.union1d(self._dead, live)
            n = len(live)
            if len(self._dead) > _MAX_DEAD_SHARE * self._index.ntotal:
                self._rebuild("hnsw")
        else:
            n = int(self._index.remove_ids(faiss.IDSelectorBatch(idx)))
            if self._exact is not None:
                self._exact.remove_ids(faiss.IDSelectorBatch(idx))
        self._maybe_switch()
        return n

    def _stored_ids(self) -> np.ndarray:
        """Every id in the underlying structure (tombstoned ones included)."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def retain_only(self, ids: np.ndarray) -> None:
        """Tombstone (HNSW) or remove every stored id not in ``ids``: how a reloaded graph forgets removed entries."""
        stored = self._stored_ids() if self.kind in ("flat", "hnsw") else self.items()[0]
        gone = np.setdiff1d(np.setdiff1d(stored, self._dead), np.asarray(ids, dtype=np.int64))
        if len(gone):
            self.remove(gone)

    def _maybe_switch(self) -> None:
        """Move to IVF when large, back to flat when small, retrain IVF after 4x growth."""
        if self.mode == "flat":
            return
        n = self.ntotal
        want_ann = self.mode in ANN_KINDS or n > self.ann_threshold
        if self.kind == "flat" and want_ann and n >= 1000:
            self._rebuild(self.ann)
        elif self.kind != "flat" and self.mode == "auto" and n < self.ann_threshold // 2:
            self._rebuild("flat")
        elif self.kind in ("ivf", "ivf-sq8") and n > 4 * max(self._trained_size, 1):
            self._rebuild(self.kind)

    def _rebuild(self, kind: IndexKind) -> None:
        """Rebuild the index as ``kind`` from the stored vectors."""
        ids, vecs = self.items()
        log.info("vector index: rebuilding %d vectors as %s", len(ids), kind)
        self._install(kind, ids, vecs)

    # -- queries ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine scores, ids) per query, best first; missing slots are (-inf, -1)."""
        q = _as_f32(queries, self.dim, "queries")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if self.ntotal == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, kk)
            if self._skip_dead is not None:
                params.sel = self._skip_dead
            scores, ids = self._index.search(q, kk, params=params)
        elif self._exact is not None:
            scores, ids = self._reranked(q, kk, self._exact)
        else:
            scores, ids = self._index.search(q, kk)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, ids

    def _reranked(self, q: np.ndarray, k: int, exact_index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
        """ivf-sq8: the 8-bit lists' best ``RERANK_DEPTH`` candidates, re-scored exactly; the top ``k`` of them."""
        depth = min(max(k, RERANK_DEPTH), self.ntotal)
        _, cand = self._index.search(q, depth)
        found = cand >= 0
        if not found.any():
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        fill = np.where(found, cand, cand[found][0])
        vecs = exact_index.reconstruct_batch(fill.reshape(-1)).reshape(len(q), depth, self.dim)
        exact = np.where(found, np.einsum("qkd,qd->qk", vecs, q), -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(np.where(found, cand, -1), order, 1)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors) currently stored, ids ascending."""
        n = self.ntotal
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        if self._exact is not None or self.kind in ("flat", "hnsw"):  # an IndexIDMap2 holds the float vectors
            idmap = self._exact if self._exact is not None else self._index
            ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
            vecs = idmap.index.reconstruct_n(0, idmap.ntotal)
            if len(self._dead):
                live = ~np.isin(ids, self._dead)
                ids, vecs = ids[live], vecs[live]
        else:
            invlists = self._index.invlists
            id_parts, vec_parts = [], []
            for lst in range(self._index.nlist):
                size = invlists.list_size(lst)
                if size == 0:
                    continue
                id_parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size).copy()
                vec_parts.append(codes.view(np.float32).reshape(size, self.dim))
            ids, vecs = np.concatenate(id_parts), np.concatenate(vec_parts)
        order = np.argsort(ids, kind="stable")
        return ids[order], np.ascontiguousarray(vecs[order], dtype=np.float32)

    def clone(self) -> VectorIndex:
        """An independent copy (for copy-on-write updates)."""
        out = VectorIndex.__new__(VectorIndex)
        out.dim, out.ann_threshold, out.nprobe, out.mode = self.dim, self.ann_threshold, self.nprobe, self.mode
        out.ann, out.hnsw_m, out.ef_search, out.ef_construction = self.ann, self.hnsw_m, self.ef_search, self.ef_construction
        out._dead = self._dead.copy()
        out._exact = None if self._exact is None else faiss.clone_index(self._exact)
        out._index = faiss.clone_index(self._index)
        if isinstance(out._index, faiss.IndexIVF):
            out._index.nprobe = self._index.nprobe
        out._trained_size = self._trained_size
        return out

    # -- persistence ------------------------------------------------------------------------------
    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying faiss index (for ``faiss.write_index``)."""
        return self._index

    @property
    def exact_index(self) -> faiss.Index | None:
        """ivf-sq8: the float vectors candidates are re-scored against (saved beside :attr:`faiss_index`); else None."""
        return self._exact

    @classmethod
    def from_faiss(cls, index: faiss.Index, ann_threshold: int = DEFAULT_ANN_THRESHOLD, nprobe: int = DEFAULT_NPROBE,
                   kind: IndexKind | Literal["auto"] = "auto", ann: AnnKind = DEFAULT_ANN, hnsw_m: int = DEFAULT_HNSW_M,
                   ef_search: int = DEFAULT_EF_SEARCH, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
                   exact: faiss.Index | None = None) -> VectorIndex:
        """Wrap an index read by ``faiss.read_index``: an IDMap2-wrapped flat or HNSW index, an IVF index, or an
        8-bit IVF index with its ``exact`` float vectors (:attr:`exact_index`, read from its own file). A graph
        keeps entries removed before it was saved: call :meth:`retain_only` with the live ids."""
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
        is_flat = isinstance(inner, faiss.IndexFlat)
        is_hnsw = isinstance(inner, faiss.IndexHNSWFlat)
        is_sq8 = isinstance(index, faiss.IndexIVFScalarQuantizer)
        if not (is_flat or is_hnsw or is_sq8 or isinstance(index, faiss.IndexIVFFlat)):
            raise VectorIndexError(f"unsupported faiss index type {type(index).__name__}; expected IndexIDMap2("
                                   "IndexFlatIP), IndexIDMap2(IndexHNSWFlat), IndexIVFFlat or IndexIVFScalarQuantizer")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise VectorIndexError("faiss index does not use inner product; expected METRIC_INNER_PRODUCT")
        if is_sq8:
            exact_inner = faiss.downcast_index(exact.index) if isinstance(exact, faiss.IndexIDMap2) else None
            if not isinstance(exact_inner, faiss.IndexFlat) or exact.ntotal != index.ntotal or exact.d != index.d:
                raise VectorIndexError("an IndexIVFScalarQuantizer needs its exact vectors: an IndexIDMap2(IndexFlatIP) "
                                       f"of the same {index.ntotal} entries and dimension {index.d}")
            exact.index = exact_inner
        out = cls(index.d, ann_threshold=ann_threshold, nprobe=nprobe, kind=kind,
                  ann="hnsw" if is_hnsw else ann, hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction)
        if is_flat or is_hnsw:
            index.index = inner
        else:
            index.nprobe = min(nprobe, index.nlist)
            out._trained_size = int(index.ntotal)
            out._exact = exact if is_sq8 else None
        out._index = index
        return out
