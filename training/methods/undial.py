"""UNDIAL: self-distillation towards the original model's logits with the forget token's logit lowered.

Y. R. Dong, H. Lin, M. Belkin, R. Huerta, I. Vulić, "UNDIAL: Self-Distillation with Adjusted Logits for
Robust Unlearning in Large Language Models", NAACL 2025 (arXiv 2402.10052). Reference code:
open-unlearning (github:locuslab/open-unlearning, ``src/trainer/unlearn/undial.py``,
``compute_undial_loss`` in ``src/trainer/utils.py``, ``configs/trainer/UNDIAL.yaml``,
``community/methods/UNDIAL/README.md``; main at d3d7cf9).

The teacher is the frozen original. At every answer position ``i`` its logits ``z0_i`` are adjusted by
subtracting ``beta`` from the logit of the forget token ``y_i`` (``beta * onehot(y_i)``), and the
student is trained with cross-entropy to the resulting distribution, which is detached:

``t_i = softmax(z0_i - beta * onehot(y_i))``,
``loss = gamma * mean_i KL(t_i || softmax(z_i)) + alpha * R(retain)``

(the reference writes ``CE(t_i, softmax(z_i))``, which differs by the entropy of the detached target:
the same gradient; the KL form is logged because it is 0 when the student matches and does not swing
with each batch's target entropy).

Unlike gradient ascent the target is a fixed distribution, so the loss is bounded below (by the
0) and the student stops once it matches: the forget token loses mass, every other
token keeps the original's relative probabilities.

Defaults are open-unlearning's ``UNDIAL.yaml``: ``beta=10`` (the README's range is 3-30), ``gamma=1``,
``alpha=0`` (the paper uses no retain set, so there is no retain term; set ``alpha > 0`` for a
GradDiff-style NLL or KL one), learning rate 1e-4.

Deviations:
- The loss averages over the answer tokens (labels != -100). The reference averages over every
  position of the batch: prompt and padding count too, and there its label -100 indexes the one-hot
  at vocabulary id V-100, lowering an arbitrary token's logit. With the prompt and padding counted,
  the reference's mean is also smaller by the answer's share of the sequence.
- The original's logits of each forget example are computed once and cached (the reference runs the
  teacher on every step); the cache holds ``tokens x vocabulary`` floats per forget example (about
  300 MB for the offline task's 30 forget answers on the 135M model). ``cache_reference=False``
  recomputes them each step instead.
- Train defaults: lr 1e-4 (the reference config; the paper tunes LoRA on 7B models at 1e-4), 30
  constant steps, no warm-up, for the embedded 135M model. Not yet measured on the offline benchmark.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from training.losses import token_nll
from training.methods.common import ExampleCache, MethodContext, MethodPlan, UnlearnMethod, register
from training.methods.ga import retain_term


class UNDIALConfig(BaseModel):
    """UNDIAL (open-unlearning ``UNDIAL.yaml``: beta=10, gamma=1, alpha=0, NLL retain)."""

    beta: float = Field(10.0, ge=0, description="How far the forget token's logit is lowered in the teacher's "
                                                "distribution (0: plain self-distillation).")
    gamma: float = Field(1.0, gt=0, description="Weight of the distillation term.")
    alpha: float = Field(0.0, ge=0, description="Weight of the retain term (0: none, as in the paper).")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")
    cache_reference: bool = Field(True, description="Cache the original's logits per forget example (else "
                                                    "recompute them every step).")


def undial_target(ref_logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """``softmax(z0 - beta * onehot(y))``, detached, zero where targets == -100 (``ref_logits[i]`` predicts ``targets[i]``)."""
    z = ref_logits.detach().float()
    valid = targets != -100
    onehot = F.one_hot(targets.clamp(min=0), z.size(-1)).to(z.dtype)
    return torch.softmax(z - beta * onehot, -1) * valid.unsqueeze(-1)


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """Token-mean ``KL(t || softmax(logits))`` over the counted tokens, ``t`` = :func:`undial_target` (aligned tensors).

    This is the reference's ``CE(t, softmax(logits))`` less the target's entropy, which carries no
    gradient: the update is the same, and the value is 0 once the student matches the target.
    """
    t = undial_target(ref_logits, targets, beta)
    kl = (torch.xlogy(t, t) - t * torch.log_softmax(logits.float(), -1)).sum(-1)
    return kl.sum() / (targets != -100).sum().clamp(min=1)


def _forward(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Logits of a padded batch (no HF loss)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def prepare_undial(ctx: MethodContext, cfg: UNDIALConfig) -> MethodPlan:
    """The teacher is the frozen original; its forget logits are cached per example unless told otherwise."""
    reference = ctx.reference()
    cached = ExampleCache(lambda b: _forward(reference, b).float(), per_token=True)

    def teacher(batch: dict[str, Any]) -> torch.Tensor:
        if cfg.cache_reference:
            return cached(batch)
        with torch.no_grad():
            return _forward(reference, batch).float()

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        fb = batch["forget"]
        full = _forward(model, fb)
        ref = teacher(fb).to(full.device)
        f = undial_loss(full[:, :-1], ref[:, :-1], fb["labels"][:, 1:], cfg.beta)
        nll, mask = token_nll(full, fb["labels"])
        out = {"undial": f, "forget_nll": (nll.sum() / mask.sum().clamp(min=1)).detach()}
        loss = forget = cfg.gamma * f
        if cfg.alpha > 0:
            r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
            out[f"retain_{cfg.retain_loss}"] = r
            loss = loss + cfg.alpha * r
        return {"loss": loss, "forget_loss": forget, **out}

    streams = ctx.streams if cfg.alpha > 0 else {"forget": ctx.streams["forget"]}
    return MethodPlan(loss_fn=loss_fn, streams=streams, config=cfg)


register(UnlearnMethod(
    name="undial", config=UNDIALConfig, prepare=prepare_undial,
    summary="self-distillation to the original's distribution with the forget token's logit lowered by beta",
    forget_term="forget_nll", forget_direction="up", retain_term=None,
    train_defaults={"lr": 1e-4, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
