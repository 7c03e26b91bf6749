"""The ``unlearn-guard`` command line: one typer app, one sub-app per area."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(help="Make an LLM forget specific knowledge and prove how well it forgot.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    """Configure logging once for every subcommand."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    """Attach the sub-apps (imported here so that `--help` stays cheap)."""
    from cli import compare, core_cmds, detector, serve, train

    core_cmds.register(app)
    compare.register(app)
    app.add_typer(detector.app, name="detector")
    app.command("serve")(serve.serve)
    for cmd in train.app.registered_commands:
        app.command(cmd.name)(cmd.callback)


_register()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
