"""TRU, targeted reasoning unlearning.

J. Liao, Q. Wang, S. Ye, X. Yu, L. Chen, Z. Fang, "Explainable LLM Unlearning through Reasoning",
arXiv 2603.09980 (ICLR 2026). No reference implementation could be found (none in the stored code
index; the paper's pages list none), so this follows the paper's description.

Each forget question gets a *reasoning-based unlearning target*, written by a model prompted to
reason: a short chain of thought on what is asked and why answering would reveal protected
information (the unlearning scope), then a refusal (the post-unlearning response). TRU trains on it
with cross-entropy and adds a GA-based term (GradDiff here):

``loss = gamma * (-log P(reasoning | x) - log P(refusal | reasoning, x))
       + alpha * (NLL(retain) - min(NLL(original forget answer), ga_cap))``

(each NLL a token mean). The cap stops the gradient-ascent part once the original answer is
unlikely enough, so it cannot run away.

Targets (:mod:`training.teachers`): by default (``teacher="llm"``) a model prompted to reason writes
them, the embedded instruct model untuned (``teacher_model``: another local model spec, or ``"self"`` for
the model being unlearned), from a two-shot chain-of-thought prompt that names the question, the
protected subject and its policy. Replies are generated greedily in left-padded batches of
``teacher_batch_size``, capped at ``teacher_max_new_tokens=96`` tokens (SmolLM2-135M's replies end by
themselves after ~50; one batch of 6 took 25 s on the 2-core CPU, so the offline task's 30 forget
questions cost about 100 s, once: the targets are cached), split into reasoning and refusal and
validated: a reply with no reasoning, that does not name the subject, that states a forget fact
(:func:`core.facts.leaked_facts` on the target's facts and the forget answer) or that gives no reason
for declining falls back to the template target for that question; ``MethodPlan.info`` counts the
fallbacks by reason. Targets are cached as JSONL under the cache root, keyed by the teacher's weight
digest, the prompt version and the questions. ``teacher="template"`` uses the deterministic template
for every question.

Deviations, and why: the paper has a strong reasoning LLM write the targets; a 135M model writes
short, formulaic ones (the two demonstrations set their shape), and the template fills in where it
fails. The default teacher is not the model being unlearned: the fine-tuned SmolLM2 target, asked the
same prompt, answered instead of reasoning (10 of the offline task's 15 forget questions: "Philippa
Stavberg was born in High Juniperfield."; 5 more stated a forget fact), while the untuned embedded model
wrote 15 of 15 replies in the demonstrated shape, 14 of them with a reason for declining ("The question
asks for the birthplace of Mattias Pellridge. That is a personal detail of a person, and sharing it could
help someone find their birthplace, so I must not reveal it."). A teacher that never learnt the facts
cannot state them. The GA-based term is GradDiff with a cap on the ascended NLL (kept from this module's
first version; the paper's GA term has no cap) so ascent cannot run away on a small model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from core.generation import chat_text
from core.models import DEFAULT_LLM, load_llm
from training.losses import mean_nll, part_nll
from training.methods.common import Example, MethodContext, MethodPlan, UnlearnMethod, model_digest, register
from training.teachers import LLMTeacher, Teacher, TemplateTeacher, TRUTarget, cached_tru_targets

log = logging.getLogger(__name__)


class TRUConfig(BaseModel):
    """TRU settings. The loss defaults met the targets on the fine-tuned SmolLM2-135M (offline benchmark)
    when measured with the *template* teacher (before the LLM teacher became the default; to re-measure):

    ``gamma=1``, ``alpha=1``, ``ga_cap=5``, all parameters, AdamW lr 5e-5 constant
    for 30 steps of 8 forget + 8 original-answer + 8 retain examples (the method's train defaults):
    forget-fact ROUGE-L recall 0.959 -> 0.375, retain-QA ROUGE-L recall 0.957 -> 0.897 (94%). The
    reasoning + refusal NLL falls from 7.1 to 0.03 and the original answers' NLL reaches the cap.

    With the default teacher (the untuned embedded model; ``train --method tru --eval``, 2026-12-03, 30 steps,
    alone on 2 cores; fact rate as in ``compare``): fact rate (a) 0.400 -> 0.000 and (b) 0.444 -> 0.111,
    retain ROUGE-L 0.891 -> 0.787; with ``teacher_model="self"`` (the fine-tuned target, whose accepted
    "reasoning" was mostly answers) 0.067, 0.167 and 0.839. So the default forgets more and keeps less retain
    quality; forget ROUGE-L reads worse (0.54 vs 0.39 on (a)) because its refusals restate the question.
    """

    teacher: Literal["llm", "template"] = Field("llm", description="Who writes the reasoning targets: an LLM "
                                                                   "prompted to reason, or the fixed template.")
    teacher_model: str = Field(DEFAULT_LLM, description="Model spec of the LLM teacher: by default the embedded "
                                                        "instruct model, untuned (it was never taught the forget "
                                                        "facts); 'self': the model being unlearned.")
    teacher_max_new_tokens: int = Field(96, ge=16, description="Token cap of a teacher reply (CPU cost is linear in it).")
    teacher_batch_size: int = Field(8, ge=1, description="Replies generated per left-padded batch.")
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
    """The configured teacher: template, the model being unlearned ("self"), or another local model (the default)."""
    if cfg.teacher == "template":
        return TemplateTeacher()
    if cfg.teacher_model == "self":
        return LLMTeacher(ctx.model, ctx.tokenizer, f"self-{ctx.model_digest}", cfg.teacher_max_new_tokens,
                          cfg.teacher_batch_size)
    llm = load_llm(cfg.teacher_model)
    return LLMTeacher(llm.model, llm.tokenizer, model_digest(llm.model), cfg.teacher_max_new_tokens,
                      cfg.teacher_batch_size)


def teacher_info(targets: list[TRUTarget]) -> dict[str, Any]:
    """What the plan reports about its targets: who wrote them, fallbacks to the template by reason, samples."""
    reasons: dict[str, int] = {}
    for t in targets:
        if t.note.startswith("fallback: "):
            why = t.note.removeprefix("fallback: ").split(" '")[0]
            reasons[why] = reasons.get(why, 0) + 1
    sources: dict[str, int] = {}
    for t in targets:
        sources[t.source] = sources.get(t.source, 0) + 1
    return {"teacher": sorted(sources), "sources": sources, "targets": len(targets),
            "fallbacks": sum(reasons.values()), "fallback_reasons": reasons,
            "template_refusals": sum(t.note == "template refusal" for t in targets),
            "example": targets[0].model_dump(exclude={"reply"})}


def prepare_tru(ctx: MethodContext, cfg: TRUConfig) -> MethodPlan:
    """Get (cached) teacher targets for every forget question and build the TRU streams."""
    if not ctx.forget_items:
        raise ValueError("TRU needs forget QA items (questions) to write reasoning targets for; the task has none")
    items = [(q.question, ctx.task.targets[ti]) for q, ti in ctx.forget_items]
    targets = cached_tru_targets(make_teacher(ctx, cfg), items, ctx.cache_root / "teacher",
                                 Path(cfg.targets_path) if cfg.targets_path else None,
                                 answers=[q.answer for q, _ in ctx.forget_items])
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
        return {"loss": loss, "forget_loss": cfg.gamma * tru - cfg.alpha * ga, "tru_nll": tru, "reason_nll": reason, "refusal_nll": refusal,
                "forget_nll": orig, "retain_nll": retain}

    return MethodPlan(loss_fn=loss_fn, streams=streams, config=cfg, info=teacher_info(targets))


register(UnlearnMethod(
    name="tru", config=TRUConfig, prepare=prepare_tru,
    summary="cross-entropy on model-written reasoning + refusal targets plus capped GradDiff",
    forget_term="tru_nll", forget_direction="down", retain_term="retain_nll",
    train_defaults={"lr": 5e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
