"""IdkDPO: direct preference optimisation that prefers an "I don't know" answer to the forget answer.

DPO is R. Rafailov, A. Sharma, E. Mitchell, S. Ermon, C. D. Manning, C. Finn, "Direct Preference
Optimization: Your Language Model is Secretly a Reward Model" (NeurIPS 2023, arXiv 2305.18290). As an
unlearning baseline (TOFU's forget sets, the preferred answer a refusal such as "I don't know", the
dispreferred one the forget answer) it is R. Zhang, L. Lin, Y. Bai, S. Mei, "Negative Preference
Optimization" (COLM 2024, arXiv 2404.05868); open-unlearning ships it as the ``DPO`` trainer
(``src/trainer/unlearn/dpo.py``, ``compute_dpo_loss`` in ``src/trainer/utils.py``,
``configs/trainer/DPO.yaml``) run on ``TOFU_QA_forget_idk`` (``configs/experiment/unlearn/tofu/idk.yaml``).
We follow that code:

``loss = gamma * -(2/beta) E[log sigmoid(beta * m)] + alpha * R(retain)``,
``m = (log p(w|x) - log p_ref(w|x)) - (log p(l|x) - log p_ref(l|x))``

with ``w`` the "I don't know" answer, ``l`` the forget answer, ``log p`` summed over the answer
tokens, ``ref`` the frozen original and ``R`` the retain NLL (or KL to the original). The ``2/beta``
factor is open-unlearning's (it matches NPO's scale); plain DPO has ``-log sigmoid(beta m)``.

Why only "idkdpo" and no generic "dpo": open-unlearning's DPO trainer is generic in where the
preferred answer comes from, and its two sources are the IDK dataset (this module) and AltPO's
model-written alternates (:mod:`training.methods.altpo`, same loss). The only other per-question
source our tasks carry is ``QAItem.perturbed_answers``, which the truth-ratio metrics score; training
the model to prefer them would game those metrics. A "dpo" with IDK answers would be this method
under a second name, so it is not registered; :func:`dpo_margin`, :func:`dpo_loss` and
:class:`PreferencePairs` serve any preferred-answer source.

Deviations: each question's IDK answer is a seeded choice from :data:`training.methods.idk.IDK_ANSWERS`
(the same draw as IdkNLL for the same seed), fixed for the run, where open-unlearning draws a new line
of TOFU's ``idk.jsonl`` every time an example is loaded: a fixed choice makes batches, resume and
the run fingerprint exact. The reference log-likelihoods are computed once per example and cached
(the reference never changes, so this is the same loss). Preferred and dispreferred answers are
paired by the forget example's index (the loop shuffles streams other than ``forget``, so the IDK
answers are not a stream of their own). Defaults: open-unlearning's ``beta=0.1, gamma=1, alpha=1``,
NLL retain; its TOFU run uses lr 1e-5 for 10 epochs on Llama-3.2-1B. Our train defaults (30 steps,
lr 2e-5, constant) are NPO's on the embedded SmolLM2-135M so the two compare at one budget; they
were not tuned for IdkDPO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from training.losses import sequence_nll
from training.methods.common import (
    Batch,
    Example,
    ExampleCache,
    MethodContext,
    MethodPlan,
    UnlearnMethod,
    collate_streams,
    register,
)
from training.methods.ga import retain_term
from training.methods.idk import IDK_ANSWERS

PREFERENCE_TRAIN = {"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}


class IdkDPOConfig(BaseModel):
    """IdkDPO (open-unlearning's DPO defaults: beta=0.1, gamma=1, alpha=1, NLL retain)."""

    beta: float = Field(0.1, gt=0, description="Inverse temperature of the preference loss.")
    gamma: float = Field(1.0, gt=0, description="Weight of the DPO term.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain term.")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="NLL on retain answers, or KL to the original.")
    answers: list[str] = Field(default_factory=lambda: list(IDK_ANSWERS), min_length=1,
                               description="The 'I don't know'-style answers to draw the preferred answer from.")


def dpo_margin(win_nll: torch.Tensor, win_ref_nll: torch.Tensor, lose_nll: torch.Tensor,
               lose_ref_nll: torch.Tensor) -> torch.Tensor:
    """Per-pair DPO margin from summed NLLs: how much more the preferred answer gained over the reference
    than the dispreferred one, ``(ref_w - nll_w) - (ref_l - nll_l)`` (NLL = -log p)."""
    return (win_ref_nll - win_nll) - (lose_ref_nll - lose_nll)


def dpo_loss(margin: torch.Tensor, beta: float) -> torch.Tensor:
    """open-unlearning's DPO loss on margins: ``-(2/beta) mean log sigmoid(beta m)`` (2/beta as in NPO)."""
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


@dataclass
class PairTerms:
    """One forget batch's preference pairs: margins and both sides' summed NLLs and answer lengths, all [B]."""

    margin: torch.Tensor
    win_nll: torch.Tensor
    win_len: torch.Tensor
    lose_nll: torch.Tensor
    lose_len: torch.Tensor

    @property
    def lose_mean_nll(self) -> torch.Tensor:
        """Token-mean NLL of the dispreferred (forget) answers, detached: it rises as the model forgets."""
        return (self.lose_nll.sum() / self.lose_len.sum().clamp(min=1)).detach()

    @property
    def win_mean_nll(self) -> torch.Tensor:
        """Token-mean NLL of the preferred answers (with gradient, for an optional NLL term)."""
        return self.win_nll.sum() / self.win_len.sum().clamp(min=1)


class PreferencePairs:
    """Preferred answers aligned with the forget stream by example index, with both sides' reference NLLs cached.

    ``wins[i]`` is the preferred answer of forget example ``i`` (the dispreferred one). The loop
    shuffles every stream but ``forget``, so the preferred side is batched here from the forget
    batch's ``idx`` instead of being a stream of its own.
    """

    def __init__(self, ctx: MethodContext, wins: list[Example]) -> None:
        """Keep the preferred examples and set up one reference-NLL cache per side."""
        reference = ctx.reference()
        tok = ctx.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.wins = wins
        self.ref_lose = ExampleCache(lambda b: sequence_nll(reference, b)[0], per_token=False)
        self.ref_win = ExampleCache(lambda b: sequence_nll(reference, b)[0], per_token=False)

    def win_batch(self, lose: Batch) -> Batch:
        """The padded batch of preferred answers for a forget batch, row for row (same ``idx``)."""
        idx = [int(i) for i in lose["idx"].tolist()]
        b = collate_streams([{"win": {**self.wins[i], "idx": i}} for i in idx], self.pad_id)["win"]
        device = lose["input_ids"].device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def __call__(self, model: Any, lose: Batch) -> PairTerms:
        """Margins of a forget batch against its preferred answers (two forwards of ``model``)."""
        win = self.win_batch(lose)
        lose_nll, lose_len = sequence_nll(model, lose)
        win_nll, win_len = sequence_nll(model, win)
        ref_l, ref_w = self.ref_lose(lose).to(lose_nll.device), self.ref_win(win).to(win_nll.device)
        return PairTerms(dpo_margin(win_nll, ref_w, lose_nll, ref_l), win_nll, win_len, lose_nll, lose_len)


def idk_pairs(ctx: MethodContext, answers: list[str]) -> tuple[list[Example], list[Example]]:
    """(forget examples, IDK examples) for every forget question; the IDK answer is a seeded choice per question."""
    if not ctx.forget_items:
        raise ValueError("IdkDPO needs forget QA items (questions) to pair with 'I don't know' answers; the task has none")
    rng = random.Random(ctx.seed)
    lose = [ctx.encode_qa(q.question, q.answer, ti) for q, ti in ctx.forget_items]
    win = [ctx.encode_qa(q.question, rng.choice(answers), ti) for q, ti in ctx.forget_items]
    return lose, win


def prepare_idkdpo(ctx: MethodContext, cfg: IdkDPOConfig) -> MethodPlan:
    """Pair every forget answer with a seeded IDK answer; reference NLLs of both are cached on first use."""
    lose, win = idk_pairs(ctx, cfg.answers)
    pairs = PreferencePairs(ctx, win)

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        t = pairs(model, batch["forget"])
        f = dpo_loss(t.margin, cfg.beta)
        r = retain_term(model, ctx, batch["retain"], cfg.retain_loss)
        return {"loss": cfg.gamma * f + cfg.alpha * r, "forget_loss": cfg.gamma * f, "dpo": f, "margin": t.margin.mean().detach(),
                "forget_nll": t.lose_mean_nll, "idk_nll": t.win_mean_nll.detach(), f"retain_{cfg.retain_loss}": r}

    return MethodPlan(loss_fn=loss_fn, streams={"forget": lose, "retain": ctx.streams["retain"]}, config=cfg,
                      info={"pairs": len(lose)})


register(UnlearnMethod(
    name="idkdpo", config=IdkDPOConfig, prepare=prepare_idkdpo,
    summary="DPO preferring 'I don't know' answers to the forget answers, plus retain NLL",
    forget_term="forget_nll", forget_direction="up", retain_term="retain_nll", train_defaults=PREFERENCE_TRAIN))
