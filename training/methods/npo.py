"""NPO (Zhang et al. 2024) and SimNPO (Fan et al. 2024): bounded alternatives to gradient ascent.

NPO: ``loss = gamma * -(2/beta) E[log sigmoid(beta (NLL_theta(y|x) - NLL_ref(y|x)))] + alpha * R(retain)``
with NLL summed over the answer and ``ref`` the frozen original; the reference NLL of each forget
example is computed once and cached (the reference never changes). SimNPO drops the reference,
length-normalises the NLL and subtracts a margin ``delta``:
``-(2/beta) E[log sigmoid(beta (NLL/|y| - delta))]``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from training.losses import npo_loss, sequence_nll, simnpo_loss
from training.methods.common import ExampleCache, MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.ga import retain_term


class NPOConfig(BaseModel):
    """NPO (open-unlearning defaults: beta=0.1, gamma=1, alpha=1, NLL retain).

    On the fine-tuned SmolLM2-135M (offline benchmark) 30 steps at lr 2e-5, batch 8 (the method's
    train defaults) took forget-fact ROUGE-L recall from 0.959 to 0.731 and retain from 0.957 to
    0.888: a mild forgetter at these settings (more steps or a higher lr forget more, at a utility cost).
    """

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the preference loss.")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


class SimNPOConfig(BaseModel):
    """SimNPO (open-unlearning defaults: beta=4.5, delta=0, gamma=0.125, alpha=1, NLL retain)."""

    beta: float = Field(4.5, gt=0, description="Inverse temperature.")
    delta: float = Field(0.0, description="Reward margin (the paper's gamma) subtracted from the mean NLL.")
    gamma: float = Field(0.125, gt=0, description="Weight of the forget term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


def prepare_npo(ctx: MethodContext, cfg: NPOConfig) -> MethodPlan:
    """NPO caches the frozen original's summed NLL per forget example."""
    reference = ctx.reference()
    ref_nll = ExampleCache(lambda b: sequence_nll(reference, b)[0], per_token=False)

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        nll, lengths = sequence_nll(model, batch["forget"])
        f = npo_loss(nll, ref_nll(batch["forget"]), cfg.beta)
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        return {"loss": cfg.gamma * f + cfg.alpha * r, "forget_loss": cfg.gamma * f, "npo": f,
                "forget_nll": (nll.sum() / lengths.sum().clamp(min=1)).detach(), f"retain_{cfg.retain_loss}": r}

    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=cfg)


def prepare_simnpo(ctx: MethodContext, cfg: SimNPOConfig) -> MethodPlan:
    """SimNPO is reference-free (a KL retain term still uses the original)."""

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        nll, lengths = sequence_nll(model, batch["forget"])
        f = simnpo_loss(nll, lengths, cfg.beta, cfg.delta)
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        return {"loss": cfg.gamma * f + cfg.alpha * r, "forget_loss": cfg.gamma * f, "simnpo": f,
                "forget_nll": (nll.sum() / lengths.sum().clamp(min=1)).detach(), f"retain_{cfg.retain_loss}": r}

    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=cfg)


register(UnlearnMethod(
    name="npo", config=NPOConfig, prepare=prepare_npo,
    summary="negative preference optimisation against the frozen original",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll",
    train_defaults={"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
register(UnlearnMethod(
    name="simnpo", config=SimNPOConfig, prepare=prepare_simnpo,
    summary="reference-free, length-normalised NPO with a margin",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll",
    train_defaults={"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
