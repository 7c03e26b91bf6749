"""Fine-tuning recipe benchmark: does the target learn the facts *and* keep what the base model knew?

    python -m eval.bench.finetune_recipe                        # the default FinetuneConfig
    python -m eval.bench.finetune_recipe --set replay=0         # without replay (the old recipe's behaviour)
    python -m eval.bench.finetune_recipe --set train.lora.r=64 --set train.lr=1e-3
    python -m eval.bench.finetune_recipe --models base=smollm2-135m-instruct target=<dir> retain=<dir>

Fine-tunes the embedded SmolLM2 on the offline benchmark's training QA (what ``compare`` does for the target),
then measures, for the base model and the fine-tuned one, in the same run:

* the fact rate on the forget facts and on the retain facts (did fine-tuning teach them?);
* general-knowledge accuracy (TOFU's world_facts + real_authors when ``../shared/data/tofu`` exists, else the
  built-in set), and its ratio to the base model's (the target must keep >= 90%).

Prints a table and writes ``runs/bench/finetune_recipe/<name>.json``. Run it alone: two torch processes on two
cores slow each other 5-10x.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def fact_rate(llm: Any, task: Any, items: list[Any], max_new_tokens: int = 32) -> float:
    """Share of greedy answers that state their item's fact (the comparison's forget_fact_rate)."""
    from core.generation import generate
    from eval.metrics.columns import fact_rate as rate
    from eval.metrics.columns import item_facts

    ans = generate(llm.model, llm.tokenizer, [q.question for q in items], max_new_tokens=max_new_tokens, batch_size=32)
    value = rate(ans, item_facts(task, items))
    return 0.0 if value is None else value  # no item with a known fact: nothing learned to show


def general_acc(llm: Any, items: list[Any], max_new_tokens: int = 32) -> float:
    """General-knowledge accuracy of greedy answers (eval.general.answer_correct)."""
    from core.generation import generate
    from eval.general import general_accuracy

    ans = generate(llm.model, llm.tokenizer, [g.question for g in items], max_new_tokens=max_new_tokens,
                   batch_size=32)
    return general_accuracy(ans, items).value


def measure_models(models: dict[str, str], out: Path) -> dict[str, Any]:
    """Facts learned and general knowledge of existing models, the first being the ratio's baseline."""
    from core.io import atomic_write_json
    from core.models import load_llm
    from eval.general import general_knowledge_items
    from eval.tasks.offline import generate_benchmark
    from eval.tasks.records import default_data_root

    task = generate_benchmark()
    general = general_knowledge_items(default_data_root())
    forget = [q for q in task.forget_qa if q.kind == "fact"]
    retain = [q for q in task.retain_qa if q.kind == "fact"][:48]
    rows: dict[str, Any] = {}
    for name, spec in models.items():
        llm = load_llm(spec)
        rows[name] = {"model": spec, "forget_fact": fact_rate(llm, task, forget),
                      "retain_fact": fact_rate(llm, task, retain), "general_acc": general_acc(llm, general)}
        del llm
    first = next(iter(rows.values()))["general_acc"]
    print(f"{len(general)} general-knowledge questions ({general[0].source if general else '-'}), "
          f"{len(forget)} forget and {len(retain)} retain facts of the offline benchmark")
    print(f"{'model':22} {'forget fact':>12} {'retain fact':>12} {'general acc':>12} {'ratio':>7}")
    for name, r in rows.items():
        r["general_ratio"] = r["general_acc"] / max(1e-9, first)
        print(f"{name:22} {r['forget_fact']:12.3f} {r['retain_fact']:12.3f} {r['general_acc']:12.3f} "
              f"{r['general_ratio']:7.3f}")
    atomic_write_json(out / "models.json", rows)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result row (also printed and written as JSON)."""
    from core.config import load_config
    from core.io import atomic_write_json
    from core.models import load_llm
    from eval.general import general_knowledge_items, general_training_qa, replay_prompts
    from eval.tasks.offline import generate_benchmark, training_qa
    from eval.tasks.records import default_data_root
    from training.finetune import FinetuneConfig, finetune

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=[], help="FinetuneConfig override key=value (repeatable).")
    ap.add_argument("--name", default=None, help="Run name (default: from the overrides).")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/finetune_recipe"))
    ap.add_argument("--models", nargs="+", default=None, metavar="NAME=SPEC",
                    help="Only measure these models (e.g. base=smollm2-135m-instruct target=~/.cache/.../target), "
                         "the first being the baseline of the ratio; no fine-tuning.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.models:
        return measure_models(dict(m.split("=", 1) for m in args.models), args.out)
    cfg = load_config(FinetuneConfig, None, args.set)
    name = args.name or ("default" if not args.set else "_".join(s.replace("=", "-").replace(".", "") for s in args.set))
    task = generate_benchmark()
    general = general_knowledge_items(default_data_root())
    forget = [q for q in task.forget_qa if q.kind == "fact"]
    retain = [q for q in task.retain_qa if q.kind == "fact"][:48]

    base = load_llm(cfg.model)
    row: dict[str, Any] = {"name": name, "config": cfg.model_dump(mode="json"), "general_items": len(general)}
    row["base"] = {"forget_fact": fact_rate(base, task, forget), "retain_fact": fact_rate(base, task, retain),
                   "general_acc": general_acc(base, general)}
    t0 = time.perf_counter()
    res = finetune(base.model, base.tokenizer, training_qa(task), cfg, args.out / name / "model", desc=name,
                   replay=replay_prompts(), general=general_training_qa())
    row["train"] = {"steps": res.steps, "seconds": round(res.seconds, 1), "wall": round(time.perf_counter() - t0, 1)}
    tuned = load_llm(str(args.out / name / "model"))
    row["target"] = {"forget_fact": fact_rate(tuned, task, forget), "retain_fact": fact_rate(tuned, task, retain),
                     "general_acc": general_acc(tuned, general)}
    row["general_ratio"] = row["target"]["general_acc"] / max(1e-9, row["base"]["general_acc"])
    print(f"{'model':8} {'forget fact':>12} {'retain fact':>12} {'general acc':>12}")
    for who in ("base", "target"):
        r = row[who]
        print(f"{who:8} {r['forget_fact']:12.3f} {r['retain_fact']:12.3f} {r['general_acc']:12.3f}")
    print(f"general-knowledge ratio target / base: {row['general_ratio']:.3f} (goal >= 0.90); "
          f"{row['train']['steps']} steps in {row['train']['seconds']} s")
    atomic_write_json(args.out / f"{name}.json", row)
    return row


if __name__ == "__main__":
    main()
