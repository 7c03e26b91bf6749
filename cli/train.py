"""Training commands: ``train`` (any unlearning method), ``train-guard`` (guard SFT), ``mix`` (model mixing)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from core.models import run_dir
from eval.tasks.spec import load_task_spec

log = logging.getLogger(__name__)

app = typer.Typer(help="Unlearning methods, guard fine-tuning and model-mixing calibration.", no_args_is_help=True)

_EMBEDDED = "smollm2-135m-instruct"


def _default_model(task_name: str) -> str:
    """The fine-tuned target of the task if one exists, else the embedded model."""
    target = run_dir(task_name, "target")
    return str(target) if (target / "config.json").exists() else _EMBEDDED


_EVAL_SETS = (("forget (a)", "in_request"), ("forget (b)", "unseen_fact"), ("retain (c)", "retain"),
              ("neighbour (c)", "neighbour"))


def _rouge_sets(llm, split, max_new_tokens: int, max_items: int = 40) -> dict[str, float | None]:  # noqa: ANN001
    """ROUGE-L recall of a loaded model on the split's request (a), held-out unseen facts (b) and held-out people (c)."""
    from eval.metrics.qa import answer_rouge

    items = {"in_request": split.in_request, "unseen_fact": split.held_out.get("unseen_fact", []),
             "retain": split.negatives.get("retain", []), "neighbour": split.negatives.get("neighbour", [])}
    out: dict[str, float | None] = {}
    for label, key in _EVAL_SETS:
        qs = [q for q in items[key] if q.kind in ("fact", "knowmem")][:max_items]
        out[label] = round(answer_rouge(llm, qs, max_new_tokens=max_new_tokens).value, 4) if qs else None
    return out


@app.command("train")
def train_cmd(
    method: str | None = typer.Option(None, help="Unlearning method (default: the config's, else rmu)."),
    model: str | None = typer.Option(None, help="Model spec (default: the task's fine-tuned target, else embedded)."),
    task: str = typer.Option("offline", help="Task spec: offline[:seed=N], tofu:forget05, or a task file."),
    out: Annotated[Path | None, typer.Option(help="Output dir (default: the cache's runs/<task>/unlearn-<method>).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML UnlearnConfig (method params under `params:`).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field, e.g. --set params.layer=7 "
                                                                 "--set train.lr=1e-4 --set optim.rectify=gru "
                                                                 "--set optim.mask=salun:0.5.")] = None,
    evaluate: bool = typer.Option(False, "--eval", help="Unlearn the comparison's forget request only and report "
                                                         "ROUGE-L before and after on (a) the request's questions, (b) "
                                                         "held-out facts, (c) held-out people."),
    split_seed: int = typer.Option(0, help="Seed of the request / held-out split used by --eval."),
    eval_max_tokens: int = typer.Option(48, help="Answer length cap for --eval."),
) -> None:
    """Unlearn a task's forget targets with one method; the effective config is saved beside the checkpoint.

    With ``--eval`` the method receives only the forget request of the task's split (as in ``compare``), so the
    held-out figures are about facts and people it never saw.
    """
    from core.config import load_config, save_config
    from core.models import load_llm
    from core.registry import UnknownNameError
    from training.loop import is_main_process
    from training.methods import METHODS
    from training.unlearn import UnlearnConfig, effective_train, unlearn

    cfg = load_config(UnlearnConfig, config, set_ or [])
    name = method or cfg.method
    try:
        spec = METHODS.get(name)
    except UnknownNameError as e:
        raise typer.BadParameter(str(e), param_hint="--method") from None
    t = load_task_spec(task)
    split = None
    if evaluate:
        from eval.general import general_items_for
        from eval.split import SplitConfig, split_task

        split = split_task(t, SplitConfig(seed=split_seed), general_items_for(t))
    model_spec = model or (cfg.model if "model" in cfg.model_fields_set else _default_model(t.name))
    cfg = cfg.model_copy(update={"method": name, "model": model_spec, "train": effective_train(spec, cfg.train),
                                 "params": spec.config.model_validate(cfg.params).model_dump(mode="json")})
    out_dir = out or run_dir(t.name, f"unlearn-{name}" + ("" if split is None else f"-request{split_seed}"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir.with_name(out_dir.name + ".config.yaml"))
    llm = load_llm(model_spec)
    typer.echo(f"{name}: {spec.summary}; model {model_spec} ({llm.num_layers} layers), task {t.name}, out {out_dir}")
    row: dict = {"method": name, "model": model_spec, "out_dir": str(out_dir)}
    main = is_main_process()  # under accelerate launch the main process alone evaluates and reports
    if split is not None and main:
        row["split"] = split.counts()
        row["before"] = _rouge_sets(llm, split, eval_max_tokens)
    t0 = time.perf_counter()
    res = unlearn(llm.model, llm.tokenizer, t if split is None else split.request, cfg, out_dir)
    if not main:
        return
    row.update({"wall_seconds": round(time.perf_counter() - t0, 1), "steps": res.train.steps,
                "train_seconds": round(res.train.seconds, 1), "final_terms": res.train.final_terms, "info": res.info})
    if split is not None:
        row["after"] = _rouge_sets(load_llm(str(out_dir)), split, eval_max_tokens)
        labels = [label for label, _ in _EVAL_SETS]
        typer.echo("ROUGE-L recall " + " ".join(f"{x:>14}" for x in labels))
        for when in ("before", "after"):
            typer.echo(f"{when:14} " + " ".join(f"{'-' if row[when][x] is None else row[when][x]:>14}" for x in labels))
    typer.echo(json.dumps(row, indent=1, default=str))


@app.command("train-guard")
def train_guard_cmd(
    task: str = typer.Option("offline", help="Task spec whose targets the guard protects."),
    model: str | None = typer.Option(None, help="Guard model spec (default: the config's, embedded SmolLM2)."),
    out: Annotated[Path | None, typer.Option(help="Output dir (default: the cache's runs/<task>/guard).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML GuardSFTConfig.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field, e.g. --set train.max_steps=40.")] = None,
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Score held-out queries before and after."),
    eval_limit: int | None = typer.Option(None, help="Evaluate on at most this many held-out pairs."),
) -> None:
    """Build guard SFT pairs from a task, fine-tune the guard (LoRA) and score held-out people's pairs as served."""
    from core.config import load_config, save_config
    from core.models import load_llm
    from eval.guard_decisions import evaluate_pairs
    from guard.backends.transformers import TransformersBackend
    from training.guard_sft import GuardSFTConfig, guard_sft, make_guard_pairs, split_pairs, teacher_pairs
    from training.methods.common import model_digest
    from training.unlearn import default_cache_root

    cfg = load_config(GuardSFTConfig, config, set_ or [])
    if model:
        cfg = cfg.model_copy(update={"model": model})
    t = load_task_spec(task)
    out_dir = out or run_dir(t.name, "guard")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir.with_name(out_dir.name + ".config.yaml"))
    pairs = make_guard_pairs(t, cfg.data)
    if cfg.teacher == "llm":
        if not cfg.teacher_model:
            raise typer.BadParameter("teacher=llm needs teacher_model (e.g. --set teacher_model=/path/to/llm)")
        teacher = load_llm(cfg.teacher_model)
        pairs = teacher_pairs(teacher.model, teacher.tokenizer, pairs, t, model_digest(teacher.model),
                              default_cache_root())
    train_pairs, held = split_pairs(pairs, cfg.data.holdout_fraction, cfg.data.seed, cfg.data.split_by)
    held = held[:eval_limit] if eval_limit else held
    typer.echo(f"guard pairs: {len(train_pairs)} train, {len(held)} held out")
    llm = load_llm(cfg.model)
    row: dict = {"model": cfg.model, "out_dir": str(out_dir), "train_pairs": len(train_pairs), "heldout": len(held)}
    if evaluate:
        before = evaluate_pairs(TransformersBackend(llm), t, held)  # as served: constrained, the serving budget
        typer.echo(f"before: {before.summary()}")
        row["before"] = before.model_dump(exclude={"samples"})
    res = guard_sft(llm.model, llm.tokenizer, t, train_pairs, cfg, out_dir)
    row.update({"steps": res.steps, "train_seconds": round(res.seconds, 1), "final_terms": res.final_terms})
    if evaluate:
        tuned = load_llm(str(out_dir))
        after = evaluate_pairs(TransformersBackend(tuned), t, held)
        typer.echo(f"after:  {after.summary()}")
        row["after"] = after.model_dump()
    typer.echo(json.dumps(row, indent=1, default=str))


@app.command("mix")
def mix_cmd(
    unlearned: str = typer.Option(..., help="The unlearned model (dir)."),
    original: str | None = typer.Option(None, help="The model before unlearning (default: the task's target)."),
    task: str = typer.Option("offline", help="Task spec for the retain score (retain-QA ROUGE-L)."),
    target_ratio: float = typer.Option(0.9, help="Reach this fraction of the original's retain score..."),
    target: float | None = typer.Option(None, help="...or this absolute retain score."),
    max_items: int | None = typer.Option(None, help="Score on at most this many retain items (faster)."),
    tol: float = typer.Option(0.02, help="Binary-search resolution on a."),
    out: Annotated[Path | None, typer.Option(help="Save the calibrated mixed model here.")] = None,
    eval_max_tokens: int = typer.Option(48),
) -> None:
    """Calibrate (1-a) theta_orig + a theta_unlearned to a retain score, then report forget ROUGE-L there."""
    from core.io import atomic_dir
    from core.models import LoadedLLM, load_llm
    from eval.metrics.qa import answer_rouge
    from training.mixing import calibrate_mixing

    t = load_task_spec(task)
    orig = load_llm(original or _default_model(t.name))
    unl = load_llm(unlearned)
    items = t.retain_qa[:max_items] if max_items else t.retain_qa

    def score(m) -> float:  # noqa: ANN001
        return answer_rouge(LoadedLLM(m, orig.tokenizer, "mix"), items, max_new_tokens=eval_max_tokens).value

    goal = target if target is not None else target_ratio * score(orig.model)
    res = calibrate_mixing(orig.model, unl.model, score, goal, tol=tol, work=unl.model)
    forget = answer_rouge(LoadedLLM(unl.model, orig.tokenizer, "mix"), [q for q in t.forget_qa if q.kind == "fact"],
                          max_new_tokens=eval_max_tokens).value
    if out:
        with atomic_dir(out) as tmp:
            unl.model.save_pretrained(tmp)
            orig.tokenizer.save_pretrained(tmp)
    typer.echo(json.dumps({**res.model_dump(), "forget_rougeL_recall": round(forget, 4),
                           "out": str(out) if out else None}, indent=1))
