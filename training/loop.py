"""The one training loop behind fine-tuning and every unlearning method.

A method supplies ``loss_fn(model, batch) -> dict`` (the dict holds ``"loss"`` and any named terms
for the progress bar); the loop owns everything else: seeding, the trainable-parameter set or
LoRA, gradient accumulation, clipping, the LR schedule, progress, atomic checkpoints, resume after
interruption, and an ordinary ``save_pretrained`` output. A non-default ``optim``
(:class:`training.optim.OptimConfig`: GRU, masks, SAM family, weight averaging, sign / zeroth-order
optimisers) replaces ``backward + step`` by :class:`training.optim.step.RobustStep`; the default
takes the plain path below, bit for bit. It runs through ``accelerate``, so the
same code runs on CPU here and on one or several GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from core.config import save_config
from core.io import atomic_dir, atomic_write_json
from training.optim.config import OptimConfig

log = logging.getLogger(__name__)

LossFn = Callable[[Any, dict[str, Any]], dict[str, Any]]
CHECKPOINT_VERSION = 1


class LoraSettings(BaseModel):
    """LoRA adapter settings (peft); merged into the base weights when the run ends."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])


class TrainConfig(BaseModel):
    """Optimisation settings shared by fine-tuning and unlearning."""

    lr: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: str = Field("cosine", pattern="^(cosine|linear|constant)$")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    save_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    trainable: list[str] | None = Field(None, description="Regexes of parameter names to train; None trains all.")
    lora: LoraSettings | None = None


class TrainResult(BaseModel):
    """What a finished run reports: steps, time, final loss terms, where the model went."""

    steps: int
    seconds: float
    resumed_from: int = 0
    final_terms: dict[str, float] = Field(default_factory=dict)
    history: list[dict[str, float]] = Field(default_factory=list)
    out_dir: str


def select_trainable(model: Any, patterns: Sequence[str] | None) -> list[str]:
    """Freeze every parameter whose name matches none of ``patterns``; return the trainable names."""
    names = []
    compiled = [re.compile(p) for p in patterns] if patterns else None
    for name, p in model.named_parameters():
        keep = compiled is None or any(c.search(name) for c in compiled)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter matches trainable patterns {list(patterns or [])}; "
                         f"examples of names: {[n for n, _ in list(model.named_parameters())[:4]]}")
    return names


def _schedule(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine, linear or constant."""
    warm = int(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else max(0.0, 1 - frac)

    return f


def _checkpoint_dir(out_dir: Path) -> Path:
    """Checkpoints live beside the output, so that the output can be replaced in one rename."""
    return out_dir.with_name(out_dir.name + ".ckpt")


def _save_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, step: int,
                     history: list[dict[str, float]], fingerprint: str, loss_fn: Any = None,
                     robust: Any = None) -> None:
    """Write trainable weights, optimizer, RNG and loss state atomically (the old checkpoint survives a crash).

    A loss with ``state_dict()`` (e.g. PDU's dual variable) has it saved too, so resume continues it, and
    so does the optimiser-level state of a :class:`~training.optim.step.RobustStep` (``state["optim"]``).
    """
    import torch
    from safetensors.torch import save_file

    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(ckpt) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state()}
        if callable(getattr(loss_fn, "state_dict", None)):
            state["loss_fn"] = loss_fn.state_dict()
        if robust is not None:
            state["optim"] = robust.state_dict()
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "progress.json", {"version": CHECKPOINT_VERSION, "step": step,
                                                  "history": history, "fingerprint": fingerprint})


def _load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, fingerprint: str,
                     loss_fn: Any = None, robust: Any = None) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`_save_checkpoint`; returns (step, history)."""
    import torch
    from safetensors.torch import load_file

    progress = json.loads((ckpt / "progress.json").read_text())
    if progress.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{ckpt}: checkpoint version {progress.get('version')} is not {CHECKPOINT_VERSION}; delete it to restart")
    if progress.get("fingerprint") != fingerprint:
        raise ValueError(f"{ckpt}: checkpoint belongs to a different run (config or data changed); "
                         f"delete it to restart, or rerun with the original settings")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "loss_fn" in state and callable(getattr(loss_fn, "load_state_dict", None)):
        loss_fn.load_state_dict(state["loss_fn"])
    if robust is not None:
        if "optim" not in state:
            raise ValueError(f"{ckpt}: checkpoint has no optimiser-level state for this run's optim options; "
                             "delete it to restart")
        robust.load_state_dict(state["optim"])
    return int(progress["step"]), list(progress["history"])


def train(model: Any, tokenizer: Any, dataset: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]],
          loss_fn: LossFn, cfg: TrainConfig, out_dir: str | Path, desc: str = "train",
          run_config: BaseModel | None = None, fingerprint: str = "",
          stop_after: int | None = None, optim: OptimConfig | None = None) -> TrainResult:
    """Optimise ``loss_fn`` over ``dataset`` and save an ordinary Hugging Face checkpoint to ``out_dir``.

    An interrupted run resumes from ``<out_dir>.ckpt`` when called again with the same
    ``fingerprint`` (a hash of config and data chosen by the caller); ``stop_after`` ends the run
    after that many steps without writing the output (used to test resume). ``optim`` selects the
    optimiser-level options (:mod:`training.optim`); None or the default config is plain AdamW.
    """
    import torch
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
        torch.manual_seed(cfg.seed)
    else:
        select_trainable(model, cfg.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    accel = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available())
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(list(range(len(dataset))), batch_size=cfg.batch_size, shuffle=True,
                                         generator=gen, collate_fn=lambda idx: collate([dataset[i] for i in idx]))
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    robust = None
    if optim is None or optim.is_default():
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        from training.optim.step import RobustStep, build_optimizer

        if accel.num_processes > 1:
            raise ValueError("the optim options take gradients with torch.autograd.grad, outside DDP's all-reduce; "
                             "run them in one process")
        optimizer = build_optimizer(params, cfg.lr, cfg.weight_decay, optim)
        robust = RobustStep(optim, params, cfg.grad_accum, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)

    ckpt = _checkpoint_dir(out_dir)
    step, history = 0, []
    if (ckpt / "progress.json").exists():
        step, history = _load_checkpoint(ckpt, accel.unwrap_model(model), optimizer, scheduler, fingerprint, loss_fn,
                                         robust)
        log.info("resuming %s from step %d (%s)", desc, step, ckpt)
    if robust is not None and not robust.ready:
        robust.setup(model, lambda stream: _setup_batches(dataset, collate, stream, cfg.batch_size))
    resumed_from = step
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not accel.is_main_process)
    terms: dict[str, float] = {}
    micro = step * cfg.grad_accum  # micro-batches consumed so far, to skip on resume
    epoch = micro // len(loader)
    while step < total:
        gen.manual_seed(cfg.seed + epoch)  # one fixed shuffle per epoch: resume sees the same order
        skip = micro - epoch * len(loader)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            with accel.accumulate(model):
                if robust is None:
                    out = loss_fn(model, batch)
                    accel.backward(out["loss"])
                    if accel.sync_gradients and cfg.max_grad_norm:
                        accel.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                else:
                    out = robust.micro(model, batch, loss_fn)
                    if accel.sync_gradients:
                        robust.apply_gradients()
                        if cfg.max_grad_norm:
                            accel.clip_grad_norm_(params, cfg.max_grad_norm)
                        robust.optimizer_step(optimizer)
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            if not accel.sync_gradients:
                continue
            step += 1
            terms = {k: float(v.detach()) if hasattr(v, "detach") else float(v) for k, v in out.items()
                     if k != "forget_loss"}  # a part of "loss" kept for the optim options, not a term of its own
            history.append({"step": step, **terms})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
            if step % cfg.save_every == 0 or step == total:
                _save_checkpoint(ckpt, accel.unwrap_model(model), optimizer, scheduler, step, history, fingerprint,
                                 loss_fn, robust)
            if step >= total or (stop_after is not None and step >= stop_after):
                break
        else:
            epoch += 1
            continue
        if stop_after is not None and step >= stop_after and step < total:
            bar.close()
            return TrainResult(steps=step, seconds=time.perf_counter() - t0, resumed_from=resumed_from,
                               final_terms=terms, history=history, out_dir=str(out_dir))
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - t0
    if robust is not None:
        robust.finalize()
    final = accel.unwrap_model(model)
    if cfg.lora is not None:
        final = final.merge_and_unload()
    final.eval()
    result = TrainResult(steps=step, seconds=seconds, resumed_from=resumed_from, final_terms=terms,
                         history=history, out_dir=str(out_dir))
    if accel.is_main_process:
        with atomic_dir(out_dir) as tmp:
            final.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "train_result.json", {**result.model_dump(), "fingerprint": fingerprint})
            if run_config is not None:
                save_config(run_config, tmp / "run_config.yaml")
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _setup_batches(dataset: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]], stream: str,
                   batch_size: int) -> Any:
    """Batches covering each example of ``stream`` once, in order (for set-up passes such as SalUn's mask)."""
    streams = getattr(dataset, "streams", None)
    n = len(streams[stream]) if isinstance(streams, dict) and stream in streams else len(dataset)
    for i in range(0, n, batch_size):
        yield collate([dataset[j] for j in range(i, min(n, i + batch_size))])


def finished_run(out_dir: str | Path, fingerprint: str) -> TrainResult | None:
    """The result of a completed run with this fingerprint at ``out_dir``, or None (so callers can reuse it)."""
    f = Path(out_dir) / "train_result.json"
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    if data.pop("fingerprint", None) != fingerprint:
        return None
    return TrainResult.model_validate(data)
