"""The one training loop behind fine-tuning and every unlearning method.

A method supplies ``loss_fn(model, batch) -> dict`` (the dict holds ``"loss"`` and any named terms
for the progress bar); the loop owns everything else: seeding, the trainable-parameter set or
LoRA, gradient accumulation, clipping, the LR schedule, progress, atomic checkpoints, resume after
interruption, and an ordinary ``save_pretrained`` output. A non-default ``optim``
(:class:`training.optim.OptimConfig`: GRU, masks, SAM family, weight averaging, sign / zeroth-order
optimisers) replaces ``backward + step`` by :class:`training.optim.step.RobustStep`; the default
takes the plain path below, bit for bit. It runs through ``accelerate``, so the
same code runs on CPU here and on one or several GPUs.

Several processes (``accelerate launch``): ``batch_size`` is the micro-batch of all processes together,
each process trains on its contiguous share of it, so a step sees ``batch_size * grad_accum`` examples
whatever the number of processes and the same config follows the same trajectory (up to float rounding;
exactly the one-process gradients when the shares carry equal weight, e.g. equal token counts for a
token-mean loss). Under DDP-style launches (``--multi_gpu``, also on CPU over gloo) every process keeps
the whole, unwrapped model, so each method's own forward passes (hooks, truncated passes, layers run
directly) work as in one process, and the loop averages the gradients over the processes once per
optimizer step (:func:`_average_gradients`; :class:`~training.optim.step.RobustStep` averages its
gradient parts before it combines them, so every optim option acts on the global gradients). Under FSDP /
DeepSpeed the model is sharded by ``accelerate``, checkpoints go through its ``save_state``, and only the
default optim is accepted. Only the main process shows progress and writes checkpoints and the output.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch over all processes together: under "
                                                 "`accelerate launch` each of N processes takes its share (N at "
                                                 "most), so one optimizer step sees batch_size * grad_accum "
                                                 "examples whatever N, and the same config is the same run.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
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

    progress = _read_progress(ckpt, fingerprint, sharded=False)
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


def _read_progress(ckpt: Path, fingerprint: str, sharded: bool) -> dict[str, Any]:
    """A checkpoint's ``progress.json``, checked: version, fingerprint, and the kind of run that wrote it."""
    progress = json.loads((ckpt / "progress.json").read_text())
    if progress.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{ckpt}: checkpoint version {progress.get('version')} is not {CHECKPOINT_VERSION}; delete it to restart")
    if progress.get("fingerprint") != fingerprint:
        raise ValueError(f"{ckpt}: checkpoint belongs to a different run (config or data changed); "
                         f"delete it to restart, or rerun with the original settings")
    if bool(progress.get("sharded", False)) != sharded:
        written = "with" if progress.get("sharded") else "without"
        raise ValueError(f"{ckpt}: checkpoint was written by a run {written} FSDP/DeepSpeed; resume it with the same "
                         "kind of launch, or delete it to restart")
    return progress


def _save_sharded_checkpoint(accel: Any, ckpt: Path, step: int, history: list[dict[str, float]],
                             fingerprint: str) -> None:
    """FSDP / DeepSpeed: every process writes its shards through ``accelerate``'s ``save_state``; the main one swaps
    the finished directory in (a crash between its two renames leaves ``.<name>.old``, and the run restarts)."""
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    if accel.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accel.wait_for_everyone()
    accel.save_state(str(tmp))
    accel.wait_for_everyone()
    if accel.is_main_process:
        atomic_write_json(tmp / "progress.json", {"version": CHECKPOINT_VERSION, "step": step, "history": history,
                                                  "fingerprint": fingerprint, "sharded": True})
        old = ckpt.with_name(f".{ckpt.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    accel.wait_for_everyone()


def _load_sharded_checkpoint(accel: Any, ckpt: Path, fingerprint: str) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`_save_sharded_checkpoint`; returns (step, history)."""
    progress = _read_progress(ckpt, fingerprint, sharded=True)
    accel.load_state(str(ckpt))
    return int(progress["step"]), list(progress["history"])


# ---- several processes ----------------------------------------------------------------------------------

def _shard(idx: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This process's contiguous share of a global micro-batch, and its weight ``len(share) * world / len(idx)``.

    With the weight on each process's loss, the average over processes is the mean over the micro-batch's
    examples also when the shares differ in size (a short last batch); it is 1 for equal shares. A process
    left without an example takes the first one at weight 0, so it still joins every collective.
    """
    if world == 1:
        return idx, 1.0
    base, extra = divmod(len(idx), world)
    start = rank * base + min(rank, extra)
    part = idx[start:start + base + (1 if rank < extra else 0)]
    if not part:
        return idx[:1], 0.0
    return part, len(part) * world / len(idx)


def _collective(tensors: Sequence[Any], world: int, op: str, bucket_numel: int = 1 << 24) -> None:
    """All-reduce to the mean (``op="mean"``) or broadcast from the main process (``"broadcast"``), in place,
    a few flattened buckets per dtype and device rather than one collective per tensor."""
    import torch
    import torch.distributed as dist

    groups: dict[tuple[Any, Any], list[Any]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        start = 0
        while start < len(group):
            end, size = start + 1, group[start].numel()
            while end < len(group) and size + group[end].numel() <= bucket_numel:
                size += group[end].numel()
                end += 1
            chunk = group[start:end]
            flat = torch.cat([t.detach().reshape(-1) for t in chunk])
            if op == "mean":
                dist.all_reduce(flat)
                flat.div_(world)
            else:
                dist.broadcast(flat, 0)
            with torch.no_grad():
                for t, f in zip(chunk, flat.split([t.numel() for t in chunk]), strict=True):
                    t.copy_(f.view_as(t))
            start = end


def _average_gradients(params: Sequence[Any], world: int) -> None:
    """Average the accumulated ``.grad`` over the processes, once per optimizer step (DDP's all-reduce, by hand).

    A parameter that has a gradient in some process but not in this one gets zeros first, so every process
    steps the same parameters.
    """
    import torch
    import torch.distributed as dist

    have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(have)
    grads = []
    for p, h in zip(params, have.tolist(), strict=True):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    _collective(grads, world, "mean")


def _global_terms(terms: dict[str, float], weight: float, world: int, device: Any) -> dict[str, float]:
    """The loss terms of the whole micro-batch (every process's terms, weighted as its loss), on every process."""
    import torch
    import torch.distributed as dist

    if not terms:
        return terms
    t = torch.tensor([v * weight for v in terms.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(terms, t.tolist(), strict=True)}


_SHARDED = ("FSDP", "DEEPSPEED")
_REPLICATED = ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
               "MULTI_HPU", "MULTI_NEURON")


def is_main_process() -> bool:
    """Whether this is the main process of an ``accelerate launch`` / ``torchrun`` run, or the only process: the one
    that evaluates and prints, so N processes do not each run the evaluation and print the result."""
    return int(os.environ.get("RANK", "0")) == 0


def check_processes(cfg: TrainConfig, loss_fn: Any, optim: OptimConfig | None, world: int, kind: str) -> None:
    """Refuse, with what is accepted instead, the settings that would be wrong in ``world`` processes or sharded.

    ``kind`` is accelerate's distributed type (``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``, ...).
    """
    if kind in _SHARDED and optim is not None and not optim.is_default():
        raise ValueError(f"the optim options {optim.model_dump(exclude_defaults=True)} need whole gradient tensors, "
                         f"which {kind} shards; accepted: every optim option under DDP-style launches "
                         f"(`accelerate launch --multi_gpu`), or the default optim under {kind}")
    if kind in _SHARDED and cfg.lora is not None:
        raise ValueError(f"train.lora is merged into the whole model at the end, which {kind} shards; train LoRA "
                         "under a DDP-style launch (`accelerate launch --multi_gpu`), or full parameters under "
                         f"{kind}")
    if world == 1:
        return
    if kind not in _SHARDED + _REPLICATED:
        raise ValueError(f"the training loop runs in several processes with DDP-style launches "
                         f"(`accelerate launch --multi_gpu`, also on CPU), FSDP or DeepSpeed; not {kind}")
    if cfg.batch_size < world:
        raise ValueError(f"train.batch_size={cfg.batch_size} is the micro-batch of all {world} processes together "
                         f"(each trains on its share); it must be at least {world}, best a multiple of it")
    if callable(getattr(loss_fn, "state_dict", None)):
        raise ValueError(f"the loss {type(loss_fn).__name__} keeps a state that it updates from its own batch (e.g. "
                         f"PDU's dual variable), which would differ between the {world} processes; run this method "
                         "in one process")
    if cfg.batch_size % world:
        log.warning("train.batch_size=%d is not a multiple of %d processes: the shares differ in size and are "
                    "weighted by their number of examples", cfg.batch_size, world)


def train(model: Any, tokenizer: Any, dataset: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]],
          loss_fn: LossFn, cfg: TrainConfig, out_dir: str | Path, desc: str = "train",
          run_config: BaseModel | None = None, fingerprint: str = "",
          stop_after: int | None = None, optim: OptimConfig | None = None) -> TrainResult:
    """Optimise ``loss_fn`` over ``dataset`` and save an ordinary Hugging Face checkpoint to ``out_dir``.

    An interrupted run resumes from ``<out_dir>.ckpt`` when called again with the same
    ``fingerprint`` (a hash of config and data chosen by the caller); ``stop_after`` ends the run
    after that many steps without writing the output (used to test resume). ``optim`` selects the
    optimiser-level options (:mod:`training.optim`); None or the default config is plain AdamW.
    Under ``accelerate launch`` every process calls it the same way (see the module docstring); each
    returns the same result, once the main process has written the output.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, send_to_device

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
    # split_batches: batch_size is the global micro-batch, so the scheduler steps once per optimizer step.
    accel = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available(),
                        dataloader_config=DataLoaderConfiguration(split_batches=True))
    world, rank, kind = accel.num_processes, accel.process_index, accel.distributed_type.name
    check_processes(cfg, loss_fn, optim, world, kind)
    sharded = kind in _SHARDED  # FSDP / DeepSpeed, also in one process
    replicated = world > 1 and not sharded  # whole model in every process; the loop averages the gradients
    on_device = accel.device.type != "cpu"  # batches are collated on the CPU
    gen = torch.Generator().manual_seed(cfg.seed)
    # The loader yields the indices of a global micro-batch: every process draws the same ones, then collates its share.
    loader = torch.utils.data.DataLoader(list(range(len(dataset))), batch_size=cfg.batch_size, shuffle=True,
                                         generator=gen, collate_fn=list)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    robust = None
    if optim is None or optim.is_default():
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        from training.optim.step import RobustStep, build_optimizer

        optimizer = build_optimizer(params, cfg.lr, cfg.weight_decay, optim)
        robust = RobustStep(optim, params, cfg.grad_accum, total,
                            reduce=(lambda ts: _collective(ts, world, "mean")) if replicated else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total))
    if replicated:
        # No DDP wrapper: methods run their own forwards (hooks, truncated passes, single layers), which DDP's
        # reducer would not see; device placement (and mixed precision) only, and the gradients averaged below.
        model = accel.prepare_model(model, evaluation_mode=True)
        optimizer, scheduler = accel.prepare(optimizer, scheduler)
    else:
        if kind == "DEEPSPEED":
            plugin = accel.state.deepspeed_plugin
            for key, value in (("train_micro_batch_size_per_gpu", math.ceil(cfg.batch_size / world)),
                               ("gradient_clipping", cfg.max_grad_norm or 0.0)):
                if plugin.is_auto(key):
                    plugin.deepspeed_config[key] = value
        model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)
        if sharded:
            params = [p for p in model.parameters() if p.requires_grad]  # the sharded module's own parameters
    if accel.gradient_accumulation_steps != cfg.grad_accum:
        raise ValueError(f"the accelerate launch / config sets gradient_accumulation_steps="
                         f"{accel.gradient_accumulation_steps}; leave it out (train.grad_accum={cfg.grad_accum} "
                         "sets it, and the step count follows it)")

    ckpt = _checkpoint_dir(out_dir)
    step, history = 0, []
    if (ckpt / "progress.json").exists():
        if sharded:
            step, history = _load_sharded_checkpoint(accel, ckpt, fingerprint)
        else:
            step, history = _load_checkpoint(ckpt, accel.unwrap_model(model), optimizer, scheduler, fingerprint,
                                             loss_fn, robust)
        log.info("resuming %s from step %d (%s)", desc, step, ckpt)
    if replicated:
        _collective([*model.parameters(), *model.buffers()], world, "broadcast")  # all start from the main's weights
    if robust is not None and not robust.ready:
        robust.setup(model, lambda stream: (send_to_device(b, accel.device) if on_device else b
                                            for b in _setup_batches(dataset, collate, stream, cfg.batch_size)))
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
        for i, idx in enumerate(loader):
            if i < skip:
                continue
            part, weight = _shard(idx, rank, world)
            batch = collate([dataset[j] for j in part])
            if on_device:
                batch = send_to_device(batch, accel.device)
            with accel.accumulate(model):
                if robust is None:
                    out = loss_fn(model, batch)
                    accel.backward(out["loss"] if weight == 1.0 else out["loss"] * weight)
                    if accel.sync_gradients and replicated:
                        _average_gradients(params, world)
                    if accel.sync_gradients and cfg.max_grad_norm:
                        _clip(accel, model, params, cfg.max_grad_norm)
                    optimizer.step()
                else:
                    out = robust.micro(model, batch, loss_fn, weight)
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
            if world > 1:
                terms = _global_terms(terms, weight, world, accel.device)
            history.append({"step": step, **terms})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()})
            if step % cfg.save_every == 0 or step == total:
                if sharded:
                    _save_sharded_checkpoint(accel, ckpt, step, history, fingerprint)
                else:
                    if accel.is_main_process:
                        _save_checkpoint(ckpt, accel.unwrap_model(model), optimizer, scheduler, step, history,
                                         fingerprint, loss_fn, robust)
                    if world > 1:
                        accel.wait_for_everyone()  # a process that stops here must not resume from an older one
            if step >= total or (stop_after is not None and step >= stop_after):
                break
        else:
            epoch += 1
            continue
        if stop_after is not None and step >= stop_after and step < total:
            bar.close()
            if world > 1:
                accel.wait_for_everyone()
            return TrainResult(steps=step, seconds=time.perf_counter() - t0, resumed_from=resumed_from,
                               final_terms=terms, history=history, out_dir=str(out_dir))
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - t0
    if robust is not None:
        robust.finalize()
    state = accel.get_state_dict(model) if sharded else None  # gathers the shards; every process takes part
    final = accel.unwrap_model(model)
    if cfg.lora is not None:
        final = final.merge_and_unload()
    final.eval()
    result = TrainResult(steps=step, seconds=seconds, resumed_from=resumed_from, final_terms=terms,
                         history=history, out_dir=str(out_dir))
    if accel.is_main_process:
        with atomic_dir(out_dir) as tmp:
            if state is None:
                final.save_pretrained(tmp)
            else:
                final.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "train_result.json", {**result.model_dump(), "fingerprint": fingerprint})
            if run_config is not None:
                save_config(run_config, tmp / "run_config.yaml")
        shutil.rmtree(ckpt, ignore_errors=True)
    if world > 1:
        accel.wait_for_everyone()  # the other processes may read out_dir as soon as they return
    return result


def _clip(accel: Any, model: Any, params: Sequence[Any], max_norm: float) -> None:
    """Clip the global gradient norm; FSDP (v1) computes it over its shards itself, even when only some weights train."""
    if accel.distributed_type.name == "FSDP" and not accel.is_fsdp2:
        model.clip_grad_norm_(max_norm)
    else:
        accel.clip_grad_norm_(params, max_norm)


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
