"""``unlearn-guard serve``: run the OpenAI-compatible guard proxy (local model, or in front of an upstream)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Serve a guarded LLM behind an OpenAI-compatible HTTP API.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
log = logging.getLogger(__name__)


def keys_of(api_keys: list[str] | None, admin_key: str | None) -> tuple[list[str], str | None]:
    """The client keys and the admin key from the flags, else the environment; an empty or blank key given
    either way is refused (ValueError naming where it came from, never the key): an empty client key would let
    in anyone who sends an empty Bearer token, and an empty admin key is a mistake, not "admin off"."""
    env_key, env_admin = os.environ.get("UNLEARN_GUARD_API_KEY"), os.environ.get("UNLEARN_GUARD_ADMIN_KEY")
    keys = list(api_keys or []) or ([env_key] if env_key is not None else [])
    admin = admin_key if admin_key is not None else env_admin
    src_keys = "--api-key" if api_keys else "$UNLEARN_GUARD_API_KEY"
    src_admin = "--admin-key" if admin_key is not None else "$UNLEARN_GUARD_ADMIN_KEY"
    for i, k in enumerate(keys):
        if not k.strip() or k != k.strip():
            what = "is empty or only whitespace" if not k.strip() else "starts or ends with whitespace"
            raise ValueError(f"{src_keys} (key {i + 1}) {what}; give a real key, or none to serve without client keys")
    if admin is not None and (not admin.strip() or admin != admin.strip()):
        what = "is empty or only whitespace" if not admin.strip() else "starts or ends with whitespace"
        raise ValueError(f"{src_admin} {what}; give a real key, or leave it unset to disable the admin endpoints")
    return keys, admin


def load_detector(path: Path, oracle: bool = False) -> Any:
    """Load a saved detector directory (``detectors.detector``), or an oracle detector from a task file."""
    if oracle:
        from core.schema import load_task
        from detectors.oracle import OracleDetector

        log.warning("using the ORACLE detector (names and questions of %s): for demos and tests only", path)
        return OracleDetector(load_task(path))
    from detectors.detector import load_detector as load

    return load(path)


@app.command()
def serve(
    detector: Annotated[Path, typer.Option("--detector", help="Saved detector directory (or a task file with --oracle).")],
    upstream: str | None = typer.Option(None, "--upstream", help="OpenAI-compatible base URL to guard, e.g. "
                                        "http://127.0.0.1:8001/v1; default: the local model in this process."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Local model (embedded name or HF dir), or "
                              "the model name sent upstream."),
    guard_model: str | None = typer.Option(None, "--guard-model", help="Guard LLM (default: the base embedded model "
                                           "for a local target that is another model, else the target)."),
    backend: str = typer.Option("transformers", "--backend", help="Local backend: transformers or vllm."),
    host: str | None = typer.Option(None, "--host", help="Bind address (default: server.host, else 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port (default: server.port, else 8000)."),
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Client key (repeatable); also $UNLEARN_GUARD_API_KEY.")] = None,
    admin_key: str | None = typer.Option(None, "--admin-key", help="Admin key; also $UNLEARN_GUARD_ADMIN_KEY."),
    upstream_key: str | None = typer.Option(None, "--upstream-key", help="Key sent upstream; also $UNLEARN_GUARD_UPSTREAM_KEY."),
    fail_open: bool | None = typer.Option(None, "--fail-open/--fail-closed", help="Let requests through when the "
                                          "detector or the guard model fails (logged at WARNING each time). "
                                          "Default: guard.fail_open, else fail closed."),
    output_check: str | None = typer.Option(None, "--output-check", help="off, log or block (default: "
                                            "guard.output_check, else block)."),
    guard_mode: str | None = typer.Option(None, "--guard-mode", help="llm (a guard LLM writes the instruction), "
                                          "template (the per-target template instruction; the target answers) or "
                                          "refuse (flagged prompts get the refusal); default: guard.guard_mode, "
                                          "else llm."),
    watch: bool = typer.Option(True, "--watch/--no-watch", help="Reload the forget store when --detector's directory "
                               "changes (an admin replica saving to it): polled every 0.25 s, fully re-checked every "
                               "server.watch_interval_s."),
    oracle: bool = typer.Option(False, "--oracle", help="--detector is a task file; use the oracle detector (demo)."),
    config: Annotated[Path | None, typer.Option("--config", help="YAML with 'guard:' and 'server:' sections.")] = None,
    expose_trace: bool | None = typer.Option(None, "--expose-trace", help="Add the guard trace to responses."),
) -> None:
    """Start the guard proxy; it serves until interrupted."""
    import uvicorn
    import yaml

    from core.config import ConfigError, load_config
    from guard.api import GuardedLLM
    from guard.backends import backend_config
    from guard.config import GuardConfig, ServerConfig
    from guard.server import create_app, set_malloc_mmap_threshold

    sections: dict[str, Any] = {}
    if config is not None:
        sections = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    try:
        keys, admin = keys_of(api_key, admin_key)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    # A flag given on the command line wins over the YAML; an omitted flag leaves the YAML (or the default).
    flags = {"fail_open": fail_open, "output_check": output_check, "guard_mode": guard_mode}
    server_flags = {"host": host, "port": port, "expose_trace": expose_trace,
                    "watch_store": detector if watch and not oracle and detector.is_dir() else None}
    server_flags.update(api_keys=keys or None, admin_key=admin)
    try:
        gcfg = load_config(GuardConfig, base={**sections.get("guard", {}),
                                              **{k: v for k, v in flags.items() if v is not None}})
        scfg = load_config(ServerConfig, base={**sections.get("server", {}),
                                               **{k: v for k, v in server_flags.items() if v is not None}})
    except ConfigError as e:  # e.g. an empty key in the YAML's server.api_keys (the message never shows a key)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    host, port = scfg.host, scfg.port
    if host not in {"127.0.0.1", "localhost", "::1"} and not scfg.api_keys:
        log.warning("serving on %s without client API keys: anyone who can reach it can use it", host)
    try:
        if upstream:
            target = backend_config(kind="openai", base_url=upstream, model=model,
                                    api_key=upstream_key or os.environ.get("UNLEARN_GUARD_UPSTREAM_KEY"))
        else:
            target = backend_config(kind=backend, model=model)
        guard_cfg = (backend_config(kind=backend if not upstream else "transformers", model=guard_model)
                     if guard_model else None)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        typer.echo(f"error: bad backend options (--backend, --upstream, --model): {e}", err=True)
        raise typer.Exit(2) from e
    set_malloc_mmap_threshold(scfg.malloc_mmap_threshold_kb)  # before the models allocate
    try:
        det = load_detector(detector, oracle)
    except (ValueError, OSError) as e:  # detectors.persistence.DetectorFormatError is a ValueError
        typer.echo(f"error: cannot load the forget store {detector}: {e}", err=True)
        raise typer.Exit(2) from e
    guarded = GuardedLLM(target, det, guard=guard_cfg, config=gcfg)
    api = create_app(guarded, scfg)
    log.info("guard proxy on http://%s:%d (upstream: %s, fail_open=%s, watching %s)", host, port,
             upstream or f"local {model}", gcfg.fail_open, scfg.watch_store or "nothing")
    uvicorn.run(api, host=host, port=port, log_level="info")


if __name__ == "__main__":
    app()
