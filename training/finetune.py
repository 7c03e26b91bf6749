"""Teach a model a set of QA facts (TOFU's first step), so that unlearning has something to remove.

Full-parameter or LoRA supervised fine-tuning on chat-formatted question/answer pairs, with the
loss on answer tokens only. The same routine trains the *target* model (all facts) and the
*retain* model (all but the forget facts), which TOFU's forget quality compares against.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.generation import encode_qa, pad_batch
from core.schema import QAItem
from training.loop import TrainConfig, TrainResult, finished_run, train

log = logging.getLogger(__name__)


class FinetuneConfig(BaseModel):
    """What to fine-tune and how; the defaults memorise the offline benchmark on a 2-core CPU in <20 min."""

    model: str = "smollm2-135m-instruct"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=2e-4, epochs=6, batch_size=8, warmup_ratio=0.05,
                                                                   save_every=25))
    max_length: int = Field(128, ge=16)
    system: str | None = Field(None, description="System prompt used in training (None: the model's default).")
    paraphrase_copies: bool = Field(False, description="Also train on paraphrased questions (more robust, slower).")


def qa_pairs(items: Sequence[QAItem], paraphrases: bool = False) -> list[tuple[str, str]]:
    """The (question, answer) pairs to train on; optionally add each paraphrased question."""
    pairs = [(q.question, q.answer) for q in items]
    if paraphrases:
        pairs += [(q.paraphrased_question, q.answer) for q in items if q.paraphrased_question]
    return pairs


def fingerprint(cfg: BaseModel, pairs: Sequence[tuple[str, str]], model_id: str) -> str:
    """A hash of config, data and base model: a checkpoint resumes, and a result is reused, only if it matches."""
    h = hashlib.sha256()
    h.update(cfg.model_dump_json().encode())
    h.update(model_id.encode())
    h.update(json.dumps(list(pairs)).encode())
    return h.hexdigest()[:16]


def sft_loss(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Mean token NLL on the answer tokens (labels of prompt tokens are -100)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return {"loss": out.loss}


def finetune(model: Any, tokenizer: Any, items: Sequence[QAItem], cfg: FinetuneConfig, out_dir: str | Path,
             desc: str = "finetune", stop_after: int | None = None) -> TrainResult:
    """Fine-tune ``model`` on QA items and save it to ``out_dir``; reuse a finished identical run."""
    pairs = qa_pairs(items, cfg.paraphrase_copies)
    if not pairs:
        raise ValueError("no QA items to fine-tune on; the task's forget/retain QA lists are empty")
    fp = fingerprint(cfg, pairs, str(getattr(model.config, "_name_or_path", "")) + str(model.num_parameters()))
    done = finished_run(out_dir, fp)
    if done is not None:
        log.info("reusing finished fine-tune at %s (%d steps)", out_dir, done.steps)
        return done
    examples = [encode_qa(tokenizer, q, a, cfg.system, cfg.max_length) for q, a in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log.info("fine-tuning on %d QA pairs (%d tokens)", len(examples), sum(len(e["input_ids"]) for e in examples))
    return train(model, tokenizer, examples, lambda b: pad_batch(b, pad_id), sft_loss, cfg.train, out_dir,
                 desc=desc, run_config=cfg, fingerprint=fp, stop_after=stop_after)
