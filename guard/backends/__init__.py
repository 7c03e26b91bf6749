"""Model backends behind one interface: local transformers (default), OpenAI-compatible HTTP, in-process vLLM."""

from __future__ import annotations

from typing import Any

from core.registry import import_submodules
from guard.backends.base import BACKENDS, Backend, BackendConfig, GenOutput, GenParams, Messages, aiter_thread

__all__ = ["BACKENDS", "Backend", "BackendConfig", "GenOutput", "GenParams", "Messages", "aiter_thread",
           "backend_config", "backend_kinds", "make_backend"]


def _load_builtin() -> None:
    """Register every backend module of this package (they import heavy deps lazily): a new backend is one file."""
    import_submodules(__name__, __path__, skip={"base"})


def backend_kinds() -> list[str]:
    """The registered backend kinds, for CLI choices and error messages."""
    _load_builtin()
    return BACKENDS.names()


def backend_config(**options: Any) -> BackendConfig:
    """Validate options (a YAML section, CLI flags) with the config class of the backend ``kind`` names."""
    _load_builtin()
    kind = options.setdefault("kind", "transformers")
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend kind {kind!r}; accepted: {', '.join(BACKENDS.names())}")
    return BACKENDS.get(kind).config_class(**options)


def make_backend(cfg: BackendConfig) -> Backend:
    """Build the backend a config names (e.g. an OpenAIConfig with base_url for a proxy upstream)."""
    _load_builtin()
    cls = BACKENDS.get(cfg.kind)
    if not isinstance(cfg, cls.config_class):
        raise TypeError(f"backend {cfg.kind!r} needs a {cls.config_class.__name__}, got {type(cfg).__name__}; "
                        "build configs with guard.backends.backend_config(kind=...)")
    return cls.from_config(cfg)  # type: ignore[attr-defined]
