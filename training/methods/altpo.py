"""AltPO, alternate preference optimisation (A. Mekala, V. Dorna, S. Dubey, A. Lalwani, D. Koleczek, M. Rungta,
S. Hasan, E. Lobo, "Alternate Preference Optimization for Unlearning Factual Knowledge in Large Language
Models", COLING 2025, arXiv 2409.13474).

Negative feedback alone (GA, NPO) drives forget answers to gibberish; AltPO adds in-domain positive
feedback: for every forget question the model itself writes ``k`` plausible *alternative* answers
(wrong facts in the right form), and a DPO loss prefers each alternate to the true answer:

``loss = gamma * -(2/beta) E_{(x,l), w ~ A(x)}[log sigmoid(beta * m)] + alt_nll * NLL(w | x) + alpha * R(retain)``,
``m = (log p(w|x) - log p_ref(w|x)) - (log p(l|x) - log p_ref(l|x))``

with ``log p`` summed over answer tokens, ``ref`` the frozen original, ``R`` the retain NLL (or KL)
and the DPO pieces shared with :mod:`training.methods.dpo`. Reference code: the authors'
github.com/molereddy/Alternate-Preference-Optimization (``forget.py``/``dataloader.py``: the README's
AltPO command is ``forget_loss=subdpo beta=0.1 retain_wt=1 lr=5e-05 num_epochs=2 augment_k=5``, and
``subdpo`` is ``DPO(alternate, forget) + retain_wt * NLL(retain)``; ``generate.py``/``generate.yaml``:
5 alternates per question sampled at temperature 1.0, seed 0, the prompt giving the question and its
answer and asking for an answer that changes every fact) and open-unlearning's port
(``community/methods/AltPO``: the DPO trainer on ``QAwithAlternateDataset``). Each (alternate, forget
answer) pair is one training example, as in the authors' data module.

Alternates are generated once, at prepare time, by the model being unlearned (before any update) and
cached as JSON under ``<cache root>/altpo/`` keyed by the model's weight digest and the generation
settings; a second run reads the cache. Empty replies and replies equal to the true answer are dropped
(they carry no preference); a question left with none is dropped with a warning.

Deviations: ``alt_nll`` (an NLL on the alternates, SFT-style positive feedback) is an option that is off
by default: the authors' AltPO (``subdpo``) has no such term (their ``subnpo``/``subdiff`` ablations
do). Our prompt is a chat message in the model's own template (the authors hand-write a Llama-2/3
prompt with an "Alternate Answer :" prefix that we strip if echoed); replies are cut at "Question:"
like theirs. ``max_new_tokens=48`` where theirs is 200: our answers are one sentence, TOFU's a
paragraph. Reference NLLs are cached per example (the reference is frozen: the same loss). Train
defaults: the authors' lr 5e-5 (Llama-2-7B) kept for the embedded SmolLM2-135M over NPO's 30 steps,
constant, so it compares with the other methods at one budget; not tuned here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from core.generation import generate
from core.io import atomic_write_text
from training.methods.common import Example, MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.dpo import PreferencePairs, dpo_loss
from training.methods.ga import retain_term

log = logging.getLogger(__name__)

ALTERNATE_PROMPT = (
    "Question: {question}\nAnswer: {answer}\n"
    "Now pretend you are making things up. Write another answer to the question that changes every fact "
    "in the given answer. It must be a plausible answer to the question, keep every detail the question "
    "mentions, and contradict the given answer. Reply with the new answer only."
)
_STOP = ("Question:", "Q:")  # the authors' stop strings
_PREFIX = re.compile(r"^\s*(?:alternate|new|another)?\s*answer\s*:\s*", re.IGNORECASE)


class AltPOConfig(BaseModel):
    """AltPO (the authors' defaults: beta=0.1, retain weight 1, NLL retain, 5 alternates sampled at T=1)."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the preference loss.")
    gamma: float = Field(1.0, gt=0, description="Weight of the DPO term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term (the authors' retain_wt).")
    alt_nll: float = Field(0.0, ge=0, description="Weight of an NLL on the alternates (not in the authors' AltPO).")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")
    num_alternates: int = Field(5, ge=1, le=32, description="Alternates per forget question (the authors' augment_k).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the alternates (0: greedy).")
    max_new_tokens: int = Field(48, ge=4, le=512, description="Length cap of a generated alternate.")
    gen_batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")


def alternate_prompt(question: str, answer: str) -> str:
    """The instruction that asks the model for a plausible answer with every fact changed."""
    return ALTERNATE_PROMPT.format(question=question, answer=answer)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def clean_alternate(reply: str, answer: str) -> str | None:
    """The alternate answer in a raw reply (echoed prefix stripped, cut at a stop string), or None if unusable."""
    text = reply
    for stop in _STOP:
        text = text.split(stop)[0]
    text = _PREFIX.sub("", text.strip()).strip()
    if not text or not _norm(text) or _norm(text) == _norm(answer):
        return None
    return text


def alternates_cache_path(ctx: MethodContext, cfg: AltPOConfig, items: list[tuple[str, str]]) -> Path:
    """Where the alternates of these (question, answer) pairs live: keyed by model digest and generation settings."""
    key = json.dumps([ALTERNATE_PROMPT, ctx.system, cfg.num_alternates, cfg.temperature, cfg.max_new_tokens,
                      ctx.seed, items])
    return ctx.cache_root / "altpo" / f"{ctx.model_digest}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def load_or_generate_alternates(ctx: MethodContext, cfg: AltPOConfig, items: list[tuple[str, str]]) -> list[list[str]]:
    """Raw replies, ``num_alternates`` per (question, answer): read from the JSON cache, else sampled (seeded) and cached."""
    path = alternates_cache_path(ctx, cfg, items)
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("items", [])
        if ([(r["question"], r["answer"]) for r in rows] == items
                and all(len(r["alternates"]) == cfg.num_alternates for r in rows)):
            log.info("reusing %d x %d cached AltPO alternates from %s", len(rows), cfg.num_alternates, path)
            return [list(r["alternates"]) for r in rows]
        log.warning("AltPO cache %s holds other questions; regenerating", path)
    k = cfg.num_alternates
    prompts = [alternate_prompt(q, a) for q, a in items for _ in range(k)]
    log.info("generating %d AltPO alternates (%d per question)", len(prompts), k)
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(ctx.seed)
        replies = generate(ctx.model, ctx.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.gen_batch_size, system=ctx.system, temperature=cfg.temperature,
                           progress=True, desc="altpo alternates")
    grouped = [replies[i * k:(i + 1) * k] for i in range(len(items))]
    record = {"model_digest": ctx.model_digest,
              "settings": {"prompt": ALTERNATE_PROMPT, "system": ctx.system, "num_alternates": k,
                           "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": ctx.seed},
              "items": [{"question": q, "answer": a, "alternates": g} for (q, a), g in zip(items, grouped, strict=True)]}
    atomic_write_text(path, json.dumps(record, indent=1, ensure_ascii=False))
    return grouped


def prepare_altpo(ctx: MethodContext, cfg: AltPOConfig) -> MethodPlan:
    """Get (cached) alternates for every forget question and pair each with the true answer."""
    if not ctx.forget_items:
        raise ValueError("AltPO needs forget QA items (questions) to write alternate answers for; the task has none")
    items = [(q.question, q.answer) for q, _ in ctx.forget_items]
    raw = load_or_generate_alternates(ctx, cfg, items)
    lose: list[Example] = []
    win: list[Example] = []
    dropped, skipped, example = 0, 0, None
    for (q, ti), replies in zip(ctx.forget_items, raw, strict=True):
        alts = [a for a in (clean_alternate(r, q.answer) for r in replies) if a is not None]
        dropped += len(replies) - len(alts)
        if not alts:
            skipped += 1
            continue
        example = example or {"question": q.question, "answer": q.answer, "alternate": alts[0]}
        true = ctx.encode_qa(q.question, q.answer, ti)
        for a in alts:
            lose.append(true)
            win.append(ctx.encode_qa(q.question, a, ti))
    if not lose:
        raise ValueError(f"AltPO: none of the {len(items) * cfg.num_alternates} generated alternates is usable "
                         "(all empty or equal to the true answer)")
    if skipped:
        log.warning("AltPO: %d of %d forget questions got no usable alternate and are left out", skipped, len(items))
    pairs = PreferencePairs(ctx, win)

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        t = pairs(model, batch["forget"])
        f = dpo_loss(t.margin, cfg.beta)
        alt = t.win_mean_nll
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        forget = cfg.gamma * f + (cfg.alt_nll * alt if cfg.alt_nll else 0.0)
        loss = forget + cfg.alpha * r
        return {"loss": loss, "forget_loss": forget, "altpo": f, "margin": t.margin.mean().detach(), "forget_nll": t.lose_mean_nll,
                "alt_nll": alt.detach(), f"retain_{cfg.retain_loss}": r}

    info = {"pairs": len(lose), "questions": len(items) - skipped, "dropped_alternates": dropped,
            "skipped_questions": skipped, "example": example}
    return MethodPlan(loss_fn=loss_fn, streams={"forget": lose, "retain": ctx.streams["retain"]}, config=cfg,
                      info=info)


register(UnlearnMethod(
    name="altpo", config=AltPOConfig, prepare=prepare_altpo,
    summary="DPO preferring the model's own plausible alternative answers to the forget answers, plus retain NLL",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll",
    train_defaults={"lr": 5e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
