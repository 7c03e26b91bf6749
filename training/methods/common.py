"""The one trainer interface every unlearning method implements, and the registry that lists them.

A method is a :class:`UnlearnMethod`: a pydantic config class with documented defaults, and a
``prepare(ctx, cfg) -> MethodPlan`` function. ``prepare`` sees a :class:`MethodContext` (the model
before unlearning, its tokenizer, the task, the default forget and retain example streams, a lazy
frozen reference) and returns the loss function over a batch ``{"forget": ..., "retain": ...,
<extra streams>}`` plus the streams it wants batched. The loss follows open-unlearning's contract
``loss = gamma * forget_term + alpha * retain_term`` and returns its named terms for the progress
bar, among them ``forget_loss``: the undetached, already-weighted forget part of ``loss`` (so
``loss - forget_loss`` is the retain part), which the optimiser-level options of
:mod:`training.optim` (GRU, SAM, masks) act on. :func:`training.unlearn.unlearn` does the rest through :func:`training.loop.train`.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

from core.generation import pad_batch
from core.registry import Registry
from core.schema import ForgetTask, QAItem

log = logging.getLogger(__name__)

Example = dict[str, Any]
Batch = dict[str, Any]
LossFn = Callable[[Any, dict[str, Batch]], dict[str, Any]]


@dataclass
class MethodPlan:
    """What ``prepare`` hands back: the loss, the example streams to batch, default trainable params."""

    loss_fn: LossFn
    streams: dict[str, list[Example]]
    config: BaseModel
    trainable: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodContext:
    """Everything a method may use to set itself up (the model is still the original here)."""

    model: Any
    tokenizer: Any
    task: ForgetTask
    streams: dict[str, list[Example]]
    forget_items: list[tuple[QAItem, int]]
    encode_qa: Callable[..., Example]
    cache_root: Path
    model_digest: str
    seed: int = 0
    system: str | None = None
    max_length: int = 128
    _reference: Any = None

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (layer-indexed defaults scale with it)."""
        return int(self.model.config.num_hidden_layers)

    def reference(self) -> Any:
        """A frozen full copy of the original model, made on first use (NPO, KL retain)."""
        if self._reference is None:
            from training.activations import frozen_copy

            self._reference = frozen_copy(self.model)
        return self._reference


@dataclass(frozen=True)
class UnlearnMethod:
    """A registered method: config class, set-up function and what its loss terms mean.

    ``forget_term`` names the loss-dict entry that measures forgetting and ``forget_direction``
    says whether it rises ("up", e.g. GA's forget NLL) or falls ("down", e.g. RMU's MSE to c*u)
    as the model forgets; ``retain_term`` names the utility-preservation entry (None if the
    method has none). Tests and reports read these instead of special-casing methods.
    """

    name: str
    config: type[BaseModel]
    prepare: Callable[[MethodContext, Any], MethodPlan]
    summary: str
    forget_term: str
    forget_direction: Literal["up", "down"]
    retain_term: str | None
    train_defaults: dict[str, Any] = field(default_factory=dict)


METHODS: Registry[UnlearnMethod] = Registry("unlearning method")


def register(method: UnlearnMethod) -> UnlearnMethod:
    """Add a method to :data:`METHODS` under its name."""
    return METHODS.register(method.name)(method)


class ExampleCache:
    """Per-example outputs of a frozen model, computed once per example and re-padded for each batch.

    ``compute(sub_batch)`` returns either ``[b, T, ...]`` token values (stored without padding)
    or ``[b]`` scalars. Keys are the examples' ``idx`` within one stream, so one cache per stream.
    """

    def __init__(self, compute: Callable[[Batch], torch.Tensor], per_token: bool) -> None:
        """Wrap ``compute``; ``per_token`` says whether it returns token values or one scalar per row."""
        self.compute = compute
        self.per_token = per_token
        self.store: dict[int, torch.Tensor] = {}
        self.computed_rows = 0

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Cached values for the rows of ``batch`` (zeros on padding for token values)."""
        ids = [int(i) for i in batch["idx"].tolist()]
        lengths = batch["attention_mask"].sum(-1).tolist()
        missing = [r for r, i in enumerate(ids) if i not in self.store]
        if missing:
            rows = torch.tensor(missing)
            width = int(max(lengths[r] for r in missing))
            sub = {k: v[rows][:, :width] if v.dim() == 2 else v[rows] for k, v in batch.items()
                   if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                out = self.compute(sub).detach()
            self.computed_rows += len(missing)
            for j, r in enumerate(missing):
                self.store[ids[r]] = out[j, : int(lengths[r])].clone() if self.per_token else out[j].clone()
        if not self.per_token:
            return torch.stack([self.store[i] for i in ids])
        first = self.store[ids[0]]
        out = torch.zeros((len(ids), batch["input_ids"].size(1), *first.shape[1:]), dtype=first.dtype)
        for r, i in enumerate(ids):
            v = self.store[i]
            out[r, : v.size(0)] = v
        return out


def steering_vector(hidden: int, seed: int, key: str) -> torch.Tensor:
    """RMU's random direction ``u`` for one target: uniform [0,1) entries, normalised, seeded by (seed, key).

    This follows the WMDP reference code (``torch.rand`` then normalise); the same seed and target
    id always give the same vector, on any machine.
    """
    s = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(s)
    u = torch.rand(hidden, generator=g, dtype=torch.float64)
    return (u / u.norm()).to(torch.float32)


def scaled_layer(num_layers: int, layer: int | None, fraction: float) -> int:
    """A layer index: ``layer`` if given (negative counts from the top), else ``round(fraction * num_layers)``."""
    if layer is None:
        layer = round(fraction * num_layers)
    elif layer < 0:
        layer += num_layers
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1} for a {num_layers}-layer model")
    return min(layer, num_layers - 1)


# ---- what the runner and the methods share: paired example streams, batches, weight fingerprints ----

class PairedStreams(torch.utils.data.Dataset):
    """Items ``{stream: example}``: item i takes example ``i mod len`` of each stream.

    The length is that of the longest stream, so every retain example is seen in one pass even
    when the forget set is small; streams other than ``forget`` are shuffled once (seeded) so the
    pairs mix. Nothing here draws random numbers at batch time: resume replays identical batches.
    """

    def __init__(self, streams: dict[str, list[Example]], seed: int = 0) -> None:
        """Index each stream's examples (``idx``) and fix the pairing order."""
        if "forget" not in streams:
            raise ValueError(f"streams need a 'forget' stream; got {sorted(streams)}")
        self.streams: dict[str, list[Example]] = {}
        for name, items in streams.items():
            if not items:
                raise ValueError(f"stream {name!r} is empty")
            indexed = [{**e, "idx": i} for i, e in enumerate(items)]
            if name != "forget":
                random.Random(f"{seed}:{name}").shuffle(indexed)
            self.streams[name] = indexed
        self.n = max(len(v) for v in self.streams.values())

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Example]:
        return {name: items[i % len(items)] for name, items in self.streams.items()}


def collate_streams(items: Sequence[dict[str, Example]], pad_id: int) -> dict[str, dict[str, Any]]:
    """Right-pad each stream of a list of paired items into a batch with scope/part/group/idx tensors."""
    out: dict[str, dict[str, Any]] = {}
    for name in items[0]:
        exs = [it[name] for it in items]
        b = pad_batch(exs, pad_id)
        n = b["input_ids"].size(1)
        for key in ("scope", "part"):
            t = torch.zeros((len(exs), n), dtype=torch.long)
            for r, e in enumerate(exs):
                v = e.get(key, [1] * len(e["input_ids"]))
                t[r, : len(v)] = torch.tensor(v)
            b[key] = t
        b["group"] = torch.tensor([int(e.get("group", -1)) for e in exs])
        b["idx"] = torch.tensor([int(e["idx"]) for e in exs])
        out[name] = b
    return out


def model_digest(model: Any) -> str:
    """A cheap fingerprint of a model's weights (name, shape and sums of every tensor)."""
    h = hashlib.sha256(str(getattr(model.config, "_name_or_path", "")).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}{float(p.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]
