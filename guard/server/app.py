"""Assembly of the proxy: ``create_app`` builds the shared state and wires middleware, errors, auth and routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from guard.api import GuardedLLM
from guard.config import ServerConfig
from guard.server import admin, health, openai
from guard.server.auth import admin_auth, client_auth
from guard.server.errors import install_error_handlers
from guard.server.limits import BodyLimit
from guard.server.metrics import Metrics
from guard.server.state import ServerState
from guard.server.watch import StoreWatcher


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


def build_state(guarded: GuardedLLM, cfg: ServerConfig) -> ServerState:
    """The state one app shares between its routes (keys unwrapped, store watcher set up when configured)."""
    if cfg.store_path is not None and not callable(getattr(guarded.detector, "save", None)):
        raise ValueError(f"store_path is set but detector {type(guarded.detector).__name__} has no save(); use a "
                         "detectors.detector.Detector or unset store_path")
    st = ServerState(guarded=guarded, config=cfg, metrics=Metrics(), sem=asyncio.Semaphore(cfg.max_concurrency),
                     client_keys=[k.get_secret_value() for k in cfg.api_keys],
                     admin_key=cfg.admin_key.get_secret_value() if cfg.admin_key else None)
    if cfg.watch_store is not None:
        st.watcher = StoreWatcher(guarded, cfg.watch_store, cfg.watch_interval_s, st.metrics, st.admin_lock)
    return st


def create_app(guarded: GuardedLLM, config: ServerConfig | None = None) -> FastAPI:
    """Build the proxy app around a GuardedLLM (the guarded model may itself be an upstream server)."""
    cfg = config or ServerConfig()
    st = build_state(guarded, cfg)
    app = FastAPI(title="unlearn-guard proxy", version="0.1.0", lifespan=lifespan)
    app.state.guard = st
    # kept for callers that read them off the app (cli tests, benches)
    app.state.store_watcher, app.state.guarded, app.state.config, app.state.metrics = st.watcher, guarded, cfg, st.metrics
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)  # type: ignore[arg-type]
    install_openapi(app, cfg)
    install_error_handlers(app, st)
    app.include_router(openai.router, dependencies=[Depends(client_auth)])
    app.include_router(health.router)
    app.include_router(admin.router, dependencies=[Depends(admin_auth)])
    return app
