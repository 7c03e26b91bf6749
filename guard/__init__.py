"""The forget guard: a DRAGON-style CoT guard and output check in front of any LLM.

Python API: ``GuardedLLM(target, detector, guard, config)``; LangChain: ``guard.langchain.GuardRunnable``;
HTTP: ``guard.server.create_app`` (OpenAI-compatible proxy) and ``cli/serve.py``.
Names are imported lazily so that ``import guard`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "GuardedLLM": "guard.api", "GuardStream": "guard.api", "AsyncGuardStream": "guard.api",
    "GuardConfig": "guard.config", "ServerConfig": "guard.config",
    "GuardResult": "guard.types", "GuardTrace": "guard.types", "DetectorProtocol": "guard.types",
    "GuardUnavailableError": "guard.types", "BackendError": "guard.types",
    "CoTGuard": "guard.cot", "GuardDecision": "core.guard_format",
    "GenParams": "guard.backends", "make_backend": "guard.backends",
    "BackendConfig": "guard.backends", "backend_config": "guard.backends",
    "GuardRunnable": "guard.langchain", "create_app": "guard.server",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guard' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
