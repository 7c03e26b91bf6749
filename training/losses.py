"""Pure loss functions shared by the unlearning methods (open-unlearning's building blocks).

Every function takes a model (or logits) and a padded batch from :func:`training.methods.common.collate_streams`
(``input_ids``, ``attention_mask``, ``labels`` with -100 off the answer, optional ``part`` and ``scope``)
and returns tensors; none of them keeps state, so each method's loss is a few lines over them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Forward pass returning logits (no HF loss: the callers mask tokens themselves)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the next-token targets and the mask of counted tokens (labels != -100), both [B, T-1]."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.clamp(min=0).reshape(-1),
                          reduction="none").view_as(shift_labels)
    return nll * mask, mask


def mean_nll(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the usual SFT loss; GA ascends it)."""
    nll, mask = token_nll(_logits(model, batch), batch["labels"])
    return nll.sum() / mask.sum().clamp(min=1)


def sequence_nll(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer NLL per sequence and answer length per sequence, both [B] (NPO and SimNPO need them)."""
    nll, mask = token_nll(_logits(model, batch), batch["labels"])
    return nll.sum(-1), mask.sum(-1)


def part_nll(model: Any, batch: dict[str, Any], parts: tuple[int, ...]) -> list[torch.Tensor]:
    """Mean NLL of the tokens of each labelled part (``batch["part"]``: 0 prompt, 1, 2, ...), one forward."""
    nll, mask = token_nll(_logits(model, batch), batch["labels"])
    part = batch["part"][:, 1:]
    out = []
    for p in parts:
        m = mask & (part == p)
        out.append((nll * m).sum() / m.sum().clamp(min=1))
    return out


def kl_to_reference(model: Any, reference: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Token-mean KL(reference || model) over non-pad tokens (GradDiff's KL retain term)."""
    logp = F.log_softmax(_logits(model, batch).float(), -1)
    with torch.no_grad():
        ref_logp = F.log_softmax(_logits(reference, batch).float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    mask = batch["attention_mask"].to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024): ``-(2/beta) log sigmoid(beta (NLL - NLL_ref))`` averaged over sequences."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll)).mean()


def simnpo_loss(nll: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): reference-free NPO on length-normalised NLL with margin ``delta``."""
    avg = nll / lengths.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (avg - delta)).mean()


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over hidden units of the tokens where ``mask`` is 1 (padding never counts)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (((h - target) ** 2) * m).sum() / (m.sum() * h.size(-1)).clamp(min=1)
