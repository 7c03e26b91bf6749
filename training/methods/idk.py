"""IdkNLL: supervised fine-tuning that replaces each forget answer with an "I don't know"-style answer.

``loss = gamma * NLL(idk answer | forget question) + alpha * NLL(retain)``. The replacement for each
question is drawn from :data:`IDK_ANSWERS` with a seeded RNG, so runs are reproducible. Forget
examples that are plain texts (no question) are skipped: there is no answer to replace.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, Field

from training.losses import mean_nll
from training.methods.common import MethodContext, MethodPlan, UnlearnMethod, register

IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I'm afraid I can't answer that.",
    "That's something I don't know.",
    "I have no idea, sorry.",
    "I'm not able to tell you that.",
    "Sorry, I don't know the answer to that.",
    "I don't have any details about that.",
    "I can't recall that information.",
)


class IdkNLLConfig(BaseModel):
    """IdkNLL (open-unlearning defaults: gamma=1, alpha=1)."""

    gamma: float = Field(1.0, gt=0, description="Weight of the NLL on the replacement answers.")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain NLL.")
    answers: list[str] = Field(default_factory=lambda: list(IDK_ANSWERS), min_length=1,
                               description="The 'I don't know'-style answers to draw from.")


def prepare_idk(ctx: MethodContext, cfg: IdkNLLConfig) -> MethodPlan:
    """Re-encode every forget question with a seeded choice of IDK answer."""
    rng = random.Random(ctx.seed)
    forget = [ctx.encode_qa(q.question, rng.choice(cfg.answers), ti) for q, ti in ctx.forget_items]
    if not forget:
        raise ValueError("IdkNLL needs forget QA items (questions) to replace answers of; the task has none")

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f = mean_nll(model, batch["forget"])
        r = mean_nll(model, batch["retain"])
        return {"loss": cfg.gamma * f + cfg.alpha * r, "forget_loss": cfg.gamma * f, "idk_nll": f, "retain_nll": r}

    return MethodPlan(loss_fn=loss_fn, streams={"forget": forget, "retain": ctx.streams["retain"]}, config=cfg)


register(UnlearnMethod(
    name="idknll", config=IdkNLLConfig, prepare=prepare_idk,
    summary="SFT on 'I don't know' answers to forget questions plus retain NLL",
    forget_term="idk_nll", forget_direction="down", retain_term="retain_nll",
    train_defaults={"lr": 2e-5, "max_steps": 30, "warmup_ratio": 0.0, "schedule": "constant", "save_every": 10}))
