"""Operations endpoints, open without a key: ``/healthz`` (alive), ``/readyz`` (can serve) and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guard.server.state import ServerState, State

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
    if failed is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready", "failed": failed}, status_code=503)


@router.get("/metrics")
async def prometheus(st: State) -> Response:
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)
