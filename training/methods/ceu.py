"""CE-U, cross-entropy unlearning: train towards the model's own distribution with the forget token removed.

B. Yang, "CE-U: Cross Entropy Unlearning", 2025 (arXiv 2503.01224). Reference code: open-unlearning
(github:locuslab/open-unlearning, ``src/trainer/unlearn/ceu.py``, ``configs/trainer/CEU.yaml``,
``community/methods/CEU/run.sh``; main at d3d7cf9).

At every answer position ``i`` the target is the model's current distribution with the forget
token's logit set to -inf, detached:

``t_i = softmax(sg(z_i) with z_i[y_i] = -inf)``,  ``loss = gamma * mean_i CE(t_i, softmax(z_i))``.

The gradient with respect to the logits is ``softmax(z_i) - t_i``: ``p(y_i)`` on the forget token and
``-p(v) p(y_i) / (1 - p(y_i))`` on every other token, so the push is strongest where the model is most
sure of the forget token (the reverse of GA, whose push ``1 - p(y_i)`` vanishes there) and fades as
``p(y_i)`` goes to 0; the other tokens keep their relative probabilities. Since
``CE(t_i, softmax(z_i)) = H(t_i) - log(1 - p(y_i))`` and ``H(t_i)`` carries no gradient (``t_i`` is
detached), the loss is computed as ``KL(t_i || softmax(z_i)) = -log(1 - p(y_i))``: the reference's
update, with a value that falls as the model forgets (the CE's value rises with the entropy of the
spreading target, so it does not show progress).

Defaults are the reference's: ``ignore_first_n_answer_tokens=1`` (the trick the reference cites from
a footnote of the paper's training settings: each answer's first token is left out of the loss),
forget data only, no retain term (``CEU`` extends open-unlearning's base trainer, not GradDiff).

Deviations: none in the update (the reference's mean over the counted tokens is kept); the loss value
is the KL above rather than the CE, and a batch with no counted token gives 0 instead of the
reference's NaN. ``gamma`` is the usual forget
weight (the reference has none: gamma=1). Train defaults: lr 1e-5 (the reference's TOFU script on
Llama-3.2-1B), 30 constant steps, no warm-up, for the embedded 135M model. Not yet measured on the
offline benchmark.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field

from training.losses import token_nll
from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register


class CEUConfig(BaseModel):
    """CE-U (open-unlearning ``CEU.yaml``: ignore_first_n_answer_tokens=1, forget data only)."""

    ignore_first_n_answer_tokens: int = Field(1, ge=0, description="Leave the first n answer tokens of each "
                                                                   "example out of the loss.")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget term.")


def drop_first_answer_tokens(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``labels`` with the first ``n`` labelled tokens of each row set to -100 (the reference's cumsum trick)."""
    valid = labels != -100
    return labels.masked_fill(valid & (valid.cumsum(-1) <= n), -100)


def ceu_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``softmax(z)`` with the target token's logit at -inf, detached, zero where targets == -100 (aligned tensors)."""
    z = logits.detach().float()
    valid = targets != -100
    z = z.scatter(-1, targets.clamp(min=0).unsqueeze(-1), float("-inf"))
    return torch.softmax(z, -1) * valid.unsqueeze(-1)


def ceu_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-mean ``KL(t || softmax(logits))`` over the counted tokens, ``t`` = :func:`ceu_target` (0 if none count).

    The reference's ``CE(t, softmax(logits))`` less the detached target's entropy: the same gradient,
    and the value is ``-log(1 - p(y))``, which falls to 0 as the forget token loses its mass.
    """
    t = ceu_target(logits, targets)
    kl = (torch.xlogy(t, t) - t * torch.log_softmax(logits.float(), -1)).sum(-1)
    return kl.sum() / (targets != -100).sum().clamp(min=1)


def prepare_ceu(ctx: MethodContext, cfg: CEUConfig) -> MethodPlan:
    """CE-U needs the forget stream only; its target comes from the model being trained."""

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        fb = batch["forget"]
        full = model(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"], use_cache=False).logits
        labels = drop_first_answer_tokens(fb["labels"], cfg.ignore_first_n_answer_tokens)
        f = ceu_loss(full[:, :-1], labels[:, 1:])
        nll, mask = token_nll(full, fb["labels"])
        loss = cfg.gamma * f
        return {"loss": loss, "forget_loss": loss, "ce_u": f, "forget_nll": (nll.sum() / mask.sum().clamp(min=1)).detach()}

    return MethodPlan(loss_fn=loss_fn, streams={"forget": ctx.streams["forget"]}, config=cfg)


register(UnlearnMethod(
    name="ce-u", config=CEUConfig, prepare=prepare_ceu,
    summary="cross-entropy to the model's own detached distribution with the forget token masked out",
    forget_term="forget_nll", forget_direction="up", retain_term=None,
    train_defaults={"lr": 1e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
