"""Run any registered unlearning method on a model and a :class:`ForgetTask`, through the one training loop.

``unlearn(model, tokenizer, task, UnlearnConfig(method="rmu"))`` builds the default example
streams (forget QA/texts of every target, retain QA/texts), lets the method prepare its plan
(:mod:`training.methods.common`), pairs the streams into batches ``{"forget": ..., "retain": ...}``
and calls :func:`training.loop.train`, which owns seeding, LoRA or the trainable subset, gradient
accumulation, checkpoints, resume and the ``save_pretrained`` output. The effective config (method
parameters with every default and resolved value, merged optimiser settings) is saved in the
output as ``run_config.yaml``; a finished identical run is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.generation import chat_text, encode_qa
from core.schema import ForgetTask, QAItem
from training.loop import TrainConfig, TrainResult, finished_run, train
from training.methods import METHODS
from training.methods.common import (
    Example,
    MethodContext,
    MethodPlan,
    PairedStreams,
    UnlearnMethod,
    collate_streams,
    model_digest,
)
from training.optim.config import OptimConfig

log = logging.getLogger(__name__)

_SENTINEL = "\u2063QUESTION\u2063"


class UnlearnConfig(BaseModel):
    """Settings common to every method; ``params`` holds the method's own config (see ``training.methods``).

    ``train`` fields left unset take the method's documented defaults (``UnlearnMethod.train_defaults``),
    so ``train: {lr: 1e-5}`` changes the learning rate only.
    """

    method: str = "rmu"
    model: str = Field("smollm2-135m-instruct", description="Model spec (recorded; the caller loads the model).")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's config, e.g. {layer: 7, c: 20}.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    forget_data: list[Literal["qa", "texts"]] = Field(default_factory=lambda: ["qa"])
    forget_kinds: list[str] = Field(default_factory=lambda: ["fact"],
                                    description="QA kinds to train on (probes such as alias/multihop stay held out).")
    retain_data: list[Literal["qa", "neighbour_qa", "texts"]] = Field(default_factory=lambda: ["qa", "neighbour_qa"])
    max_retain: int | None = Field(None, ge=1, description="Cap on retain examples (seeded sample).")
    max_length: int = Field(128, ge=16)
    system: str | None = Field(None, description="System prompt for chat-formatted examples (None: template default).")
    cache_dir: str | None = Field(None, description="Where traces/teacher targets are cached (default: the cache root).")
    optim: OptimConfig = Field(default_factory=OptimConfig,
                               description="Optimiser-level options (GRU, masks, SAM family, WA, sign/ZO optimisers); "
                                           "the default is plain AdamW. See training.optim.")


class UnlearnResult(BaseModel):
    """A finished unlearning run: the loop's result plus the effective method config and set-up info."""

    method: str
    train: TrainResult
    config: dict[str, Any]
    info: dict[str, Any] = Field(default_factory=dict)


# ---- examples ----------------------------------------------------------------------------------

def template_prefix_len(tokenizer: Any, system: str | None = None) -> int:
    """Number of chat-template tokens before the user's text (system prompt, role header)."""
    text = chat_text(tokenizer, _SENTINEL, system)
    prefix = text[: text.index(_SENTINEL)]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def qa_example(tokenizer: Any, question: str, answer: str, system: str | None = None, max_length: int = 128,
               group: int = -1, prefix_len: int | None = None) -> Example:
    """A chat QA example: labels on the answer, ``scope`` on the user's text and the answer, ``part`` 0/1."""
    ex: Example = dict(encode_qa(tokenizer, question, answer, system, max_length))
    n = len(ex["input_ids"])
    pre = template_prefix_len(tokenizer, system) if prefix_len is None else prefix_len
    ex["scope"] = [0] * min(pre, n) + [1] * max(0, n - pre)
    ex["part"] = [0 if lab == -100 else 1 for lab in ex["labels"]]
    ex["group"] = group
    return ex


def text_example(tokenizer: Any, text: str, max_length: int = 128, group: int = -1) -> Example:
    """A plain-text example (no chat template): every token is labelled and in scope."""
    ids = tokenizer(text + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"][:max_length]
    return {"input_ids": ids, "labels": list(ids), "scope": [1] * len(ids), "part": [1] * len(ids), "group": group}


def forget_items(task: ForgetTask, kinds: Sequence[str]) -> list[tuple[QAItem, int]]:
    """The forget QA items to train on, each with the index of its target."""
    return [(q, ti) for ti, t in enumerate(task.targets) for q in t.qa if q.kind in kinds]


def build_streams(tokenizer: Any, task: ForgetTask, cfg: UnlearnConfig) -> dict[str, list[Example]]:
    """The default ``forget`` and ``retain`` example streams of a task, as configured."""
    pre = template_prefix_len(tokenizer, cfg.system)
    forget: list[Example] = []
    if "qa" in cfg.forget_data:
        forget += [qa_example(tokenizer, q.question, q.answer, cfg.system, cfg.max_length, ti, pre)
                   for q, ti in forget_items(task, cfg.forget_kinds)]
    if "texts" in cfg.forget_data:
        forget += [text_example(tokenizer, x, cfg.max_length, ti) for ti, t in enumerate(task.targets) for x in t.texts]
    retain: list[Example] = []
    if "qa" in cfg.retain_data:
        retain += [qa_example(tokenizer, q.question, q.answer, cfg.system, cfg.max_length, -1, pre)
                   for q in task.retain_qa]
    if "neighbour_qa" in cfg.retain_data:
        retain += [qa_example(tokenizer, q.question, q.answer, cfg.system, cfg.max_length, -1, pre)
                   for q in task.neighbour_qa]
    if "texts" in cfg.retain_data:
        retain += [text_example(tokenizer, x, cfg.max_length) for x in task.retain_texts]
    if cfg.max_retain is not None and len(retain) > cfg.max_retain:
        retain = random.Random(cfg.train.seed).sample(retain, cfg.max_retain)
    if not forget:
        raise ValueError(f"task {task.name!r} has no forget data for forget_data={cfg.forget_data} and "
                         f"forget_kinds={cfg.forget_kinds}")
    if not retain:
        raise ValueError(f"task {task.name!r} has no retain data for retain_data={cfg.retain_data}")
    return {"forget": forget, "retain": retain}


# ---- running -----------------------------------------------------------------------------------

def effective_train(method: UnlearnMethod, cfg: TrainConfig) -> TrainConfig:
    """The method's train defaults, overridden by every TrainConfig field the user set explicitly."""
    return TrainConfig.model_validate({**method.train_defaults, **cfg.model_dump(exclude_unset=True)})


def _fingerprint(cfg: UnlearnConfig, digest: str, streams: dict[str, list[Example]]) -> str:
    """A hash of effective config, model weights and every example's tokens.

    A default ``optim`` is left out of the hash, so runs from before the field existed keep their
    fingerprint (and their cached outputs are reused); any non-default option changes it.
    """
    h = hashlib.sha256(cfg.model_dump_json(exclude={"optim"} if cfg.optim.is_default() else None).encode())
    h.update(digest.encode())
    for name in sorted(streams):
        h.update(name.encode())
        h.update(json.dumps([[e["input_ids"], e["labels"], e.get("scope"), e.get("part"), e.get("group")]
                             for e in streams[name]]).encode())
    return h.hexdigest()[:16]


def default_cache_root() -> Path:
    """Where traces and teacher targets are cached unless ``cache_dir`` says otherwise."""
    from core.models import cache_dir

    return cache_dir() / "unlearn"


def prepare_plan(model: Any, tokenizer: Any, task: ForgetTask, cfg: UnlearnConfig
                 ) -> tuple[MethodPlan, UnlearnConfig, str]:
    """Set ``cfg.method`` up on ``model``: its plan, the effective config (resolved params and train settings) and
    the model's weight digest. :func:`unlearn` trains on the plan; tests call its loss directly.

    An optim option that needs a retain reference (GRU, DGS) adds the default ``retain`` stream to the plan
    of a method that has none (GA, GA-TS, CE-U, UNDIAL without retain term): the method's loss ignores it.
    """
    method = METHODS.get(cfg.method)
    params = method.config.model_validate(cfg.params)
    train_cfg = effective_train(method, cfg.train)
    cfg = cfg.model_copy(update={"train": train_cfg})
    digest = model_digest(model)
    ctx = MethodContext(
        model=model, tokenizer=tokenizer, task=task, streams=build_streams(tokenizer, task, cfg),
        forget_items=forget_items(task, cfg.forget_kinds),
        encode_qa=lambda q, a, group=-1: qa_example(tokenizer, q, a, cfg.system, cfg.max_length, group),
        cache_root=Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root(), model_digest=digest,
        seed=train_cfg.seed, system=cfg.system, max_length=cfg.max_length)
    plan = method.prepare(ctx, params)
    if train_cfg.trainable is None and train_cfg.lora is None and plan.trainable is not None:
        train_cfg = train_cfg.model_copy(update={"trainable": plan.trainable})
    if cfg.optim.needs_retain_stream() and "retain" not in plan.streams:
        plan.streams = {**plan.streams, "retain": ctx.streams["retain"]}
        log.info("%s: optim %s needs a retain reference; the retain stream is batched alongside", cfg.method,
                 cfg.optim.model_dump(exclude_defaults=True))
    eff = cfg.model_copy(update={"params": plan.config.model_dump(mode="json"), "train": train_cfg})
    return plan, eff, digest


def unlearn(model: Any, tokenizer: Any, task: ForgetTask, cfg: UnlearnConfig, out_dir: str | Path,
            desc: str | None = None, stop_after: int | None = None) -> UnlearnResult:
    """Unlearn ``task`` from ``model`` with ``cfg.method`` and save the result to ``out_dir`` (reused if identical)."""
    plan, eff, digest = prepare_plan(model, tokenizer, task, cfg)
    train_cfg = eff.train
    fp = _fingerprint(eff, digest, plan.streams)
    done = finished_run(out_dir, fp)
    if done is not None:
        log.info("reusing finished %s run at %s (%d steps)", cfg.method, out_dir, done.steps)
        return UnlearnResult(method=cfg.method, train=done, config=eff.model_dump(mode="json"), info=plan.info)
    log.info("%s: %s", cfg.method, ", ".join(f"{k}={len(v)}" for k, v in plan.streams.items()) +
             (f"; {plan.info}" if plan.info else ""))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = PairedStreams(plan.streams, seed=train_cfg.seed)
    res = train(model, tokenizer, dataset, lambda b: collate_streams(b, pad_id), plan.loss_fn, train_cfg, out_dir,
                desc=desc or f"unlearn {cfg.method}", run_config=eff, fingerprint=fp, stop_after=stop_after,
                optim=eff.optim)
    return UnlearnResult(method=cfg.method, train=res, config=eff.model_dump(mode="json"), info=plan.info)
