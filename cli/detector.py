"""``unlearn-guard detector``: build, evaluate and update the forget-target detector.

    unlearn-guard detector build --task offline --out runs/detector
    unlearn-guard detector build --task offline --out runs/det-fold0 --holdout-fold 0   # for `eval`
    unlearn-guard detector eval --task offline --json runs/detector-eval.json            # request -> held-out
    unlearn-guard detector eval --task offline --mode cross-fit                          # 4-fold cross-fit
    unlearn-guard detector eval --detector runs/det-fold0 --task offline                 # its held-out fold
    unlearn-guard detector add-target --detector runs/detector --targets new.jsonl

``--task`` is a task file (``core.schema.save_task``) or a spec: ``offline``, ``offline:seed=N``,
``tofu:forget01`` (see ``eval.tasks.spec.load_task_spec``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from core.io import WriterLockTimeout, writer_lock
from eval.tasks.spec import load_task_spec

log = logging.getLogger(__name__)

app = typer.Typer(help="Build, evaluate and update the calibrated forget-target detector.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

_SET_HELP = "DetectorConfig override key=value (repeatable), e.g. --set top_k=32 --set keep_raw_text=true."


def _config(config: Path | None, overrides: list[str] | None, target_fpr: float | None) -> Any:
    """DetectorConfig from an optional YAML file, --set overrides and --target-fpr."""
    from core.config import load_config
    from detectors.config import DetectorConfig

    extra = [f"target_fpr={target_fpr}"] if target_fpr is not None else []
    return load_config(DetectorConfig, config, [*(overrides or []), *extra])


STORE_LOCK_TIMEOUT_S = 60.0
"""How long a command that writes a detector directory waits for another writer (a proxy replica's admin save, another
command) before giving up; the lock is the proxy's (``.<dir>.lock`` beside the directory)."""


def _fail(e: Exception) -> typer.Exit:
    """Print a one-line error and return the exit to raise (status 2)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _calibration_table(det: Any) -> str:
    """The calibration report of both channels as a small table."""
    lines = [f"{'channel':8} {'threshold':>10} {'conformal':>10} {'calib FPR':>10} {'LOO TPR':>8} {'negatives':>10}"]
    for ch, rep in det.calibration.items():
        lines.append(f"{ch:8} {rep.threshold:10.4f} {rep.conformal_threshold or rep.threshold:10.4f} "
                     f"{rep.fpr_calibration:10.4f} {rep.tpr or 0.0:8.4f} {rep.n_negatives:10d}")
    lines += [f"{ch}: {rep.guarantee_note()}" for ch, rep in det.calibration.items()]
    return "\n".join(lines)


@app.command()
def build(
    task: Annotated[str, typer.Option("--task", help="Task file or spec (offline, offline:seed=N, tofu:forget01).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the detector to (atomically).")],
    target_fpr: Annotated[float, typer.Option("--target-fpr", help="False-positive rate the threshold guarantees.")] = 0.01,
    holdout_fold: Annotated[int | None, typer.Option("--holdout-fold", help="Build on the training split of this "
                                                     "fold, so `eval --detector` reports on unseen items.")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Folds of the hold-out split.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the hold-out split.")] = 0,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with DetectorConfig fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
) -> None:
    """Build a detector from a task: store, index, classifier, calibrated threshold; save it."""
    from tqdm.auto import tqdm

    from detectors.detector import Detector
    from detectors.encoder import Encoder
    from detectors.evaluation import split_fold, task_fingerprint

    bar = tqdm(total=4, desc="detector build", unit="step")
    try:
        cfg = _config(config, set_, target_fpr)
        bar.set_postfix_str("task")
        t = load_task_spec(task)
        bar.update()
        bar.set_postfix_str("encoder")
        enc = Encoder.from_config(cfg)
        bar.update()
        bar.set_postfix_str("store + classifier")
        if holdout_fold is not None:
            split = split_fold(t, holdout_fold, folds, seed, cfg.builtin_benign)
            det = Detector.build(split.train_task, cfg, enc, negatives=split.train_negatives)
            det.meta["holdout"] = {"fingerprint": task_fingerprint(t), "fold": holdout_fold, "folds": folds,
                                   "seed": seed, "task": t.name}
        else:
            det = Detector.build(t, cfg, enc)
        bar.update()
        bar.set_postfix_str("save")
        with writer_lock(out, STORE_LOCK_TIMEOUT_S):
            det.save(out)
        bar.update()
    except (ValueError, FileNotFoundError, KeyError, WriterLockTimeout) as e:
        raise _fail(e) from e
    finally:
        bar.close()
    typer.echo(f"detector for task {t.name!r}: {len(det.target_ids)} targets, built in "
               f"{det.meta.get('build_seconds', 0):.1f}s -> {out}")
    typer.echo(_calibration_table(det))


@app.command("eval")
def eval_(
    task: Annotated[str, typer.Option("--task", help="Task file or spec.")],
    mode: Annotated[str, typer.Option("--mode", help="'split' (default): build from the comparison's forget "
                                      "request, score (a) the request, (b) held-out questions about the targets, "
                                      "(c) held-out people and questions; 'cross-fit': K folds over facts.")] = "split",
    detector: Annotated[Path | None, typer.Option("--detector", help="Evaluate this saved detector on its held-out "
                                                  "fold (built with `build --holdout-fold`) instead.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Folds of the cross-fit.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split (or of the cross-fit).")] = 0,
    request_fraction: Annotated[float, typer.Option("--request-fraction", help="Split: share of each target's "
                                                    "facts in the request.")] = 0.5,
    target_fpr: Annotated[float | None, typer.Option("--target-fpr", help="Target FPR of the built detector(s).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with DetectorConfig fields.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
) -> None:
    """Held-out TPR per forget group, FPR per negative group (neighbour, retain, benign, general) and AUROC."""
    from tqdm.auto import tqdm

    from core.io import atomic_write_json
    from detectors.detector import Detector
    from detectors.evaluation import cross_validate, evaluate_detector

    if mode not in ("split", "cross-fit"):
        raise _fail(ValueError(f"--mode {mode!r}: accepted values are 'split' and 'cross-fit'"))
    try:
        t = load_task_spec(task)
        if detector is not None:
            det = Detector.load(detector)
            report = evaluate_detector(det, t)
        elif mode == "split":
            from eval.detector_eval import split_detector_eval
            from eval.split import SplitConfig

            cfg = _config(config, set_, target_fpr)
            report, split = split_detector_eval(t, cfg, SplitConfig(seed=seed, request_fraction=request_fraction))
            typer.echo(f"split: {split.counts()}")
        else:
            cfg = _config(config, set_, target_fpr)
            with tqdm(total=folds, desc="cross-fit", unit="fold") as bar:
                report = cross_validate(t, cfg, folds=folds, seed=seed, progress=lambda i, n: bar.update())
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise _fail(e) from e
    typer.echo(report.table())
    if json_out is not None:
        atomic_write_json(json_out, report.model_dump(mode="json"))
        typer.echo(f"metrics written to {json_out}")


@app.command("add-target")
def add_target(
    detector: Annotated[Path, typer.Option("--detector", help="Saved detector directory (updated in place).")],
    targets: Annotated[Path, typer.Option("--targets", help="Targets as .jsonl (one per line) or .json.")],
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Also retrain and recalibrate.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of in place.")] = None,
) -> None:
    """Add (or replace, when the id exists) forget targets in a saved detector and save it."""
    from core.schema import load_targets
    from detectors.detector import Detector

    try:
        new = load_targets(targets)
        # Read, change and save under the store's writer lock: a replica's admin save or another command in between
        # would otherwise be overwritten by a detector loaded before it.
        with writer_lock(out or detector, STORE_LOCK_TIMEOUT_S):
            det = Detector.load(detector)
            t0 = time.perf_counter()
            for tg in new:
                (det.update_target if tg.id in det.target_ids else det.add_target)(tg)
            if refit:
                det.fit()
            seconds = time.perf_counter() - t0
            det.save(out or detector)
    except (ValueError, FileNotFoundError, KeyError, WriterLockTimeout) as e:
        raise _fail(e) from e
    typer.echo(f"{len(new)} target(s) added in {seconds:.2f}s ({'refit' if refit else 'no refit'}); "
               f"now {len(det.target_ids)}: {', '.join(det.target_ids)} -> {out or detector}")


@app.command("remove-target")
def remove_target(
    detector: Annotated[Path, typer.Option("--detector", help="Saved detector directory (updated in place).")],
    target_id: Annotated[str, typer.Option("--id", help="Id of the target to remove.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of in place.")] = None,
) -> None:
    """Remove a forget target from a saved detector and save it."""
    from detectors.detector import Detector

    try:
        with writer_lock(out or detector, STORE_LOCK_TIMEOUT_S):  # read, change and save as one writer (add-target)
            det = Detector.load(detector)
            det.remove_target(target_id)
            det.save(out or detector)
    except (ValueError, FileNotFoundError, KeyError, WriterLockTimeout) as e:
        raise _fail(e) from e
    typer.echo(f"removed {target_id}; now {len(det.target_ids)} target(s) -> {out or detector}")
