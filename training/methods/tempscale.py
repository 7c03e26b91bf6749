"""Temperature scaling (TS): gradient ascent on the forget NLL of ``softmax(h / tau)``, tau > 1.

Q. Wang, B. Han, P. Yang, J. Zhu, T. Liu, M. Sugiyama, "Towards Effective Evaluations and Comparisons
for LLM Unlearning Methods", ICLR 2025 (arXiv 2406.09179): with methods calibrated by its model-mixing
control, it reports temperature scaling among the tricks that raise unlearning efficacy without
hurting retention (as summaries of the paper put it; its full text was not readable from here).
Reference code: the authors' ``tmlr-group/Unlearning-with-Control`` (``dataloader.py``, loss types
``ga_temp`` and ``KL_temp``; HEAD 56e075b); the objectives follow that code. The same group's
"Rethinking LLM Unlearning Objectives" (ICLR 2025, arXiv 2502.19301), which issue 19 also cites, has
no temperature-scaled objective in its code (tmlr-group/G-effect: ``npo_temp`` only logs weights).

The logits of the forget answers are divided by ``tau`` before the softmax and the resulting NLL is
ascended (the retain term, when any, sees the untempered model):

- ``ga-ts`` (``ga_temp``): ``loss = -gamma * mean_t -log softmax(h_t / tau)[y_t]``, forget data only;
- ``kl-ts`` (``KL_temp``, TOFU's "KL" baseline with TS): the same plus ``alpha * KL(original || model)``
  on retain tokens.

They are the two base losses the authors' code applies TS to, so both are registered; names are
"<base>-ts" after the paper's trick name (registry names allow lowercase, digits and hyphens).

Defaults: tau=2 (the value ``ga_temp`` sets before the command line's ``strategy`` overrides it; the
code has no other default), gamma=1, alpha=1 (``KL_temp``'s ``KL_coef`` when no ``hyper_param`` is
given). Deviations: the reference's KL is ``kl_div(..., reduction="batchmean")`` over every position of
the flattened batch, padding included; ours is :func:`training.losses.kl_to_reference`, the mean over
non-pad tokens (same quantity, padding left out). Train defaults (lr 1e-5 like ``ga``, 30 constant
steps, no warm-up) are for the embedded 135M model; the paper trains 7B/1.3B models for 5 epochs at
1e-5/2e-5. Not yet measured on the offline benchmark.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field

from training.losses import kl_to_reference, token_nll
from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register


class GATSConfig(BaseModel):
    """GA with temperature scaling (authors' ``ga_temp``: no retain term; tau=2)."""

    tau: float = Field(2.0, gt=1.0, description="Softmax temperature of the ascended forget NLL (tau > 1 flattens).")
    gamma: float = Field(1.0, gt=0, description="Weight of the (negated) tempered forget NLL.")


class KLTSConfig(BaseModel):
    """KL with temperature scaling (authors' ``KL_temp``: tau=2, KL coefficient 1)."""

    tau: float = Field(2.0, gt=1.0, description="Softmax temperature of the ascended forget NLL (tau > 1 flattens).")
    gamma: float = Field(1.0, gt=0, description="Weight of the (negated) tempered forget NLL.")
    alpha: float = Field(1.0, ge=0, description="Weight of KL(original || model) on retain tokens.")


def tempered_token_nll(logits: torch.Tensor, labels: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL under ``softmax(logits / tau)`` and the answer mask, both [B, T-1] (TS's ascended term)."""
    return token_nll(logits.float() / tau, labels)


def forget_terms(model: Any, batch: dict[str, Any], tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean tempered forget NLL (with gradient) and the plain forget NLL (detached), from one forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    nll_ts, mask = tempered_token_nll(logits, batch["labels"], tau)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        plain = token_nll(logits, batch["labels"])[0].sum() / n
    return nll_ts.sum() / n, plain


def prepare_ga_ts(ctx: MethodContext, cfg: GATSConfig) -> MethodPlan:
    """GA-TS needs the forget stream only."""

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f, plain = forget_terms(model, batch["forget"], cfg.tau)
        loss = -cfg.gamma * f
        return {"loss": loss, "forget_loss": loss, "forget_nll_ts": f.detach(), "forget_nll": plain}

    return MethodPlan(loss_fn=loss_fn, streams={"forget": ctx.streams["forget"]}, config=cfg)


def prepare_kl_ts(ctx: MethodContext, cfg: KLTSConfig) -> MethodPlan:
    """KL-TS pairs forget and retain batches; the KL term uses the frozen original."""
    reference = ctx.reference()

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f, plain = forget_terms(model, batch["forget"], cfg.tau)
        r = kl_to_reference(model, reference, batch["retain"])
        return {"loss": -cfg.gamma * f + cfg.alpha * r, "forget_loss": -cfg.gamma * f, "forget_nll_ts": f.detach(), "forget_nll": plain,
                "retain_kl": r}

    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=cfg)


_TRAIN = {"lr": 1e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}

register(UnlearnMethod(
    name="ga-ts", config=GATSConfig, prepare=prepare_ga_ts,
    summary="gradient ascent on the forget NLL of temperature-scaled logits softmax(h / tau)",
    forget_term="forget_nll", forget_direction="up", retain_term=None, train_defaults=_TRAIN))
register(UnlearnMethod(
    name="kl-ts", config=KLTSConfig, prepare=prepare_kl_ts,
    summary="temperature-scaled gradient ascent on forget + KL to the original on retain",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_kl", train_defaults=_TRAIN))
