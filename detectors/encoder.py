"""A thin wrapper over the sentence encoder: unit-norm float32 embeddings, optional memo for builds."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from core.encoder_export import DEFAULT_ENCODER_BACKEND

if TYPE_CHECKING:
    from detectors.config import DetectorConfig

log = logging.getLogger(__name__)


class Encoder:
    """Encodes texts to L2-normalised float32 vectors; memoises (bounded) when asked, for builds and evals."""

    def __init__(self, model: Any, name: str, batch_size: int = 64, memo_size: int = 50_000) -> None:
        """Wrap a sentence-transformers model (anything with ``encode``) known by ``name``."""
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size
        self._lock = threading.Lock()
        getter = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
        dim = getter() if callable(getter) else None
        self.dim = int(dim) if dim else int(self._raw([" "]).shape[1])

    @classmethod
    def load(cls, name: str = "minilm-l6", batch_size: int = 64, backend: str = DEFAULT_ENCODER_BACKEND) -> Encoder:
        """Load an encoder through :func:`core.models.load_encoder` (embedded models need no network; ``"hashing"``
        is the model-free encoder of :mod:`core.hashing`, for tests and smoke runs); ``backend`` picks the runtime
        (torch, or a cached ONNX / int8 / OpenVINO export of the same model)."""
        from core.models import load_encoder

        return cls(load_encoder(name, backend=backend), name=name, batch_size=batch_size)

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> Encoder:
        """The encoder a detector configuration names (model, runtime and batch size)."""
        return cls.load(cfg.encoder, cfg.batch_size, cfg.encoder_backend)

    def _raw(self, texts: Sequence[str]) -> np.ndarray:
        """One encoder call for all ``texts``."""
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(np.asarray(emb, dtype=np.float32))

    def encode(self, texts: Sequence[str], memo: bool = False) -> np.ndarray:
        """Embed texts as an (n, dim) float32 array of unit vectors; ``memo`` reuses earlier results."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not memo:
            return self._raw(texts)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            new = self._raw(missing)
            with self._lock:
                for t, v in zip(missing, new, strict=True):
                    self._memo[t] = v
                while len(self._memo) > self._memo_size:
                    self._memo.popitem(last=False)
                fresh = dict(zip(missing, new, strict=True))
                out = np.stack([fresh[t] if t in fresh else self._memo[t] for t in texts])
        else:
            with self._lock:
                out = np.stack([self._memo[t] for t in texts])
        return np.ascontiguousarray(out, dtype=np.float32)


def hashing_encoder(dim: int = 64) -> Encoder:
    """The model-free "hashing" encoder (:mod:`core.hashing`) at ``dim`` dimensions: for tests and smoke runs."""
    from core.hashing import NAME, HashingModel

    return Encoder(HashingModel(dim), name=NAME)
