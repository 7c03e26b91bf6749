"""Assembly of the proxy: ``create_app`` builds the shared state and wires middleware, errors, auth and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from guard.api import GuardedLLM
from guard.config import ServerConfig
from guard.server import admin, health, openai
from guard.server.auth import admin_auth, client_auth, ops_auth
from guard.server.errors import install_error_handlers
from guard.server.limits import BodyLimit, UpstreamLimiter
from guard.server.metrics import Metrics
from guard.server.state import ServerState
from guard.server.watch import StoreWatcher

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the store watcher (when there is one) for as long as the app serves."""
    watcher = app.state.guard.watcher
    task = asyncio.create_task(watcher.run()) if watcher is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def install_openapi(app: FastAPI, cfg: ServerConfig) -> None:
    """Publish this server's limits (max_tokens cap, message count) in its OpenAPI schema."""

    def openapi() -> dict[str, Any]:
        """The OpenAPI schema with this server's limits (max_tokens cap, message count) filled in."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = comps.get(name, {}).get("properties", {})
                for field in ("max_tokens", "max_completion_tokens"):
                    for branch in props.get(field, {}).get("anyOf", []):
                        if branch.get("type") == "integer":
                            branch["maximum"] = cfg.max_tokens_cap
                if "messages" in props:
                    props["messages"]["maxItems"] = cfg.max_messages
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def docs_router(app: FastAPI) -> APIRouter:
    """``/openapi.json``, ``/docs`` and ``/redoc`` as ordinary routes, so they can sit behind ``ops_auth``."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return router


def build_state(guarded: GuardedLLM, cfg: ServerConfig) -> ServerState:
    """The state one app shares between its routes (keys unwrapped, store watcher set up when configured)."""
    if cfg.store_path is not None and not callable(getattr(guarded.detector, "save", None)):
        raise ValueError(f"store_path is set but detector {type(guarded.detector).__name__} has no save(); use a "
                         "detectors.detector.Detector or unset store_path")
    metrics = Metrics()
    limiter = UpstreamLimiter(cfg.max_concurrency, cfg.queue_limit, cfg.retry_after_s, on_shed=metrics.shed.inc)
    if guarded.upstream_slot is not contextlib.nullcontext:
        log.info("this GuardedLLM already served another app: its upstream slots are now this app's")
    guarded.upstream_slot = limiter.slot  # target calls hold a slot; refusals decided before them never wait
    st = ServerState(guarded=guarded, config=cfg, metrics=metrics, limiter=limiter,
                     client_keys=[k.get_secret_value() for k in cfg.api_keys],
                     admin_key=cfg.admin_key.get_secret_value() if cfg.admin_key else None)
    if cfg.watch_store is not None:
        st.watcher = StoreWatcher(guarded, cfg.watch_store, cfg.watch_interval_s, st.metrics, st.admin_lock)
    return st


def create_app(guarded: GuardedLLM, config: ServerConfig | None = None) -> FastAPI:
    """Build the proxy app around a GuardedLLM (the guarded model may itself be an upstream server)."""
    cfg = config or ServerConfig()
    st = build_state(guarded, cfg)
    # the docs are served by docs_router, behind the same key as /metrics (ServerConfig.public_docs)
    app = FastAPI(title="unlearn-guard proxy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.guard = st
    # kept for callers that read them off the app (cli tests, benches)
    app.state.store_watcher, app.state.guarded, app.state.config, app.state.metrics = st.watcher, guarded, cfg, st.metrics
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)  # type: ignore[arg-type]
    install_openapi(app, cfg)
    install_error_handlers(app, st)
    app.include_router(openai.router, dependencies=[Depends(client_auth)])
    app.include_router(health.router, dependencies=[Depends(ops_auth)])
    app.include_router(docs_router(app), dependencies=[Depends(ops_auth)])
    app.include_router(admin.router, dependencies=[Depends(admin_auth)])
    return app
