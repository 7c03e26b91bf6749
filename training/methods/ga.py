"""Gradient ascent (GA) and gradient difference (GradDiff): the simplest baselines.

GA maximises the forget NLL: ``loss = -gamma * NLL(forget)``. GradDiff adds a retain term:
``loss = -gamma * NLL(forget) + alpha * R(retain)`` with R the retain NLL or the KL to the frozen
original (open-unlearning's ``retain_loss_type``). Both are unbounded below, so they are run for
few steps with a small learning rate.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from training.losses import kl_to_reference, mean_nll
from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register


class GAConfig(BaseModel):
    """GA (open-unlearning defaults: gamma=1, no retain term)."""

    gamma: float = Field(1.0, gt=0, description="Weight of the (negated) forget NLL.")


class GradDiffConfig(BaseModel):
    """GradDiff (open-unlearning defaults: gamma=1, alpha=1, NLL retain)."""

    gamma: float = Field(1.0, gt=0, description="Weight of the (negated) forget NLL.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


def retain_term(model: Any, ctx: MethodContext, batch: dict[str, Any], kind: str) -> Any:
    """The retain loss of a batch: NLL of the answers, or KL(original || model) over its tokens."""
    if kind == "kl":
        return kl_to_reference(model, ctx.reference(), batch)
    return mean_nll(model, batch)


def prepare_ga(ctx: MethodContext, cfg: GAConfig) -> MethodPlan:
    """GA needs the forget stream only."""

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f = mean_nll(model, batch["forget"])
        loss = -cfg.gamma * f
        return {"loss": loss, "forget_loss": loss, "forget_nll": f}

    return MethodPlan(loss_fn=loss_fn, streams={"forget": ctx.streams["forget"]}, config=cfg)


def prepare_graddiff(ctx: MethodContext, cfg: GradDiffConfig) -> MethodPlan:
    """GradDiff pairs forget and retain batches; a KL retain term uses the frozen original."""
    if cfg.retain_loss == "kl":
        ctx.reference()

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f = mean_nll(model, batch["forget"])
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        return {"loss": -cfg.gamma * f + cfg.alpha * r, "forget_loss": -cfg.gamma * f, "forget_nll": f,
                f"retain_{cfg.retain_loss}": r}

    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=cfg)


_TRAIN = {"lr": 1e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}

register(UnlearnMethod(
    name="ga", config=GAConfig, prepare=prepare_ga, summary="gradient ascent on the forget NLL",
    forget_term="forget_nll", forget_direction="up", retain_term=None, train_defaults=_TRAIN))
register(UnlearnMethod(
    name="graddiff", config=GradDiffConfig, prepare=prepare_graddiff,
    summary="gradient ascent on forget + descent on retain (NLL or KL)",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll", train_defaults=_TRAIN))
