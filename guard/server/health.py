"""Operations endpoints: ``/healthz`` (alive) and ``/readyz`` (can serve), open without a key, and ``/metrics``
(Prometheus), which needs a client key when keys are configured unless ``public_metrics`` is set.

Where the store is watched or written (``watch_store``, ``store_path``), ``/readyz`` also reports it:
``store: {generation, task, pending_reload, last_reload_error, refused}``. A pending or failed reload,
or a refused (older or foreign) version on disk, does not make ``/readyz`` answer 503: the replica
still enforces the store it serves, which is safe, and taking it out of rotation would only drop
capacity; operators alert on ``pending_reload`` / ``guard_store_reload_pending`` and on the
``store_*_refused`` faults instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guard.server.state import ServerState, State
from guard.server.watch import served_store

log = logging.getLogger(__name__)

router = APIRouter()


def probe(st: ServerState) -> str | None:
    """The first part that cannot serve ('backend' or 'detector'), or None when all can."""
    guarded = st.guarded
    if not guarded.ready():
        return "backend"
    det = guarded.detector
    own = getattr(det, "ready", None)
    try:
        ok = bool(own()) if callable(own) else det.detect("readiness probe") is not None
    except Exception as e:  # noqa: BLE001 - a detector that cannot judge makes every request fail closed
        log.warning("readiness: detector failed (%s)", e.__class__.__name__)
        ok = False
    return None if ok else "detector"


def store_status(st: ServerState) -> dict[str, Any]:
    """The served store's generation and task, and any pending or refused reload (from the watcher, if any)."""
    if st.watcher is not None:
        return st.watcher.status()
    served = served_store(st.guarded)
    return {"generation": served.generation, "task": served.task, "pending_reload": False,
            "last_reload_error": None, "refused": None}


# Route handlers carry no docstring: FastAPI would publish it as the operation's description in OpenAPI.

@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(st: State) -> JSONResponse:
    try:
        failed = await asyncio.wait_for(asyncio.to_thread(probe, st), timeout=5.0)
    except Exception:  # noqa: BLE001 - any failure (or a late probe) means not ready
        failed = "probe"
    extra = {"store": store_status(st)} if st.watcher is not None or st.config.store_path is not None else {}
    if failed is None:
        return JSONResponse({"status": "ready", **extra})
    return JSONResponse({"status": "not ready", "failed": failed, **extra}, status_code=503)


@router.get("/metrics")
async def prometheus(st: State) -> Response:
    store = store_status(st)
    st.metrics.store_generation.set(store["generation"])
    st.metrics.store_reload_pending.set(1 if store["pending_reload"] else 0)
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
