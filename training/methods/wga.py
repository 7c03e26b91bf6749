"""WGA: weighted gradient ascent, each forget token's ascent scaled by the model's own confidence in it.

Q. Wang, J. P. Zhou, Z. Zhou, S. Shin, B. Han, K. Q. Weinberger, "Rethinking LLM Unlearning
Objectives: A Gradient Perspective and Go Beyond", ICLR 2025 (arXiv 2502.19301). Reference code:
open-unlearning (github:locuslab/open-unlearning, ``src/trainer/unlearn/wga.py`` and
``compute_wga_loss`` in ``src/trainer/utils.py``, ``configs/trainer/WGA.yaml``; main at d3d7cf9) and the
authors' ``tmlr-group/G-effect`` (``dataloader.py``, loss types ``wga`` / ``wga_kl``).

The paper's G-effect analysis finds that GA's per-token gradient carries an inverse-confidence factor
``1 / p(y_t)``, so tokens the model already gets wrong dominate and GA over-unlearns. WGA cancels it
with a stop-gradient weight ``w_t = p(y_t)^beta`` (the paper's ``alpha``):

``loss = -gamma * mean_t [ sg(p(y_t)^beta) * NLL_t ] + alpha * R(retain)``

over the answer tokens of the batch (a token mean, as both references take), with ``R`` the retain NLL
or KL(original || model). As ``p(y_t)`` falls the weight falls with it, so the ascent slows by itself
on tokens already forgotten.

Defaults are open-unlearning's ``WGA.yaml`` (beta=1, gamma=1, alpha=1, NLL retain). Deviations:
- The exponent is called ``beta`` here, as in open-unlearning, because ``alpha`` is this project's (and
  open-unlearning's) retain weight; the paper writes it ``alpha``. G-effect's script falls back to 5
  when no value is given; open-unlearning's documented setting, 1, is the default here.
- open-unlearning always builds a reference model for WGA even with an NLL retain term; here the frozen
  original is only made for ``retain_loss="kl"``.
- Train defaults (lr 2e-5, 30 constant steps, no warm-up) are NPO's, set for the embedded 135M model:
  the paper trains 7B/1.3B models for 5 epochs at 1e-5/2e-5. Under AdamW the weights' overall scale
  mostly cancels; what they change is which tokens drive the update and the forget/retain balance.
  Not yet measured on the offline benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from training.losses import token_nll
from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.ga import retain_term


class WGAConfig(BaseModel):
    """WGA (open-unlearning defaults: beta=1, gamma=1, alpha=1, NLL retain)."""

    beta: float = Field(1.0, ge=0, description="Exponent of the token-probability weight p(y_t)^beta (the paper's "
                                               "alpha); 0 gives plain GA, larger values damp low-confidence tokens.")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


def answer_token_nll(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer NLL and its mask, [B, T-1], from one forward pass (the token weights need them)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return token_nll(logits, batch["labels"])


def wga_weights(nll: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA's token weights ``p(y_t)^beta = exp(-beta * NLL_t)``, detached so no gradient flows through them."""
    return torch.exp(-beta * nll.detach())


def weighted_token_mean(nll: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t NLL_t / #answer tokens``: the token-mean weighted NLL that WGA and SatImp ascend."""
    m = mask.to(nll.dtype)
    return (weights * nll * m).sum() / m.sum().clamp(min=1)


def weighted_ascent_plan(ctx: MethodContext, cfg: Any,
                         weights: Callable[[torch.Tensor], torch.Tensor]) -> MethodPlan:
    """The loss WGA and SatImp share: ascent on the token-weighted forget NLL (``weights(nll)``, detached) plus the
    retain term; a KL retain term uses the frozen original."""
    if cfg.retain_loss == "kl":
        ctx.reference()

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        nll, mask = answer_token_nll(model, batch["forget"])
        f = weighted_token_mean(nll, mask, weights(nll))
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        plain = (nll.sum() / mask.sum().clamp(min=1)).detach()
        return {"loss": -cfg.gamma * f + cfg.alpha * r, "forget_loss": -cfg.gamma * f, "forget_wnll": f.detach(), "forget_nll": plain,
                f"retain_{cfg.retain_loss}": r}

    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=cfg)


def prepare_wga(ctx: MethodContext, cfg: WGAConfig) -> MethodPlan:
    """WGA pairs forget and retain batches; a KL retain term uses the frozen original."""
    return weighted_ascent_plan(ctx, cfg, lambda nll: wga_weights(nll, cfg.beta))


register(UnlearnMethod(
    name="wga", config=WGAConfig, prepare=prepare_wga,
    summary="gradient ascent with each forget token weighted by the model's own p(token)^beta (detached)",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll",
    train_defaults={"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
