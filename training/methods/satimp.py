"""SatImp: gradient ascent with token weights that combine saturation and importance.

P. Yang, Q. Wang, Z. Huang, T. Liu, C. Zhang, B. Han, "Exploring Criteria of Loss Reweighting to
Enhance LLM Unlearning", ICML 2025 (arXiv 2505.11953). Reference code: open-unlearning
(github:locuslab/open-unlearning, ``src/trainer/unlearn/satimp.py`` and ``compute_satimp_loss`` in
``src/trainer/utils.py``, ``configs/trainer/SatImp.yaml``, ``community/methods/SatImp/README.md``; main
at d3d7cf9) and the authors' ``tmlr-group/SatImp`` (``dataloader/dataloader_sat.py``, loss types
``satimp`` / ``satimp_gd``).

Saturation favours tokens the model still predicts well (weight ``p^beta1``, as WGA), importance
favours the tokens whose loss is not yet minimised (weight ``(1 - p)^beta2``); SatImp multiplies them,
both detached:

``loss = -gamma * mean_t [ sg(p(y_t)^beta1 * (1 - p(y_t))^beta2) * NLL_t ] + alpha * R(retain)``

over the answer tokens of the batch (a token mean, as both references take), ``p(y_t) = exp(-NLL_t)``
and ``R`` the retain NLL (or KL to the original). The weight peaks at ``p = beta1 / (beta1 + beta2)``.

Defaults: beta1=5, beta2=1, gamma=1, alpha=0.1, NLL retain. The references disagree, so the choice is:
- beta1=5, beta2=1: open-unlearning's class signature, ``SatImp.yaml`` and method README all say so.
  The authors' repository README (December 2025) recommends beta2=0.1 instead; set ``beta2: 0.1``
  for that.
- gamma=1 (forget), alpha=0.1 (retain): open-unlearning's class signature and its method README ("the
  rate between forget loss and retain loss is set to 10 ... gamma=1.0 and alpha=0.1"), and the
  authors' ``satimp_gd`` (``forget + 0.1 * retain``). open-unlearning's ``SatImp.yaml`` has the two
  swapped (alpha=1.0, gamma=0.1), contradicting its own README; it is not followed. An open
  open-unlearning pull request (#192, May 2026) retunes SatImp; its values were not available here.
Other deviations: open-unlearning builds a reference model even for an NLL retain term; here the frozen
original is only made for ``retain_loss="kl"``. Train defaults (lr 2e-5, 30 constant steps, no warm-up)
are NPO's, for the embedded 135M model (the paper: 1e-5 / 2e-5 for 5 epochs on 7B / 1.3B models). The
weight is at most ``(5/6)^5 / 6 = 0.067`` at the defaults: AdamW cancels most of that overall scale, but
the forget term is then of the same order as ``alpha * R`` (0.1 x the retain NLL), which is the balance
the authors tuned. Not yet measured on the offline benchmark.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.wga import weighted_ascent_plan


class SatImpConfig(BaseModel):
    """SatImp (open-unlearning defaults: beta1=5, beta2=1; forget:retain weights 1:0.1 as its README)."""

    beta1: float = Field(5.0, ge=0, description="Saturation exponent: weight p(y_t)^beta1 (favours tokens still "
                                                "predicted well).")
    beta2: float = Field(1.0, ge=0, description="Importance exponent: weight (1 - p(y_t))^beta2 (favours tokens "
                                                "whose loss is not yet minimised).")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget term.")
    alpha: float = Field(0.1, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


def satimp_weights(nll: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp's token weights ``p^beta1 * (1 - p)^beta2`` with ``p = exp(-NLL_t)``, detached."""
    p = torch.exp(-nll.detach())
    return p.pow(beta1) * (1.0 - p).pow(beta2)


def prepare_satimp(ctx: MethodContext, cfg: SatImpConfig) -> MethodPlan:
    """SatImp pairs forget and retain batches; a KL retain term uses the frozen original."""
    return weighted_ascent_plan(ctx, cfg, lambda nll: satimp_weights(nll, cfg.beta1, cfg.beta2))


register(UnlearnMethod(
    name="satimp", config=SatImpConfig, prepare=prepare_satimp,
    summary="gradient ascent with detached token weights p^beta1 (1-p)^beta2 (saturation x importance)",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll",
    train_defaults={"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
