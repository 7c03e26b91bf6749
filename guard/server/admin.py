"""Admin endpoints behind the admin key: list, add and remove forget targets at runtime, reload the store.

Admin changes are serialised by a lock and, with ``store_path``, saved atomically before the response,
so concurrent changes are never lost. A save never writes over a version this replica has not loaded:
when ``store_path`` holds a newer generation (another replica or an operator wrote it), or a store that
cannot be read (it may be being copied in), the change is answered 409 and memory and disk stay as they
were: the check runs before the change is made, and again just before the save, where a change already
made is undone in memory (an added target is removed; a removed one comes back with its names and
policy, its question-and-answer embeddings only after a reload). ``POST /admin/store/reload`` loads the
store on disk now; with ``{"force": true}`` also an older or foreign one.

Replicas that share ``store_path`` on one volume also save one at a time: the last check and the save
run under an exclusive ``flock`` on ``.<store>.lock`` beside the directory (:func:`writer_lock`), so a
second writer's change is answered 409 instead of silently dropping the first one's. One writer is the
intended set-up (README, "Several replicas"); the lock makes a second one safe, not fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.io import WriterLockTimeout
from core.io import writer_lock as _dir_writer_lock
from core.schema import ForgetTarget
from guard.server.errors import ApiError
from guard.server.schemas import _diagnose_body, _inline_schema, _lone_surrogate
from guard.server.state import ServerState, State
from guard.server.watch import StoreWatcher, other_content, served_store
from guard.types import AdminError

log = logging.getLogger(__name__)

router = APIRouter()

WRITER_LOCK_TIMEOUT_S = 30.0  # how long a save waits for another replica's save before answering 409


@contextlib.contextmanager
def writer_lock(path: Path, timeout_s: float = WRITER_LOCK_TIMEOUT_S) -> Iterator[None]:
    """:func:`core.io.writer_lock` on the store (the lock the CLI's store commands take too), answering 409 when
    another process holds it for over ``timeout_s``."""
    try:
        with _dir_writer_lock(path, timeout_s):
            yield
    except WriterLockTimeout:
        raise ApiError(409, f"not saved: another process has been saving {path} for over {timeout_s:g} s; "
                       "repeat the change later", "conflict_error", None, "store_locked") from None


def disk_conflict(st: ServerState) -> str | None:
    """Why saving to ``store_path`` now would overwrite a version this replica has not loaded, or None."""
    path = st.config.store_path
    if path is None or not (path / "manifest.json").is_file():
        return None  # nothing there yet (or not a directory: the save itself reports that)
    from detectors.persistence import DetectorFormatError, read_store_header

    try:
        disk = read_store_header(path)
    except DetectorFormatError as e:
        return f"the store in {path} cannot be read ({e.problem}; it may be being copied in)"
    served = served_store(st.guarded)
    if disk.generation > served.generation:
        return f"{path} holds generation {disk.generation}, newer than generation {served.generation} served here"
    if other_content(disk, served):
        return f"{path} holds another store of generation {disk.generation}, the generation served here"
    return None


def check_disk(st: ServerState) -> None:
    """Refuse (409) an admin change that could not be saved without overwriting a newer store; admin lock held."""
    why = disk_conflict(st)
    if why is None:
        return
    st.metrics.fault("store_save_conflict")
    log.error("admin change refused, not saved: %s", why)
    raise ApiError(409, f"not changed and not saved: {why}. Load it first (POST /admin/store/reload), then repeat "
                   "the change", "conflict_error", None, "store_newer_on_disk")


def persist(st: ServerState, undo: Callable[[], None] | None = None) -> None:
    """Save the detector to ``store_path`` (atomically; the caller holds ``admin_lock``).

    When a newer store reached the disk since :func:`check_disk` ran, ``undo`` reverts the change in
    memory and the request is answered 409, so memory and disk do not diverge.
    """
    cfg = st.config
    if cfg.store_path is None:
        return
    try:
        with writer_lock(cfg.store_path):  # no other replica saves between this check and this save
            check_disk(st)
            save(st, cfg.store_path)
    except ApiError as e:
        if undo is not None and e.status == 409:
            try:
                undo()
            except Exception as ue:  # noqa: BLE001 - the 409 is answered either way; the log says what is live
                log.error("undoing the refused admin change failed (%s: %s); it stays live but unsaved",
                          ue.__class__.__name__, ue)
        raise


def save(st: ServerState, path: Path) -> None:
    """Write the detector to ``path`` and tell this replica's watcher it wrote that version (500 when it fails)."""
    watcher = st.watcher
    try:
        st.guarded.detector.save(path)  # type: ignore[attr-defined]
        if watcher is not None and path.resolve() == watcher.path.resolve():
            watcher.note_saved()
    except Exception as e:
        st.metrics.fault("store_save_error")
        log.error("saving the forget store to %s failed: %s: %s", path, e.__class__.__name__, e)
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
        check_disk(st)
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

        def undo() -> None:
            for tid in done:
                guarded.remove_target(tid)

        persist(st, undo)


def remove_locked(st: ServerState, target_id: str) -> bool:
    """Remove one target, then save; runs under the admin lock."""
    guarded = st.guarded
    with st.admin_lock:
        check_disk(st)
        stored = getattr(guarded.detector, "target", None) if st.config.store_path is not None else None
        try:
            spare = stored(target_id) if callable(stored) else None  # names and policy, to undo a refused save
        except Exception:  # noqa: BLE001 - unknown id, or a detector that cannot say: nothing to undo with
            spare = None
        try:
            removed = guarded.remove_target(target_id)
        except AdminError as e:
            raise ApiError(501, str(e), "not_implemented") from e
        if removed:
            persist(st, undo=None if spare is None else lambda: guarded.add_target(spare))
        return removed


def store_watcher(st: ServerState) -> StoreWatcher | None:
    """The watcher that reloads this replica's store: the app's own, else a one-off one on ``store_path``."""
    if st.watcher is not None:
        return st.watcher
    if st.config.store_path is None:
        return None
    return StoreWatcher(st.guarded, st.config.store_path, st.config.watch_interval_s, st.metrics, st.admin_lock)


class ReloadRequest(BaseModel):
    """Body of ``POST /admin/store/reload`` (optional)."""

    model_config = ConfigDict(extra="forbid")
    force: bool = Field(False, strict=True, description="Load the store on disk even when its generation is older "
                        "than the one served, or it was built for another task (logged and counted).")


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


@router.post("/admin/store/reload")
async def reload_store(st: State, body: ReloadRequest | None = None) -> dict[str, Any]:
    force = body is not None and body.force
    watcher = store_watcher(st)
    if watcher is None:
        raise ApiError(400, "this replica has no store directory to reload: set server.watch_store or "
                       "server.store_path", "invalid_request_error", None, "no_store")
    if force:
        log.warning("admin forced a reload of the forget store from %s", watcher.path)
    res = await asyncio.to_thread(watcher.reload, force)
    if res.outcome == "refused":
        raise ApiError(409, f"{res.message}; still serving generation {res.generation}. Send {{\"force\": true}} to "
                       "load it anyway", "conflict_error", "force", res.fault)
    if res.outcome == "failed":
        raise ApiError(503, f"{res.message}; still serving generation {res.generation}", "store_reload_error",
                       headers={"Retry-After": str(max(1, round(watcher.interval_s)))})
    return {"outcome": res.outcome, "generation": res.generation, "message": res.message, "forced": force}


@router.delete("/admin/targets/{target_id}")
async def remove_target(target_id: str, st: State) -> dict[str, Any]:
    if not await asyncio.to_thread(remove_locked, st, target_id):
        raise ApiError(404, f"no forget target {target_id[:100]!r}", "not_found_error", "target_id")
    log.info("admin removed target %s", target_id)
    return {"removed": target_id}
