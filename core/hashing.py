"""A deterministic, model-free bag-of-words sentence encoder: the "hashing" encoder.

A real registered encoder (``Encoder.load("hashing")``, ``--set encoder=hashing``) for what needs no
semantics: unit tests, CLI smoke runs and load benchmarks, which then run without loading a model. It only
knows word overlap, so never deploy a detector built on it. Each token maps to a fixed pseudo-random unit
vector (seeded by a hash of the token); a text is the normalised sum of its tokens' vectors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

NAME = "hashing"

_TOK = re.compile(r"[^\W_]+")


class HashingModel:
    """Stands in for a sentence-transformers model: ``encode`` and ``get_embedding_dimension``."""

    def __init__(self, dim: int = 64) -> None:
        """Embed into ``dim`` dimensions."""
        self.dim = dim
        self._cache: dict[str, np.ndarray] = {}
        self.calls = 0

    def get_embedding_dimension(self) -> int:
        """The embedding width."""
        return self.dim

    def _tok(self, tok: str) -> np.ndarray:
        """The fixed random unit vector of one token."""
        v = self._cache.get(tok)
        if v is None:
            seed = int.from_bytes(hashlib.sha256(tok.encode("utf-8")).digest()[:8], "big")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            self._cache[tok] = v
        return v

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        """Normalised sum of token vectors per text (the empty text gets a fixed vector)."""
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            toks = _TOK.findall(t.lower()) or ["<empty>"]
            v = np.sum([self._tok(x) for x in toks], axis=0)
            out[i] = v / max(float(np.linalg.norm(v)), 1e-6)
        return out
