"""What one proxy app shares between its routes: the guarded model, its config, metrics, locks and keys."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from guard.api import GuardedLLM
from guard.config import ServerConfig
from guard.server.metrics import Metrics
from guard.server.watch import StoreWatcher

if TYPE_CHECKING:  # limits imports errors, which imports this module
    from guard.server.limits import UpstreamLimiter


@dataclass
class ServerState:
    """Everything a request handler needs, built once by ``create_app`` and kept on ``app.state.guard``."""

    guarded: GuardedLLM
    config: ServerConfig
    metrics: Metrics
    limiter: UpstreamLimiter  # the upstream slots and their queue, held by the guarded model around target calls
    client_keys: list[str]
    admin_key: str | None
    # admin changes and store saves run one at a time (in worker threads)
    admin_lock: threading.Lock = field(default_factory=threading.Lock)
    watcher: StoreWatcher | None = None


async def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app serving this request (async, so it runs on the event loop)."""
    return request.app.state.guard  # type: ignore[no-any-return]


State = Annotated[ServerState, Depends(get_state)]  # a route's parameter type that receives the state
