"""Cosine top-k search over unit vectors with stable int64 ids, exact when small, approximate when large.

Below ``ann_threshold`` vectors the index is an exact ``IndexFlatIP`` inside an ``IndexIDMap2``
(removal by id is supported and cheap at that size). Above it the vectors move to an
``IndexIVFFlat`` (inner product): removal by id is native, adding needs no rebuild, and building
it over 1M x 384 took 47 s on the shared 2-core CPU, where HNSW (M=16, efConstruction=40) took
109 s for only 100k vectors and cannot remove ids.

The default threshold (100k) comes from ``eval/bench/detector_bench.py``: exact single-query
search cost 3.2 ms per 10k vectors there, so it stays under 10% of one encoder call up to about
110k vectors, with perfect recall; above that IVF (nlist ~ sqrt(n), nprobe 32) answers in ~2 ms
at 100k with recall@1 0.955 on random unit vectors (the hard case: real embeddings cluster).
All vectors must be L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf"]
DEFAULT_ANN_THRESHOLD = 100_000
_TRAIN_PER_LIST = 64


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
    """Number of IVF lists for ``n`` vectors: about sqrt(n), within [16, 4096]."""
    return int(min(4096, max(16, round(math.sqrt(n)))))


class VectorIndex:
    """Top-k inner-product search with ids; switches flat -> IVF above ``ann_threshold`` vectors."""

    def __init__(self, dim: int, ann_threshold: int = DEFAULT_ANN_THRESHOLD, nprobe: int = 32,
                 kind: IndexKind | Literal["auto"] = "auto") -> None:
        """Create an empty index; ``kind="auto"`` picks flat or IVF by size on every change."""
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if ann_threshold < 1000:
            raise ValueError(f"ann_threshold must be >= 1000 (IVF needs enough vectors to train), got {ann_threshold}")
        self.dim = dim
        self.ann_threshold = ann_threshold
        self.nprobe = nprobe
        self.mode = kind
        self._index: faiss.Index = self._new_flat()
        self._trained_size = 0

    # -- construction helpers -------------------------------------------------------------------
    def _new_flat(self) -> faiss.Index:
        """An empty exact index with id mapping."""
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_ivf(self, train: np.ndarray) -> faiss.Index:
        """An empty IVF index trained on ``train`` (10 k-means rounds on at most 64 points per list)."""
        nlist = ivf_nlist(len(train))
        quantizer = faiss.IndexFlatIP(self.dim)
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

    @property
    def kind(self) -> IndexKind:
        """Which structure is in use now: "flat" (exact) or "ivf" (approximate)."""
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._index.ntotal)

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
                self.mode == "ivf" or n_after > self.ann_threshold):
            # Going approximate: train on everything at once instead of adding to flat first.
            old_ids, old_vecs = self.items()
            all_vecs = np.concatenate([old_vecs, vec]) if len(old_ids) else vec
            all_ids = np.concatenate([old_ids, idx]) if len(old_ids) else idx
            log.info("vector index: building IVF over %d vectors", n_after)
            self._index = self._new_ivf(all_vecs)
            self._index.add_with_ids(all_vecs, all_ids)
            return
        self._index.add_with_ids(vec, idx)
        self._maybe_switch()

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed."""
        idx = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if len(idx) == 0:
            return 0
        n = int(self._index.remove_ids(faiss.IDSelectorBatch(idx)))
        self._maybe_switch()
        return n

    def _maybe_switch(self) -> None:
        """Move to IVF when large, back to flat when small, retrain IVF after 4x growth."""
        if self.mode == "flat":
            return
        n = self.ntotal
        want_ivf = self.mode == "ivf" or n > self.ann_threshold
        if self.kind == "flat" and want_ivf and n >= 1000:
            self._rebuild("ivf")
        elif self.kind == "ivf" and self.mode == "auto" and n < self.ann_threshold // 2:
            self._rebuild("flat")
        elif self.kind == "ivf" and n > 4 * max(self._trained_size, 1):
            self._rebuild("ivf")

    def _rebuild(self, kind: IndexKind) -> None:
        """Rebuild the index as ``kind`` from the stored vectors."""
        ids, vecs = self.items()
        log.info("vector index: rebuilding %d vectors as %s", len(ids), kind)
        self._index = self._new_ivf(vecs) if kind == "ivf" else self._new_flat()
        if len(ids):
            self._index.add_with_ids(vecs, ids)

    # -- queries ----------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (cosine scores, ids) per query, best first; missing slots are (-inf, -1)."""
        q = _as_f32(queries, self.dim, "queries")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if self.ntotal == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        scores, ids = self._index.search(q, kk)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, ids

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors) currently stored, ids ascending."""
        n = self.ntotal
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        if self.kind == "flat":
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            vecs = self._index.index.reconstruct_n(0, n)
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

    @classmethod
    def from_faiss(cls, index: faiss.Index, ann_threshold: int = DEFAULT_ANN_THRESHOLD, nprobe: int = 32,
                   kind: IndexKind | Literal["auto"] = "auto") -> VectorIndex:
        """Wrap an index read by ``faiss.read_index`` (an IDMap2-wrapped flat index or an IVF index)."""
        is_flat = isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
        if not (is_flat or isinstance(index, faiss.IndexIVFFlat)):
            raise VectorIndexError(f"unsupported faiss index type {type(index).__name__}; expected IndexIDMap2(IndexFlatIP) or IndexIVFFlat")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise VectorIndexError("faiss index does not use inner product; expected METRIC_INNER_PRODUCT")
        out = cls(index.d, ann_threshold=ann_threshold, nprobe=nprobe, kind=kind)
        if is_flat:
            index.index = faiss.downcast_index(index.index)
        else:
            index.nprobe = min(nprobe, index.nlist)
            out._trained_size = int(index.ntotal)
        out._index = index
        return out
