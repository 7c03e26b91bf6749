"""Seconds per RMU step: forward truncated at layer l (ours) vs a full forward, same model and batch.

Three ways to take one RMU optimiser step (forget batch + retain batch, backward, AdamW on the
down-projections of layers l-2..l), timed interleaved in one run so that load on the machine hits
them alike:

* ``full``: the reference-code way: full forward passes (all layers and the LM head) of the model
  on forget and retain, and of the frozen model on retain, reading layer l's output;
* ``truncated``: forwards stop after layer l (``training.activations.layer_output``); the frozen
  model is a copy of the first l+1 layers, still run every step;
* ``truncated+cache``: as ``truncated``, with the frozen activations of each retain example
  computed once and cached;
* ``layers p..l+cache`` (what ``training.methods.rmu`` does by default): as ``truncated+cache``,
  and since everything below the lowest trainable layer p = l-2 is frozen, each example's input
  to layer p is cached too, so only layers p..l run.

Usage: ``python -m eval.bench.rmu_step_bench [--model smollm2-135m-instruct] [--layer N] [--steps 5]``.
Prints a table, the speed-up ratios and a JSON line (also written to ``--out`` if given).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch

from core.io import atomic_write_json
from core.models import load_llm, tiny_llm
from eval.tasks.offline import generate_benchmark
from training.activations import frozen_prefix, layer_output, run_layers
from training.losses import masked_mse
from training.methods.common import ExampleCache, steering_vector
from training.unlearn import UnlearnConfig, build_streams, collate_streams


def _batches(tokenizer: Any, batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One forget and one retain batch of chat QA examples from the offline benchmark."""
    streams = build_streams(tokenizer, generate_benchmark(), UnlearnConfig())
    items = [{"forget": {**streams["forget"][i], "idx": i}, "retain": {**streams["retain"][i], "idx": i}}
             for i in range(batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    b = collate_streams(items, pad)
    return b["forget"], b["retain"]


def _full_hidden(model: Any, layer: int, batch: dict[str, Any]) -> torch.Tensor:
    """Layer-l output read from a full forward pass (every layer and the LM head run)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                use_cache=False)
    return out.hidden_states[layer + 1]


def run(model_spec: str, layer: int | None, steps: int, batch_size: int, alpha: float = 100.0) -> dict[str, Any]:
    """Time the three step variants interleaved; return per-variant seconds/step and the ratios."""
    torch.manual_seed(0)
    llm = tiny_llm(0, num_layers=8) if model_spec == "tiny" else load_llm(model_spec)
    model, tok = llm.model, llm.tokenizer
    n_layers = int(model.config.num_hidden_layers)
    layer = n_layers // 2 if layer is None else layer
    forget, retain = _batches(tok, batch_size)
    frozen_full = copy.deepcopy(model).eval().requires_grad_(False)
    frozen_pre = frozen_prefix(model, layer)
    for name, p in model.named_parameters():
        p.requires_grad_(any(f"layers.{i}.mlp.down_proj." in name for i in range(max(0, layer - 2), layer + 1)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    with torch.no_grad():
        c = 4.0 * float(layer_output(model, layer, forget["input_ids"], forget["attention_mask"]).norm(dim=-1).mean())
    target = c * steering_vector(int(model.config.hidden_size), 0, "bench")
    cache = ExampleCache(lambda b: layer_output(frozen_pre, layer, b["input_ids"], b["attention_mask"]), per_token=True)
    first = max(0, layer - 2)
    inputs = {name: ExampleCache(lambda b: layer_output(frozen_pre, first - 1, b["input_ids"], b["attention_mask"]),
                                 per_token=True) for name in ("forget", "retain")}

    def from_p(name: str, batch: dict[str, Any]) -> torch.Tensor:
        return run_layers(model, first, layer, inputs[name](batch), batch["input_ids"], batch["attention_mask"])
    model.train()

    def step(variant: str) -> float:
        t0 = time.perf_counter()
        if variant == "full":
            hf, hr = _full_hidden(model, layer, forget), _full_hidden(model, layer, retain)
            with torch.no_grad():
                h0 = _full_hidden(frozen_full, layer, retain)
        elif variant == "layers p..l+cache":
            hf, hr, h0 = from_p("forget", forget), from_p("retain", retain), cache(retain)
        else:
            hf = layer_output(model, layer, forget["input_ids"], forget["attention_mask"])
            hr = layer_output(model, layer, retain["input_ids"], retain["attention_mask"])
            if variant == "truncated":
                with torch.no_grad():
                    h0 = layer_output(frozen_pre, layer, retain["input_ids"], retain["attention_mask"])
            else:
                h0 = cache(retain)
        loss = masked_mse(hf, target, forget["scope"]) + alpha * masked_mse(hr, h0, retain["attention_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    variants = ["full", "truncated", "truncated+cache"] + (["layers p..l+cache"] if first > 0 else [])
    for v in variants:  # warm-up (and fills the cache, as the first epoch does in training)
        step(v)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v in variants:
            times[v].append(step(v))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    return {
        "model": model_spec, "num_layers": n_layers, "layer": layer, "batch_size": batch_size,
        "tokens_per_batch": {"forget": int(forget["attention_mask"].sum()), "retain": int(retain["attention_mask"].sum())},
        "steps": steps, "threads": torch.get_num_threads(),
        "seconds_per_step": {v: round(s, 4) for v, s in med.items()},
        "all_seconds": {v: [round(x, 4) for x in ts] for v, ts in times.items()},
        "speedup_truncated": round(med["full"] / med["truncated"], 3),
        "speedup_truncated_cached": round(med["full"] / med["truncated+cache"], 3),
        "speedup_default": round(med["full"] / med[variants[-1]], 3), "default_variant": variants[-1],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry: run the benchmark, print the table, ratios and JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Model spec, or 'tiny' for a smoke run.")
    ap.add_argument("--layer", type=int, default=None, help="RMU layer l (default: mid-depth).")
    ap.add_argument("--steps", type=int, default=5, help="Timed steps per variant (after one warm-up).")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args(argv)
    res = run(args.model, args.layer, args.steps, args.batch_size)
    print(f"RMU step on {res['model']} ({res['num_layers']} layers), l={res['layer']}, batch {res['batch_size']} "
          f"forget + {res['batch_size']} retain ({res['tokens_per_batch']['forget']}+{res['tokens_per_batch']['retain']} "
          f"tokens), median of {res['steps']} steps")
    print(f"{'variant':<20} {'s/step':>8} {'speed-up':>9}")
    for v, s in res["seconds_per_step"].items():
        print(f"{v:<20} {s:>8.3f} {res['seconds_per_step']['full'] / s:>8.2f}x")
    print(f"ratio full/truncated = {res['speedup_truncated']:.2f}x; full/truncated+cache = "
          f"{res['speedup_truncated_cached']:.2f}x; full/{res['default_variant']} (RMU default) = "
          f"{res['speedup_default']:.2f}x")
    print(json.dumps(res))
    if args.out:
        atomic_write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
