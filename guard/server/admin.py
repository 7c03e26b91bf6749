"""Admin endpoints behind the admin key: list, add and remove forget targets at runtime.

Admin changes are serialised by a lock and, with ``store_path``, saved atomically before the response,
so concurrent changes are never lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from core.schema import ForgetTarget
from guard.server.errors import ApiError
from guard.server.schemas import _diagnose_body, _inline_schema, _lone_surrogate
from guard.server.state import ServerState, State
from guard.types import AdminError

log = logging.getLogger(__name__)

router = APIRouter()


def persist(st: ServerState) -> None:
    """Save the detector to ``store_path`` (atomically; the caller holds ``admin_lock``)."""
    cfg, watcher = st.config, st.watcher
    if cfg.store_path is None:
        return
    try:
        st.guarded.detector.save(cfg.store_path)  # type: ignore[attr-defined]
        if watcher is not None and cfg.store_path.resolve() == watcher.path.resolve():
            watcher.note_saved()
    except Exception as e:
        st.metrics.fault("store_save_error")
        log.error("saving the forget store to %s failed: %s: %s", cfg.store_path, e.__class__.__name__, e)
        raise ApiError(500, f"the change is live but saving the forget store failed ({e.__class__.__name__}: "
                       f"{e}); it will be lost on restart unless a later save succeeds", "store_save_error") from e


def add_locked(st: ServerState, targets: list[ForgetTarget]) -> None:
    """Add the targets all or none (ids must be new), then save; runs under the admin lock."""
    guarded = st.guarded
    with st.admin_lock:
        known = set(guarded.target_ids())
        taken = [t.id for t in targets if t.id in known]
        if taken:
            raise ApiError(409, f"forget target(s) {taken} already exist; DELETE them first or use new ids",
                           "conflict_error", "id", "target_exists")
        done: list[str] = []
        try:
            for t in targets:
                guarded.add_target(t)
                done.append(t.id)
        except Exception as e:
            for tid in done:
                guarded.remove_target(tid)
            if isinstance(e, AdminError):
                raise ApiError(501, str(e), "not_implemented") from e
            if isinstance(e, ValueError):
                raise ApiError(400, f"target {targets[len(done)].id!r} was refused: {e}", "invalid_request_error",
                               "targets") from e
            raise
        persist(st)


def remove_locked(st: ServerState, target_id: str) -> bool:
    """Remove one target, then save; runs under the admin lock."""
    with st.admin_lock:
        try:
            removed = st.guarded.remove_target(target_id)
        except AdminError as e:
            raise ApiError(501, str(e), "not_implemented") from e
        if removed:
            persist(st)
        return removed


# Route handlers carry no docstring: FastAPI would publish it as the operation's description in OpenAPI.

@router.get("/admin/targets")
async def list_targets(st: State) -> dict[str, Any]:
    return {"targets": st.guarded.target_ids()}


_target_schema = _inline_schema(ForgetTarget)


# The body is parsed by hand (one target or a list of them), so its schema is written into OpenAPI here.
@router.post("/admin/targets", status_code=201, openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [_target_schema, {"type": "array", "items": _target_schema, "minItems": 1}]}}}}})
async def add_targets(request: Request, st: State) -> JSONResponse:
    body = await request.body()
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, _diagnose_body(body), "invalid_request_error", "body", "invalid_body") from e
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ApiError(400, "no targets given: send a ForgetTarget object or a non-empty list of them",
                       "invalid_request_error", "targets")
    try:
        targets = [ForgetTarget.model_validate(x) for x in items]
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        raise ApiError(400, f"invalid target: {where}: {err['msg']}", "invalid_request_error", where) from e
    ids = [t.id for t in targets]
    if len(set(ids)) != len(ids):
        raise ApiError(400, f"duplicate target ids in one request: {sorted({i for i in ids if ids.count(i) > 1})}",
                       "invalid_request_error", "id")
    where = _lone_surrogate(items)
    if where is not None:
        raise ApiError(400, f"{where}: text holds a lone UTF-16 surrogate escape, which is not valid Unicode",
                       "invalid_request_error", where, "invalid_unicode")
    await asyncio.to_thread(add_locked, st, targets)
    log.info("admin added targets %s", ids)
    return JSONResponse({"added": ids}, status_code=201)


@router.delete("/admin/targets/{target_id}")
async def remove_target(target_id: str, st: State) -> dict[str, Any]:
    if not await asyncio.to_thread(remove_locked, st, target_id):
        raise ApiError(404, f"no forget target {target_id[:100]!r}", "not_found_error", "target_id")
    log.info("admin removed target %s", target_id)
    return {"removed": target_id}
