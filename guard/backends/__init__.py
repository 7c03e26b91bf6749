"""Model backends behind one interface: local transformers (default), OpenAI-compatible HTTP, in-process vLLM."""

from __future__ import annotations

from core.registry import import_submodules
from guard.backends.base import BACKENDS, Backend, GenOutput, GenParams, Messages, aiter_thread
from guard.config import BackendConfig

__all__ = ["BACKENDS", "Backend", "GenOutput", "GenParams", "Messages", "aiter_thread", "make_backend"]


def _load_builtin() -> None:
    """Register every backend module of this package (they import heavy deps lazily): a new backend is one file."""
    import_submodules(__name__, __path__, skip={"base"})


def make_backend(cfg: BackendConfig) -> Backend:
    """Build the backend a config names (e.g. kind='openai' with base_url for a proxy upstream)."""
    _load_builtin()
    cls = BACKENDS.get(cfg.kind)
    return cls.from_config(cfg)  # type: ignore[attr-defined]
