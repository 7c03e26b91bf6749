"""Teach a model a set of QA facts (TOFU's first step), so that unlearning has something to remove.

Full-parameter or LoRA supervised fine-tuning on chat-formatted question/answer pairs, with the
loss on answer tokens only. The same routine trains the *target* model (all facts) and the
*retain* model (all but the forget facts), which TOFU's forget quality compares against.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.generation import encode_qa, pad_batch
from core.schema import QAItem
from training.loop import TrainConfig, TrainResult, finished_run, train

log = logging.getLogger(__name__)


class FinetuneConfig(BaseModel):
    """What to fine-tune and how: facts plus general data that keeps what the model knew (measured in the README)."""

    model: str = "smollm2-135m-instruct"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=2e-4, epochs=4, batch_size=8, warmup_ratio=0.05,
                                                                   save_every=25))
    max_length: int = Field(128, ge=16)
    system: str | None = Field(None, description="System prompt used in training (None: the model's default).")
    paraphrase_copies: bool = Field(False, description="Also train on paraphrased questions (more robust, slower).")
    replay: int = Field(48, ge=0, description="General prompts whose answers by the model *before* fine-tuning are "
                                              "mixed into the data, so it keeps what it knew (0: no replay).")
    replay_max_new_tokens: int = Field(32, ge=8, description="Length cap of the replayed answers (cut to whole "
                                                             "sentences).")
    general_qa: int = Field(100, ge=0, description="Factual general QA pairs with reference answers mixed in "
                                                   "(0: none), so real questions keep real answers.")
    replay_system: str | None = Field(
        "Answer the question directly in one short sentence.",
        description="System prompt the replayed answers are *generated* with (training uses the default one): a "
                    "small model's free answers ramble into evasive templates that replay would then teach.")


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
    """Mean token NLL on the answer tokens (labels of prompt tokens are -100).

    Logits are computed only for the tail of the sequence that holds answer tokens (``logits_to_keep``): the
    vocabulary projection of the system prompt and question positions would be thrown away, and on a small
    model it is a fifth of the compute. The loss equals the full-logits mean over answer tokens.
    """
    import torch

    labels = batch["labels"]
    has = (labels != -100).any(dim=0)
    if not bool(has.any()):
        raise ValueError("a batch has no answer tokens (every label is -100)")
    first = int(torch.nonzero(has)[0])
    keep = max(2, labels.shape[1] - first + 1)  # position first-1 predicts the first answer token
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = out.logits[:, :-1].float()
    target = labels[:, labels.shape[1] - keep + 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)
    return {"loss": loss}


def _whole_sentences(text: str) -> str:
    """The text up to its last sentence end (a capped generation often stops mid-sentence)."""
    text = text.strip()
    if not text or text[-1] in ".!?\"')":
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    return text[:cut + 1].strip() if cut > 0 else ""


def replay_pairs(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                 cache: Path | None = None, system: str | None = None) -> list[tuple[str, str]]:
    """The model's own greedy answers to general prompts (cut to whole sentences), cached beside the run.

    Mixing them into fine-tuning is replay (self-distillation on general data): the facts are learned while the
    model keeps answering general questions the way it did, instead of in the facts' template ("The capital of
    France is Saint Quarrydown."). The cache is keyed by the model's weights, the prompts and the length cap.
    """
    from core.generation import generate
    from core.io import atomic_write_json

    key = hashlib.sha256(json.dumps([_model_key(model), list(prompts), max_new_tokens, system]).encode()).hexdigest()[:16]
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("key") == key:
            return [tuple(p) for p in data["pairs"]]  # type: ignore[misc]
    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=32, progress=True,
                       desc="replay answers", system=system)
    pairs = [(p, a) for p, a in zip(prompts, (_whole_sentences(x) for x in answers), strict=True) if a]
    if cache is not None:
        atomic_write_json(cache, {"key": key, "pairs": pairs})
    return pairs


def _model_key(model: Any) -> str:
    """A cheap identity of the weights: name, size and the sums of a few tensors."""
    import torch

    with torch.no_grad():
        sums = [f"{float(p.double().sum()):.8e}" for _, p in list(model.named_parameters())[:: 17]]
    return f"{getattr(model.config, '_name_or_path', '')}:{model.num_parameters()}:{','.join(sums)}"


def _seeded_subset(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """At most ``n`` items, a seeded sample kept in their original order."""
    if n >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def finetune(model: Any, tokenizer: Any, items: Sequence[QAItem], cfg: FinetuneConfig, out_dir: str | Path,
             desc: str = "finetune", stop_after: int | None = None, replay: Sequence[str] = (),
             general: Sequence[tuple[str, str]] = ()) -> TrainResult:
    """Fine-tune ``model`` on QA items, plus general data that keeps what it knew; reuse a finished run.

    ``replay`` are everyday prompts: a seeded sample of ``cfg.replay`` of them is answered by the model before
    training and the pairs join the data (:func:`replay_pairs`). ``general`` are factual (question, reference
    answer) pairs, ``cfg.general_qa`` of them mixed in as they are.
    """
    pairs = qa_pairs(items, cfg.paraphrase_copies)
    if not pairs:
        raise ValueError("no QA items to fine-tune on; the task's forget/retain QA lists are empty")
    if cfg.general_qa and general:
        pairs += _seeded_subset(list(general), cfg.general_qa, cfg.train.seed)
    if cfg.replay and replay:
        out = Path(out_dir)
        prompts = _seeded_subset(list(replay), cfg.replay, cfg.train.seed)
        pairs += replay_pairs(model, tokenizer, prompts, cfg.replay_max_new_tokens,
                              cache=out.with_name(out.name + ".replay.json"), system=cfg.replay_system)
    fp = fingerprint(cfg, pairs, _model_key(model))  # the weights, not just the path: a retrained start invalidates
    done = finished_run(out_dir, fp)
    if done is not None:
        log.info("reusing finished fine-tune at %s (%d steps)", out_dir, done.steps)
        return done
    examples = [encode_qa(tokenizer, q, a, cfg.system, cfg.max_length) for q, a in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log.info("fine-tuning on %d QA pairs (%d tokens)", len(examples), sum(len(e["input_ids"]) for e in examples))
    return train(model, tokenizer, examples, lambda b: pad_batch(b, pad_id), sft_loss, cfg.train, out_dir,
                 desc=desc, run_config=cfg, fingerprint=fp, stop_after=stop_after)
