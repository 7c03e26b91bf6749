"""TRU, targeted reasoning unlearning (Liao, Wang et al. 2026, arXiv 2603.09980).

Each forget question gets a *reasoning-based target* from a teacher (:mod:`training.teachers`):
a short reasoning that names what is asked and why it must not be revealed, then a refusal. TRU
trains on it with cross-entropy and adds a GradDiff term:

``loss = gamma * (-log P(reasoning | x) - log P(refusal | reasoning, x))
       + alpha * (NLL(retain) - min(NLL(original forget answer), ga_cap))``

(each NLL a token mean). The cap stops the gradient-ascent part once the original answer is
unlikely enough, so it cannot run away. Targets come from the template teacher offline, or from a
local LLM (``teacher="llm"``, ``teacher_model`` a model spec; None: the model being unlearned), and
are cached as JSONL.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from core.generation import chat_text
from training.losses import mean_nll, part_nll
from training.methods.common import Example, MethodContext, MethodPlan, UnlearnMethod, model_digest, register
from training.teachers import LLMTeacher, Teacher, TemplateTeacher, TRUTarget, cached_tru_targets

log = logging.getLogger(__name__)


class TRUConfig(BaseModel):
    """TRU settings; the defaults met the targets on the fine-tuned SmolLM2-135M (offline benchmark).

    Template teacher, ``gamma=1``, ``alpha=1``, ``ga_cap=5``, all parameters, AdamW lr 5e-5 constant
    for 30 steps of 8 forget + 8 original-answer + 8 retain examples (the method's train defaults):
    forget-fact ROUGE-L recall 0.959 -> 0.375, retain-QA ROUGE-L recall 0.957 -> 0.897 (94%). The
    reasoning + refusal NLL falls from 7.1 to 0.03 and the original answers' NLL reaches the cap.
    """

    teacher: Literal["template", "llm"] = Field("template", description="Who writes the reasoning targets.")
    teacher_model: str | None = Field(None, description="Model spec of the LLM teacher; None: the model itself.")
    teacher_max_new_tokens: int = Field(96, ge=16)
    gamma: float = Field(1.0, gt=0, description="Weight of the reasoning + refusal cross-entropy.")
    alpha: float = Field(1.0, ge=0, description="Weight of the GradDiff term.")
    ga_cap: float | None = Field(5.0, gt=0, description="Forget NLL above this adds no more ascent; None: no cap.")
    separator: str = Field("\n", description="Between reasoning and refusal in the target answer.")
    max_length: int = Field(256, ge=32, description="Token cap of a forget example with its target.")
    targets_path: str | None = Field(None, description="Explicit JSONL cache of targets (default: under the cache root).")


def tru_example(tokenizer: Any, question: str, target: TRUTarget, separator: str, system: str | None,
                max_length: int, group: int) -> Example:
    """Chat example whose answer is reasoning (part 1) then refusal (part 2), both labelled."""
    prompt = tokenizer(chat_text(tokenizer, question, system), add_special_tokens=False)["input_ids"]
    reason = tokenizer(target.reasoning, add_special_tokens=False)["input_ids"]
    refusal = tokenizer(separator + target.refusal + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids = (prompt + reason + refusal)[:max_length]
    part = ([0] * len(prompt) + [1] * len(reason) + [2] * len(refusal))[:max_length]
    labels = [i if p else -100 for i, p in zip(ids, part, strict=True)]
    return {"input_ids": ids, "labels": labels, "part": part, "scope": [1 if p else 0 for p in part], "group": group}


def make_teacher(ctx: MethodContext, cfg: TRUConfig) -> Teacher:
    """The configured teacher: template, the model being unlearned, or another local model."""
    if cfg.teacher == "template":
        return TemplateTeacher()
    if cfg.teacher_model is None:
        return LLMTeacher(ctx.model, ctx.tokenizer, f"self-{ctx.model_digest}", cfg.teacher_max_new_tokens)
    from core.models import load_llm

    llm = load_llm(cfg.teacher_model)

    return LLMTeacher(llm.model, llm.tokenizer, model_digest(llm.model), cfg.teacher_max_new_tokens)


def prepare_tru(ctx: MethodContext, cfg: TRUConfig) -> MethodPlan:
    """Get (cached) teacher targets for every forget question and build the TRU streams."""
    if not ctx.forget_items:
        raise ValueError("TRU needs forget QA items (questions) to write reasoning targets for; the task has none")
    items = [(q.question, ctx.task.targets[ti]) for q, ti in ctx.forget_items]
    targets = cached_tru_targets(make_teacher(ctx, cfg), items, ctx.cache_root / "teacher",
                                 Path(cfg.targets_path) if cfg.targets_path else None)
    enc = [tru_example(ctx.tokenizer, q.question, t, cfg.separator, ctx.system, cfg.max_length, ti)
           for (q, ti), t in zip(ctx.forget_items, targets, strict=True)]
    original = [ctx.encode_qa(q.question, q.answer, ti) for q, ti in ctx.forget_items]
    streams = {"forget": enc, "forget_original": original, "retain": ctx.streams["retain"]}

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        reason, refusal = part_nll(model, batch["forget"], (1, 2))
        orig = mean_nll(model, batch["forget_original"])
        retain = mean_nll(model, batch["retain"])
        ga = torch.clamp(orig, max=cfg.ga_cap) if cfg.ga_cap is not None else orig
        tru = reason + refusal
        loss = cfg.gamma * tru + cfg.alpha * (retain - ga)
        return {"loss": loss, "tru_nll": tru, "reason_nll": reason, "refusal_nll": refusal,
                "forget_nll": orig, "retain_nll": retain}

    sources = sorted({t.source for t in targets})
    return MethodPlan(loss_fn=loss_fn, streams=streams, config=cfg,
                      info={"teacher": sources, "targets": len(targets), "example": targets[0].model_dump()})


register(UnlearnMethod(
    name="tru", config=TRUConfig, prepare=prepare_tru,
    summary="cross-entropy on teacher reasoning + refusal targets plus capped GradDiff",
    forget_term="tru_nll", forget_direction="down", retain_term="retain_nll",
    train_defaults={"lr": 5e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
