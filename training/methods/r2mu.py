"""R²MU, reasoning-aware representation misdirection for unlearning.

C. Wang, C. Fan, Y. Zhang, J. Jia, D. Wei, P. Ram, N. Baracaldo, S. Liu, "Reasoning Model
Unlearning: Forgetting Traces, Not Just Answers, While Preserving Reasoning Skills", arXiv
2506.12963 (2025). Reference code: github.com/OPTML-Group/Unlearn-R2MU (``unlearn_r2mu.py``: the
loss; ``parallel_generate.py``: the forget traces), read for this module; ours is our own code.

RMU (:mod:`training.methods.rmu`) plus two terms on reasoning traces:

``loss = gamma * mse(h(x_f), c u) + alpha * mse(h(x_r), h0(x_r))
       + trace_gamma * mse(h(t_f), c u) + trace_alpha * mse(h(t_r), h0(t_r))``

* *unthinking* ``t_f``: reasoning traces *about the forget data*, written by the model being
  unlearned itself: each forget question is asked with the reference's chain-of-thought trigger
  ("Let's reason this step by step.") and the model writes a step-by-step trace, cut to
  ``trace_tokens`` tokens (:mod:`training.traces`; generated once and cached). Their layer-l
  activations are sent to the same ``c u`` as their target's, on the trace tokens only.
* *reasoning preservation* ``t_r``: *general reasoning traces*, the worked step-by-step solutions
  of the reasoning task this project ships (:mod:`training.reasoning_data`: arithmetic stories,
  unit conversions, rates, ordering puzzles), held at the frozen model's activations.

Deviations, and why:

* Preservation data: the reference uses LIMO's math solutions (a download); we ship a generated
  reasoning task so the method runs offline. ``general_traces="self"`` restores this project's
  earlier behaviour (the model's own traces on benign and retain questions).
* Forget traces: the reference prompts the reasoning model with a forget-corpus text plus
  ``"\\nLet's reason this step by step.\\n<think>"``. Our forget data are questions and the embedded
  model is a 135M chat model without a thinking mode, so the question and the trigger form the user
  turn (a worked demonstration before it made SmolLM2-135M answer in one line instead of reasoning).
  Asked so, the fine-tuned 135M target still answers in one sentence and stops, so its "trace" was
  the bare answer; by default (``trace_style="scaffold"``) the step headers of
  :data:`training.traces.SCAFFOLD_STEPS` are forced one by one and the model writes each step, which
  gives traces that reason *and* recall the forget facts, as a reasoning model's do.
  ``trace_style="free"`` keeps the single free continuation.
  The reference cuts traces to 100 tokens (preservation solutions to 150); ``trace_tokens=96`` caps
  both (5 traces of 96 tokens took 26 s on the 2-core CPU; generated once, then cached).
* Weights: the reference weighs its preservation term 1 against retain alpha 1.7 on 8B models; here
  it is weighted like RMU's retain term (``trace_alpha = alpha = 100``), the scale that kept retain
  activations on SmolLM2-135M (see :class:`training.methods.rmu.RMUConfig`). The reference takes MSE
  over every position, padding included; ours masks padding (and the question for ``t_f``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from core.generation import encode_qa
from training.methods.common import Example, MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.rmu import RMU_TRAIN, RMUConfig, RMUCore
from training.reasoning_data import reasoning_problems
from training.traces import REASONING_TRIGGER, TraceRecord, TraceSpec, TraceStyle, load_or_generate_traces


class R2MUConfig(RMUConfig):
    """RMU's settings plus the trace terms: RMU's defaults, 32 forget traces the model writes (96 tokens) and 32
    worked reasoning-task solutions, the trace terms weighted like their answer counterparts."""

    trace_gamma: float = Field(1.0, ge=0, description="Weight of the unthinking term (forget traces to c u).")
    trace_alpha: float = Field(100.0, ge=0, description="Weight of the general-reasoning preservation term.")
    trigger: str = Field(REASONING_TRIGGER, min_length=1, description="Appended to questions to elicit reasoning.")
    trace_style: TraceStyle = Field("scaffold", description="'scaffold': forced step headers, the model writes each "
                                                            "step; 'free': one free continuation.")
    trace_tokens: int = Field(96, ge=4, le=1024, description="Forget traces and worked solutions are cut to this many "
                                                             "tokens (the reference: 100 and 150).")
    max_forget_traces: int = Field(32, ge=1, description="At most this many forget questions get a trace (seeded).")
    max_retain_traces: int = Field(32, ge=1, description="Number of general reasoning traces.")
    general_traces: Literal["reasoning_task", "self"] = Field(
        "reasoning_task", description="General traces: worked solutions of the shipped reasoning task, or the "
                                      "model's own traces on benign and retain questions (this project's old behaviour).")
    reasoning_seed: int = Field(0, description="Seed of the reasoning-task problems.")
    trace_max_length: int = Field(256, ge=32, description="Token cap of a trace example (prompt and trace).")
    trace_path: str | None = Field(None, description="Explicit JSONL cache file (default: under the cache root).")


def trace_questions(ctx: MethodContext, cfg: R2MUConfig) -> list[TraceSpec]:
    """Forget traces to generate (sampled forget QA, seeded) followed by the general traces."""
    rng = random.Random(ctx.seed)
    forget = [TraceSpec(q.question, "forget", ti) for q, ti in ctx.forget_items]
    if len(forget) > cfg.max_forget_traces:
        forget = rng.sample(forget, cfg.max_forget_traces)
    if cfg.general_traces == "reasoning_task":
        general = [TraceSpec(p.question, "retain", -1, p.solution)
                   for p in reasoning_problems(cfg.max_retain_traces, seed=cfg.reasoning_seed)]
    else:
        general = [TraceSpec(q, "retain") for q in ctx.task.benign_questions]
        general += [TraceSpec(q.question, "retain") for q in ctx.task.retain_qa]
        if len(general) > cfg.max_retain_traces:
            general = rng.sample(general, cfg.max_retain_traces)
    if not forget or not general:
        raise ValueError("R2MU needs forget QA questions (and, for general_traces='self', retain or benign "
                         "questions) to build traces from")
    return forget + general


def trace_example(ctx: MethodContext, record: TraceRecord, max_length: int) -> Example:
    """A chat example of one trace (the trace as the answer to its prompt); RMU's ``scope`` covers the trace tokens."""
    ex: Example = dict(encode_qa(ctx.tokenizer, record.prompt, record.trace, ctx.system, max_length))
    ex["part"] = [0 if lab == -100 else 1 for lab in ex["labels"]]
    ex["scope"] = list(ex["part"])
    ex["group"] = record.group if record.kind == "forget" else -1
    return ex


def prepare_r2mu(ctx: MethodContext, cfg: R2MUConfig) -> MethodPlan:
    """Generate (or reuse) the forget traces with the original model, then set up RMU plus the two trace terms."""
    specs = trace_questions(ctx, cfg)
    records = load_or_generate_traces(ctx.model, ctx.tokenizer, specs, ctx.cache_root, ctx.model_digest, cfg.trigger,
                                      cfg.trace_tokens, path=Path(cfg.trace_path) if cfg.trace_path else None,
                                      style=cfg.trace_style)
    core = RMUCore(ctx, cfg)
    streams = dict(ctx.streams)
    streams["forget_trace"] = [trace_example(ctx, r, cfg.trace_max_length) for r in records if r.kind == "forget"]
    streams["retain_trace"] = [trace_example(ctx, r, cfg.trace_max_length) for r in records if r.kind == "retain"]

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f = core.forget_mse(model, "forget", batch["forget"])
        r = core.retain_mse(model, "retain", batch["retain"])
        tf = core.forget_mse(model, "forget_trace", batch["forget_trace"])
        tr = core.retain_mse(model, "retain_trace", batch["retain_trace"])
        loss = cfg.gamma * f + cfg.alpha * r + cfg.trace_gamma * tf + cfg.trace_alpha * tr
        return {"loss": loss, "forget_loss": cfg.gamma * f + cfg.trace_gamma * tf, "forget_mse": f, "retain_mse": r, "trace_forget_mse": tf, "trace_retain_mse": tr}

    info = {"layer": core.layer, "c": round(core.c, 4), "mean_norm": core.norm,
            "traces": {"forget": len(streams["forget_trace"]), "retain": len(streams["retain_trace"])},
            "general_traces": cfg.general_traces,
            "trace_examples": {k: next(r.trace for r in records if r.kind == k) for k in ("forget", "retain")}}
    return MethodPlan(loss_fn=loss_fn, streams=streams, config=core.config, trainable=core.trainable(cfg), info=info)


register(UnlearnMethod(
    name="r2mu", config=R2MUConfig, prepare=prepare_r2mu,
    summary="RMU plus unthinking of the model's own forget-question reasoning traces and preservation of "
            "worked reasoning-task solutions",
    forget_term="forget_mse", forget_direction="down", retain_term="retain_mse", train_defaults=RMU_TRAIN))
