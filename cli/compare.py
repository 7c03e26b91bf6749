"""The comparison commands: `compare` (any config) and `demo` (the main job on the embedded defaults)."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def _run(cfg_obj) -> None:  # noqa: ANN001 - eval.compare.CompareConfig
    """Run a comparison, print the table and say where the report is."""
    from eval.compare import run_comparison

    t0 = time.perf_counter()
    report, paths = run_comparison(cfg_obj)
    typer.echo(paths["report.md"].read_text().split("## Sample answers")[0])
    typer.echo(f"wall time: {time.perf_counter() - t0:.0f} s")
    typer.echo("report: " + ", ".join(str(p) for p in paths.values()))


def compare(config: Path | None = typer.Option(None, help="YAML CompareConfig."),
            set_: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set methods=[rmu,tru]; "
                                                             "--set generator=vllm answers with the guard's vLLM "
                                                             "backend (default transformers)."),
            out: Path | None = typer.Option(None, help="Report directory (default runs/compare).")) -> None:
    """Compare the guard, unlearned weights and both on one task under one attack suite; write the report."""
    from core.config import load_config
    from eval.compare import CompareConfig
    from eval.systems import check_generator

    cfg = load_config(CompareConfig, config, set_ + ([f"out={out}"] if out else []))
    try:
        check_generator(cfg.generator)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--set generator") from None
    _run(cfg)


def demo(full: bool = typer.Option(False, "--full", help="The main methods, the trained guard and more items "
                                                        "(about 45 min warm; every method: "
                                                        "compare --set profile=all-methods)."),
         out: Path = typer.Option(Path("runs/demo"), help="Report directory.")) -> None:
    """The main job: fine-tune (or reuse), detector, RMU + NPO, guard, attacks, report, on the embedded defaults."""
    from eval.compare import CompareConfig

    _run(CompareConfig(profile="full" if full else "default", out=str(out)))


def _echo_tables(tables) -> None:  # noqa: ANN001 - list[eval.report.ReportTable]
    """Print each section table with its legend."""
    from eval.report import md_table

    for t in tables:
        typer.echo(f"{t.title}\n\n{t.legend}.\n\n{md_table(t.rows)}\n")


def worst_case(method: str = typer.Option(..., "--method", help="Unlearning method (training.methods)."),
               k: int = typer.Option(5, "--k", help="Size of the forget subset (QA items of the request)."),
               rounds: int = typer.Option(2, help="Bi-level rounds (one unlearning run each)."),
               config: Path | None = typer.Option(None, help="YAML CompareConfig (task, split, method_params)."),
               set_: list[str] = typer.Option([], "--set", help="Override a CompareConfig field, e.g. "
                                                                "--set worst_case.w_lr=1.0 --set task=offline:seed=1."),
               out: Path = typer.Option(Path("runs/worst-case"), help="Output directory.")) -> None:
    """Find the forget subset a method erases worst (arXiv 2403.07362) and score it beside a random subset."""
    from core.config import load_config
    from core.registry import UnknownNameError
    from eval.compare import CompareConfig, run_sections
    from training.methods import METHODS

    try:
        METHODS.get(method)
    except UnknownNameError as e:
        raise typer.BadParameter(str(e), param_hint="--method") from None
    cfg = load_config(CompareConfig, config, [*set_, f"out={out}"])
    wc = (cfg.worst_case.model_dump() if cfg.worst_case else {}) | {"methods": [method], "k": k, "rounds": rounds}
    from eval.worst_case import WorstCaseConfig

    cfg = cfg.model_copy(update={"worst_case": WorstCaseConfig.model_validate(wc)})
    t0 = time.perf_counter()
    try:
        tables, paths = run_sections(cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _echo_tables(tables)
    typer.echo(f"wall time: {time.perf_counter() - t0:.0f} s; written: " + ", ".join(str(p) for p in paths.values()))


def robustness(methods: str = typer.Option("rmu,npo,simnpo,wga", help="Comma-separated unlearning methods."),
               options: str = typer.Option("plain,sam,hybrid,gru", help="Comma-separated: plain and training.optim "
                                                                       "presets."),
               config: Path | None = typer.Option(None, help="YAML CompareConfig (task, split, method_params)."),
               set_: list[str] = typer.Option([], "--set", help="Override a CompareConfig field, e.g. "
                                                                "--set robustness.retain_ratio=0.95."),
               out: Path = typer.Option(Path("runs/robustness"), help="Output directory.")) -> None:
    """The calibrated robustness table alone: each method x option, mixed to one retain score, then attacked."""
    from pydantic import ValidationError

    from core.config import load_config
    from eval.compare import CompareConfig, run_sections
    from eval.robustness import RobustnessConfig

    cfg = load_config(CompareConfig, config, [*set_, f"out={out}"])
    fields = (cfg.robustness.model_dump() if cfg.robustness else {}) | {
        "methods": [m.strip() for m in methods.split(",") if m.strip()],
        "options": [o.strip() for o in options.split(",") if o.strip()]}
    try:
        cfg = cfg.model_copy(update={"robustness": RobustnessConfig.model_validate(fields)})
    except ValidationError as e:
        raise typer.BadParameter(str(e), param_hint="--options") from None
    t0 = time.perf_counter()
    tables, paths = run_sections(cfg)
    _echo_tables(tables)
    typer.echo(f"wall time: {time.perf_counter() - t0:.0f} s; written: " + ", ".join(str(p) for p in paths.values()))


def register(app: typer.Typer) -> None:
    """Attach `compare`, `demo`, `worst-case` and `robustness` to the root app."""
    app.command("compare")(compare)
    app.command("demo")(demo)
    app.command("worst-case")(worst_case)
    app.command("robustness")(robustness)
