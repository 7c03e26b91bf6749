"""R²MU, reasoning-aware representation misdirection (Wang et al. 2025, arXiv 2506.12963).

RMU plus two terms on reasoning traces the model writes itself (``training.traces``): an
*unthinking* term that sends the layer-l activations of traces about forget questions to the same
``c u`` as their target, and a reasoning-preservation term that holds the activations of general
reasoning traces (retain and benign questions) at the frozen model's:

``loss = gamma * mse(h(x_f), c u) + alpha * mse(h(x_r), h0(x_r))
       + trace_gamma * mse(h(t_f), c u) + trace_alpha * mse(h(t_r), h0(t_r))``.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.rmu import RMU_TRAIN, RMUConfig, RMUCore
from training.traces import REASONING_TRIGGER, load_or_generate_traces, trace_prompt


class R2MUConfig(RMUConfig):
    """RMU's settings plus the trace terms: defaults as RMU's, traces of 32 tokens from 32 forget and 32 general
    questions, trace terms weighted like their answer counterparts."""

    trace_gamma: float = Field(1.0, ge=0, description="Weight of the unthinking term (forget traces to c u).")
    trace_alpha: float = Field(100.0, ge=0, description="Weight of the general-reasoning retain term.")
    trigger: str = Field(REASONING_TRIGGER, min_length=1, description="Appended to questions to elicit reasoning.")
    trace_tokens: int = Field(32, ge=4, le=1024, description="Traces are cut to this many tokens.")
    max_forget_traces: int = Field(32, ge=1, description="At most this many forget questions get a trace.")
    max_retain_traces: int = Field(32, ge=1, description="At most this many general questions get a trace.")
    trace_path: str | None = Field(None, description="Explicit JSONL cache file (default: under the cache root).")


def trace_questions(ctx: MethodContext, cfg: R2MUConfig) -> list[tuple[str, str, int]]:
    """(question, kind, group) for forget traces (forget QA) and general traces (benign + retain QA), seeded."""
    rng = random.Random(ctx.seed)
    forget = [(q.question, "forget", ti) for q, ti in ctx.forget_items]
    if len(forget) > cfg.max_forget_traces:
        forget = rng.sample(forget, cfg.max_forget_traces)
    general = [(q, "retain", -1) for q in ctx.task.benign_questions] + [(q.question, "retain", -1) for q in ctx.task.retain_qa]
    if len(general) > cfg.max_retain_traces:
        general = rng.sample(general, cfg.max_retain_traces)
    if not forget or not general:
        raise ValueError("R2MU needs forget QA questions and retain/benign questions to generate traces from")
    return forget + general


def prepare_r2mu(ctx: MethodContext, cfg: R2MUConfig) -> MethodPlan:
    """Generate (or reuse) traces with the original model, then set up RMU plus the two trace terms."""
    from pathlib import Path

    qs = trace_questions(ctx, cfg)
    records = load_or_generate_traces(ctx.model, ctx.tokenizer, qs, ctx.cache_root, ctx.model_digest, cfg.trigger,
                                      cfg.trace_tokens, path=Path(cfg.trace_path) if cfg.trace_path else None)
    core = RMUCore(ctx, cfg)
    streams = dict(ctx.streams)
    streams["forget_trace"] = [ctx.encode_qa(trace_prompt(r.question, cfg.trigger), r.trace, r.group)
                               for r in records if r.kind == "forget"]
    streams["retain_trace"] = [ctx.encode_qa(trace_prompt(r.question, cfg.trigger), r.trace, -1)
                               for r in records if r.kind == "retain"]

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f = core.forget_mse(model, "forget", batch["forget"])
        r = core.retain_mse(model, "retain", batch["retain"])
        tf = core.forget_mse(model, "forget_trace", batch["forget_trace"])
        tr = core.retain_mse(model, "retain_trace", batch["retain_trace"])
        loss = cfg.gamma * f + cfg.alpha * r + cfg.trace_gamma * tf + cfg.trace_alpha * tr
        return {"loss": loss, "forget_mse": f, "retain_mse": r, "trace_forget_mse": tf, "trace_retain_mse": tr}

    info = {"layer": core.layer, "c": round(core.c, 4), "mean_norm": core.norm,
            "traces": {"forget": len(streams["forget_trace"]), "retain": len(streams["retain_trace"])}}
    return MethodPlan(loss_fn=loss_fn, streams=streams, config=core.config, trainable=core.trainable(cfg), info=info)


register(UnlearnMethod(
    name="r2mu", config=R2MUConfig, prepare=prepare_r2mu,
    summary="RMU plus unthinking of self-generated forget traces and preservation of general traces",
    forget_term="forget_mse", forget_direction="down", retain_term="retain_mse", train_defaults=RMU_TRAIN))
