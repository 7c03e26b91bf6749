"""Weight-side attacks: relearning, out-of-domain fine-tuning, and 8-/4-bit weight quantization.

Each returns a *new* :class:`~core.models.LoadedLLM`; the input model is deep-copied and never
modified. Fine-tuning attacks reuse :func:`training.finetune.finetune` (the project's one training
loop). Quantization is round-to-nearest with symmetric absmax scales per output channel or per group
of input columns, as in the simple (RTN) setting of "Catastrophic Failure of LLM Unlearning via
Quantization" (Zhang et al., 2024); the integers are dequantized straight back to the weights' dtype,
so the model runs as usual while carrying exactly the quantized values.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from core.schema import ForgetTask, QAItem
from eval.attacks.base import AttackConfig, AttackError, SystemKind, WeightAttack, register_attack

if TYPE_CHECKING:
    import torch

    from core.models import LoadedLLM

log = logging.getLogger(__name__)


def copy_llm(llm: LoadedLLM, model: Any | None = None, source: str | None = None) -> LoadedLLM:
    """A new LoadedLLM around ``model`` (default: a deep copy of ``llm.model``), sharing the tokenizer."""
    from core.models import LoadedLLM

    return LoadedLLM(model=model if model is not None else copy.deepcopy(llm.model), tokenizer=llm.tokenizer,
                     source=source or llm.source, path=None)


# ---------------------------------------------------------------------------------------------
# Fine-tuning attacks


class FinetuneAttackConfig(AttackConfig):
    """How many examples, how many steps, how fast; LoRA optional."""

    num_examples: int | None = Field(8, ge=1, description="QA items sampled (seeded) to train on (None: all).")
    steps: int = Field(20, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(128, ge=16)
    lora_r: int | None = Field(None, ge=1, description="Train a LoRA adapter of this rank (merged) instead of all weights.")
    out_dir: str | None = Field(None, description="Where to save the attacked model (None: a temporary directory).")


class _FinetuneAttack(WeightAttack):
    """Shared machinery: pick the items, fine-tune a deep copy with training.finetune, load the result."""

    config_cls = FinetuneAttackConfig
    config: FinetuneAttackConfig

    def pool(self, task: ForgetTask) -> list[QAItem]:
        """The QA items this attack may train on."""
        raise NotImplementedError

    def training_items(self, task: ForgetTask | None) -> list[QAItem]:
        """The items the attack trains on (seeded sample of the pool), so evaluation can hold them out."""
        if task is None:
            raise AttackError(f"the {self.name!r} attack needs the task to draw its training items from")
        pool = self.pool(task)
        if not pool:
            raise AttackError(f"task {task.name!r} has no items for the {self.name!r} attack to train on")
        n = self.config.num_examples
        if n is None or n >= len(pool):
            return list(pool)
        idx = sorted(self.rng("items").sample(range(len(pool)), n))
        return [pool[i] for i in idx]

    def apply(self, llm: LoadedLLM, task: ForgetTask | None = None) -> LoadedLLM:
        """Fine-tune a deep copy of the model on :meth:`training_items` and return it."""
        from training.finetune import FinetuneConfig, finetune
        from training.loop import LoraSettings, TrainConfig

        items = self.training_items(task)
        lora = LoraSettings(r=self.config.lora_r, alpha=2 * self.config.lora_r) if self.config.lora_r else None
        cfg = FinetuneConfig(model=llm.source, max_length=self.config.max_length, train=TrainConfig(
            lr=self.config.lr, max_steps=self.config.steps, batch_size=self.config.batch_size, warmup_ratio=0.0,
            schedule="constant", seed=self.seed, save_every=max(self.config.steps, 1), lora=lora))
        model = copy.deepcopy(llm.model)
        source = f"{llm.source}+{self.name}(n={len(items)},steps={self.config.steps},lr={self.config.lr:g},seed={self.seed})"
        with tempfile.TemporaryDirectory(prefix=f"unlearn-guard-{self.name}-") as tmp:
            out_dir = Path(self.config.out_dir) if self.config.out_dir else Path(tmp) / "model"
            result = finetune(model, llm.tokenizer, items, cfg, out_dir, desc=self.name)
            log.info("%s: %d steps in %.1fs, final loss %s", self.name, result.steps, result.seconds,
                     result.final_terms.get("loss"))
            # finetune trains in place, except when it reuses a finished run or merges LoRA into a new
            # module; reloading what it saved is right in every case.
            if self.config.out_dir or lora is not None:
                model = _load_like(out_dir, llm.model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return copy_llm(llm, model=model, source=source)


def _load_like(path: Path, like: Any) -> Any:
    """Load a saved causal LM with the dtype and device of ``like``."""
    from transformers import AutoModelForCausalLM

    p = next(like.parameters())
    return AutoModelForCausalLM.from_pretrained(path, dtype=p.dtype).to(p.device)


@register_attack
class RelearnAttack(_FinetuneAttack):
    """Fine-tune on a few forget examples: if the knowledge was only hidden, it comes back fast."""

    name: ClassVar[str] = "relearn"
    description: ClassVar[str] = ("Relearning: fine-tune the unlearned weights on a few forget QA items (count, steps "
                                  "and lr configurable); evaluate on the other forget items, which were not retrained.")

    def pool(self, task: ForgetTask) -> list[QAItem]:
        """The forget facts (the probes, alias and multi-hop, stay for evaluation)."""
        return [q for q in task.forget_qa if q.kind == "fact"]


class OODFinetuneConfig(FinetuneAttackConfig):
    """Out-of-domain fine-tuning draws from retain and/or neighbour data only."""

    source: Literal["retain", "neighbour", "retain+neighbour"] = "retain"


@register_attack
class OODFinetuneAttack(_FinetuneAttack):
    """Fine-tune on benign retain data only: unrelated training can undo shallow unlearning."""

    name: ClassVar[str] = "ood-finetune"
    description: ClassVar[str] = ("Out-of-domain fine-tuning: fine-tune the unlearned weights on retain (benign, "
                                  "never-forgotten) QA items only, then measure whether forget knowledge resurfaces.")
    config_cls = OODFinetuneConfig
    config: OODFinetuneConfig

    def pool(self, task: ForgetTask) -> list[QAItem]:
        """Retain and/or neighbour QA, never a forget item."""
        pool: list[QAItem] = []
        if "retain" in self.config.source:
            pool += task.retain_qa
        if "neighbour" in self.config.source:
            pool += task.neighbour_qa
        return pool


# ---------------------------------------------------------------------------------------------
# Quantization


def quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest symmetric absmax quantization of a 2-D weight, returned dequantized (same dtype).

    Scales are per output channel (row) when ``group_size`` is None, else per group of
    ``group_size`` consecutive input columns within a row (the last group may be shorter). Each
    value becomes ``clamp(round(w / s), -q, q) * s`` with ``q = 2**(bits-1) - 1`` and ``s = absmax / q``,
    so the error is at most ``s / 2`` per element.
    """
    import torch

    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    if g < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    pad = (-cols) % g
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    grouped = wp.reshape(rows, -1, g)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group stays zero
    q = torch.clamp(torch.round(grouped / scale), -qmax, qmax)
    deq = (q * scale).reshape(rows, -1)[:, :cols]
    return deq.to(weight.dtype)


def quant_error_bound(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Per-element bound on the rounding error of :func:`quantize_dequantize`: half a quantization step."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    pad = (-cols) % g
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    scale = wp.reshape(rows, -1, g).abs().amax(dim=-1, keepdim=True) / qmax
    return (scale / 2).expand(rows, wp.shape[1] // g, g).reshape(rows, -1)[:, :cols]


class QuantizeConfig(AttackConfig):
    """Bit width, grouping and which Linear layers to leave alone."""

    bits: int = Field(8, ge=2, le=16)
    group_size: int | None = Field(None, ge=1, description="Columns per scale; None: one scale per output channel.")
    skip: list[str] = Field(default_factory=lambda: ["lm_head"],
                            description="Module-name substrings left in full precision (the LM head, as is usual).")


def quantize_model(model: Any, bits: int, group_size: int | None = None, skip: list[str] | None = None) -> list[str]:
    """Quantize-dequantize every ``nn.Linear`` weight of ``model`` in place; returns the quantized module names."""
    import torch

    done = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not any(s in name for s in (skip or [])):
                mod.weight.copy_(quantize_dequantize(mod.weight, bits, group_size))
                done.append(name)
    if not done:
        raise AttackError(f"no nn.Linear layer to quantize (skip={skip}); is this a transformers causal LM?")
    return done


class _QuantizeAttack(WeightAttack):
    """Quantize the Linear weights of a deep copy; a model whose forgetting is a tiny weight shift snaps back."""

    config_cls = QuantizeConfig
    config: QuantizeConfig
    applies_to: ClassVar[tuple[SystemKind, ...]] = ("weights", "original")

    def apply(self, llm: LoadedLLM, task: ForgetTask | None = None) -> LoadedLLM:
        """Return a quantized (then dequantized) deep copy; the task is not needed."""
        model = copy.deepcopy(llm.model)
        names = quantize_model(model, self.config.bits, self.config.group_size, self.config.skip)
        log.info("%s: quantized %d Linear layers to %d bits", self.name, len(names), self.config.bits)
        grouping = "per-channel" if self.config.group_size is None else f"g{self.config.group_size}"
        return copy_llm(llm, model=model, source=f"{llm.source}+int{self.config.bits}-rtn-{grouping}")


class Quantize8Config(QuantizeConfig):
    """8-bit per-channel by default."""

    bits: int = Field(8, ge=2, le=16)


class Quantize4Config(QuantizeConfig):
    """4-bit with groups of 128 columns by default (per channel where a layer is narrower)."""

    bits: int = Field(4, ge=2, le=16)
    group_size: int | None = Field(128, ge=1)


@register_attack
class Quantize8bitAttack(_QuantizeAttack):
    """8-bit RTN quantization of the Linear weights."""

    name: ClassVar[str] = "quantize-8bit"
    description: ClassVar[str] = ("8-bit weight quantization: round-to-nearest, symmetric absmax per output channel, "
                                  "of every Linear layer but the LM head, dequantized back to fp32. Also run on the "
                                  "original model as the reference for what quantization alone costs.")
    config_cls = Quantize8Config
    config: Quantize8Config


@register_attack
class Quantize4bitAttack(_QuantizeAttack):
    """4-bit group-wise RTN quantization of the Linear weights."""

    name: ClassVar[str] = "quantize-4bit"
    description: ClassVar[str] = ("4-bit weight quantization: round-to-nearest, symmetric absmax per group of 128 input "
                                  "columns, of every Linear layer but the LM head, dequantized back to fp32 (the "
                                  "setting where unlearned knowledge resurfaces most in Zhang et al., 2024). Also run "
                                  "on the original model as the reference.")
    config_cls = Quantize4Config
    config: Quantize4Config
