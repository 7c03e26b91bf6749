"""PDU, primal-dual unlearning (T. Entesari, A. Hatami, R. Khaziev, A. Ramakrishna, M. Fazlyab, "Constrained
Entropic Unlearning: A Primal-Dual Framework for Large Language Models", arXiv 2506.05314, 2025).

Unlearning as a constrained problem: flatten the model's next-token distribution on the forget answers
while the retain loss stays under a bound ``eps``,

``min_theta F(theta)  s.t.  R(theta) <= eps``,  ``F = E_forget[(max_v z_v - mean_v z_v)^2]``

(``z`` the logits at each position that predicts an answer token: the *logit-margin flattening*
loss, zero exactly when the distribution is uniform), solved on the Lagrangian with a multiplier
``lambda >= 0`` updated by projected dual ascent after every loss evaluation:

``loss_t = gamma * F + lambda_t * (R - eps)``,  ``lambda_{t+1} = max(0, lambda_t + eta * (R_t - eps))``

(no update during the first ``dual_warmup_steps`` evaluations). ``R`` is the retain NLL (or KL to
the original). Reference code: open-unlearning ``src/trainer/unlearn/pdu.py`` (the authors' port),
``configs/trainer/PDU.yaml`` and ``community/methods/PDU/run.sh``; the TOFU runs there use
``alpha`` (lambda_0) = 100, ``dual_step_size`` = 5, ``retain_loss_eps`` = 0.3, dual warm-up 5 of 10 epochs,
lr 1e-5. The README says to set eps "appropriately larger" than the starting model's retain loss, so
by default ``eps`` is measured: the original model's retain NLL plus ``eps_margin`` (the resolved
value is recorded in the run config, like RMU's ``c``).

State: lambda and the evaluation count live in the loss object (:class:`PrimalDualLoss`), so they carry
across steps within a run; ``state_dict``/``load_state_dict`` hold them for checkpoints. The loop does
not save loss state yet: until it stores ``loss_fn.state_dict()`` in ``state.pt`` (and restores it on
resume), a resumed run restarts lambda at ``alpha`` and the warm-up count at 0.

Deviations: the flattening loss uses the logits at the positions that *predict* answer tokens (the
usual next-token shift); the reference masks the logits at the answer tokens themselves (one position
later: it skips the prediction of the first answer token and includes the one after the last). Only the
per-step dual update is implemented (the reference's ``dual_update_upon="step"``, used in all its runs);
its per-epoch variant needs an epoch hook the loop does not have. Warm-up counts loss evaluations,
where the reference counts epochs: 15 of the 30 default steps, the TOFU runs' half. Train defaults (30
steps, lr 2e-5, constant) are NPO's on the embedded SmolLM2-135M, not tuned for PDU.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from training.losses import mean_nll, token_nll
from training.methods.common import Batch, MethodContext, MethodPlan, UnlearnMethod, collate_streams, register
from training.methods.ga import retain_term

log = logging.getLogger(__name__)


class PDUConfig(BaseModel):
    """PDU (open-unlearning's TOFU settings: lambda_0=100, dual step 5, gamma=1, NLL retain; eps measured)."""

    gamma: float = Field(1.0, gt=0, description="Weight of the forget flattening loss.")
    alpha: float = Field(100.0, ge=0, description="Initial dual variable lambda_0 (weight of the retain constraint).")
    retain_eps: float | None = Field(None, ge=0, description="Constraint bound on the retain loss; None: the "
                                                             "original model's retain loss + eps_margin.")
    eps_margin: float = Field(0.1, ge=0, description="Slack added to the measured retain loss when retain_eps is None.")
    eps_examples: int = Field(64, ge=1, description="Retain examples the starting retain loss is measured on.")
    primal_dual: bool = Field(True, description="Update lambda by dual ascent; False: fixed weight alpha.")
    dual_step_size: float = Field(5.0, gt=0, description="Dual ascent step eta.")
    dual_warmup_steps: int = Field(15, ge=0, description="Loss evaluations before lambda starts to move.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")


def flattening_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared gap between the max and the mean logit at the positions predicting answer tokens."""
    z = logits[:, :-1, :].float()
    mask = (labels[:, 1:] != -100).to(z.dtype)
    gap = z.max(dim=-1).values - z.mean(dim=-1)
    return (gap.pow(2) * mask).sum() / mask.sum().clamp(min=1)


def dual_update(lam: float, retain: float, eps: float, step_size: float) -> float:
    """Projected dual ascent on the constraint ``retain <= eps``: ``max(0, lam + step_size * (retain - eps))``."""
    return max(0.0, lam + step_size * (retain - eps))


class PrimalDualLoss:
    """The Lagrangian ``gamma F + lambda (R - eps)``; lambda moves by dual ascent after every evaluation.

    A loss object rather than a closure so lambda and the evaluation count can be checkpointed
    (``state_dict``/``load_state_dict``).
    """

    def __init__(self, ctx: MethodContext, cfg: PDUConfig) -> None:
        """Start at ``lambda = alpha``; ``cfg.retain_eps`` must be resolved."""
        if cfg.retain_eps is None:
            raise ValueError("PrimalDualLoss needs a resolved retain_eps")
        self.ctx, self.cfg, self.eps = ctx, cfg, float(cfg.retain_eps)
        self.dual = float(cfg.alpha)
        self.calls = 0

    def __call__(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """Loss terms of one batch at the current lambda, then the dual step."""
        forget = batch["forget"]
        logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], use_cache=False).logits
        f = flattening_loss(logits, forget["labels"])
        nll, mask = token_nll(logits.detach(), forget["labels"])
        r = retain_term(model, self.ctx, batch["retain"], self.cfg.retain_loss)
        lam = self.dual
        out = {"loss": self.cfg.gamma * f + lam * (r - self.eps), "forget_loss": self.cfg.gamma * f, "forget_flat": f,
               "forget_nll": nll.sum() / mask.sum().clamp(min=1), f"retain_{self.cfg.retain_loss}": r,
               "dual": lam, "constraint": (r - self.eps).detach()}
        self.step(float(r.detach()))
        return out

    def step(self, retain: float) -> None:
        """Count one evaluation; after the warm-up, take the dual ascent step on its retain loss."""
        if self.cfg.primal_dual and self.calls >= self.cfg.dual_warmup_steps:
            self.dual = dual_update(self.dual, retain, self.eps, self.cfg.dual_step_size)
        self.calls += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue the dual trajectory."""
        return {"dual": self.dual, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values."""
        self.dual, self.calls = float(state["dual"]), int(state["calls"])


def starting_retain_loss(ctx: MethodContext, cfg: PDUConfig, batch_size: int = 8) -> float:
    """The original model's retain loss (token-mean NLL over the first ``eps_examples``; KL to itself is 0)."""
    if cfg.retain_loss == "kl":
        return 0.0
    tok = ctx.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    exs = ctx.streams["retain"][: cfg.eps_examples]
    device = next(ctx.model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(exs), batch_size):
            rows = [{"r": {**e, "idx": s + i}} for i, e in enumerate(exs[s:s + batch_size])]
            b: Batch = {k: v.to(device) for k, v in collate_streams(rows, pad)["r"].items()}
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(mean_nll(ctx.model, b)) * n
            tokens += n
    return total / max(1, tokens)


def prepare_pdu(ctx: MethodContext, cfg: PDUConfig) -> MethodPlan:
    """Resolve eps on the original model and build the stateful primal-dual loss."""
    start = None
    if cfg.retain_eps is None:
        start = starting_retain_loss(ctx, cfg)
        cfg = cfg.model_copy(update={"retain_eps": round(start + cfg.eps_margin, 6)})
    loss = PrimalDualLoss(ctx, cfg)
    info = {"retain_eps": cfg.retain_eps, **({"starting_retain_loss": round(start, 6)} if start is not None else {})}
    return MethodPlan(loss_fn=loss, streams=ctx.streams, config=cfg, info=info)


register(UnlearnMethod(
    name="pdu", config=PDUConfig, prepare=prepare_pdu,
    summary="logit-flattening forget loss under a retain-loss constraint, Lagrange multiplier by dual ascent",
    forget_term="forget_flat", forget_direction="down", retain_term="retain_nll",
    train_defaults={"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
