"""RMU, representation misdirection for unlearning (Li et al. 2024, the WMDP paper).

At decoder layer ``l`` the activations of forget tokens are pushed towards ``c * u`` (``u`` a
random unit vector, one per target, seeded) and those of retain tokens are held at the frozen
model's: ``loss = gamma * mse(h_l(x_f), c u) + alpha * mse(h_l(x_r), h_l^frozen(x_r))``, padding
masked out. Only the MLP down-projections of layers ``l-2..l`` train by default.

Three things make it cheap (:mod:`training.activations`): the forward pass stops right after layer
``l`` (a hook raises); the frozen activations come from a copy of the first ``l+1`` layers,
computed once per retain example and cached; and when everything below the lowest trainable layer
``p`` (``l-2`` by default) is frozen, each example's input to layer ``p`` is cached too, so a step
runs only layers ``p..l`` (checked once against the full pass; otherwise the truncated pass is used).

Scaling ``c``: WMDP uses ``c = 6.5`` at layer 7 of zephyr-7b. ``c`` only makes sense relative to
the size of the activations it replaces, so by default it is set to ``c_scale`` times the mean
per-token L2 norm of the frozen model's layer-``l`` activations on the forget data
(``c_scale=4`` measured to work on SmolLM2-135M, see :class:`RMUConfig`; the resolved ``c`` is recorded
in the run config).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from training.activations import decoder_layers, frozen_prefix, layer_output, mean_token_norm, run_layers
from training.losses import masked_mse
from training.methods.common import (
    ExampleCache,
    MethodContext,
    MethodPlan,
    UnlearnMethod,
    collate_streams,
    register,
    scaled_layer,
    steering_vector,
)

log = logging.getLogger(__name__)


class RMUConfig(BaseModel):
    """RMU settings; the defaults are the ones that met the targets on the fine-tuned SmolLM2-135M.

    Measured on the offline benchmark (SmolLM2-135M-Instruct fine-tuned on it, 30 layers, hidden 576):
    ``layer=None`` (7/32 of the depth: layer 7), ``c_scale=4`` (mean in-scope norm at layer 7 is 143,
    so c = 572), ``alpha=100``, down-projections of layers 5-7, AdamW lr 1e-2 constant for 30 steps
    of 8 forget + 8 retain examples (the method's train defaults): forget-fact ROUGE-L recall
    0.959 -> 0.369, retain-QA ROUGE-L recall 0.957 -> 0.950. lr 1e-3 barely moved it (0.88 forget);
    ``c_scale=2`` also passes (0.434 forget, retain unchanged).
    """

    layer: int | None = Field(None, description="Decoder layer l; None: round(layer_fraction * num_layers).")
    layer_fraction: float = Field(7 / 32, gt=0, lt=1, description="WMDP's layer 7 of 32, scaled to the model.")
    c: float | None = Field(None, gt=0, description="Steering coefficient; None: c_scale * mean activation norm.")
    c_scale: float = Field(4.0, gt=0, description="c as a multiple of the mean per-token norm at layer l.")
    gamma: float = Field(1.0, gt=0, description="Weight of the forget MSE.")
    alpha: float = Field(100.0, ge=0, description="Weight of the retain MSE (WMDP: 1200 for zephyr-7b).")
    param_layers: list[int] | None = Field(None, description="Layers whose module trains; None: l-2..l.")
    param_module: str = Field("mlp.down_proj", description="Module (within each layer) that trains.")
    scope: Literal["content", "all"] = Field("content", description="Forget tokens: user text + answer, or all.")
    seed: int = Field(0, description="Seed of the per-target random directions u.")
    prefix_cache: bool = Field(True, description="Cache each example's input to the lowest trainable layer and run "
                                                 "only the layers from there to l (when everything below is frozen).")


class RMUCore:
    """The parts RMU and R²MU share: layer, per-target ``c u``, truncated forwards, frozen-activation caches."""

    def __init__(self, ctx: MethodContext, cfg: RMUConfig) -> None:
        """Resolve layer and c on the original model, copy its first l+1 layers as the frozen reference."""
        self.layer = scaled_layer(ctx.num_layers, cfg.layer, cfg.layer_fraction)
        self.scope_key = "scope" if cfg.scope == "content" else "attention_mask"
        hidden = int(ctx.model.config.hidden_size)
        self.norm = None
        c = cfg.c
        if c is None:

            forget = [{**e, "idx": i} for i, e in enumerate(ctx.streams["forget"])]
            pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
            batches = [collate_streams([{"f": e} for e in forget[i:i + 16]], pad)["f"] for i in range(0, len(forget), 16)]
            self.norm = mean_token_norm(ctx.model, self.layer, batches, self.scope_key)
            c = cfg.c_scale * self.norm
        self.c = float(c)
        self.u = torch.stack([steering_vector(hidden, cfg.seed, t.id) for t in ctx.task.targets])
        self.frozen = frozen_prefix(ctx.model, self.layer)
        self.caches: dict[str, ExampleCache] = {}
        self._module: dict[int, torch.nn.Module] = {}
        self.config = cfg.model_copy(update={"layer": self.layer, "c": self.c})
        self.param_layers = self._param_layers(cfg)
        self.first = min(self.param_layers)
        self.use_prefix = cfg.prefix_cache and self.first > 0
        self._prefix_ok: dict[int, bool] = {}

    def _param_layers(self, cfg: RMUConfig) -> list[int]:
        """The layers whose ``param_module`` trains: ``param_layers`` or l-2..l, checked against l."""
        layers = cfg.param_layers if cfg.param_layers is not None else list(range(max(0, self.layer - 2), self.layer + 1))
        bad = [i for i in layers if not 0 <= i <= self.layer]
        if bad or not layers:
            raise ValueError(f"param_layers {bad or layers} must be non-empty and within 0..{self.layer}: layers above "
                             f"l={self.layer} do not affect RMU's loss")
        return sorted(layers)

    def trainable(self, cfg: RMUConfig) -> list[str]:
        """Regexes for the default trainable set: ``param_module`` of layers l-2..l (or ``param_layers``)."""
        mod = re.escape(cfg.param_module)
        return [rf"(?:^|\.)layers\.{i}\.{mod}\.weight$" for i in self.param_layers]

    def _prefix_usable(self, model: Any, stream: str, batch: dict[str, Any]) -> bool:
        """Whether layers below ``first`` are frozen in ``model`` and running from the cached input is exact."""
        key = id(model)
        if key not in self._prefix_ok:
            layers = decoder_layers(model)
            below = [p for m in [*list(layers)[: self.first], model.get_input_embeddings()] for p in m.parameters()]
            ok = not any(p.requires_grad for p in below)
            if ok:
                with torch.no_grad():
                    ref = layer_output(model, self.layer, batch["input_ids"], batch["attention_mask"])
                    fast = run_layers(model, self.first, self.layer, self.input_cache(stream, batch),
                                      batch["input_ids"], batch["attention_mask"])
                m = batch["attention_mask"].bool()
                err = float((ref - fast)[m].abs().max())
                ok = err <= 1e-3 * max(1.0, float(ref[m].abs().max()))
                if not ok:
                    log.warning("running layers %d..%d from cached inputs differs from the full pass (max err %.3g); "
                                "using the truncated full pass", self.first, self.layer, err)
            else:
                log.info("parameters below layer %d train: RMU runs the truncated pass from the embeddings", self.first)
            self._prefix_ok[key] = ok
        return self._prefix_ok[key]

    def input_cache(self, stream: str, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen input of layer ``first`` (output of layer first-1), cached per example of ``stream``."""
        name = f"input:{stream}"
        if name not in self.caches:
            self.caches[name] = ExampleCache(
                lambda b: layer_output(self.frozen, self.first - 1, b["input_ids"], b["attention_mask"]), per_token=True)
        return self.caches[name](batch)

    def hidden(self, model: Any, batch: dict[str, Any], stream: str) -> torch.Tensor:
        """Layer-l activations of the model being trained: from the cached input of the lowest trainable layer
        when layers below it are frozen, else a forward pass that stops after layer l."""
        if self.use_prefix and self._prefix_usable(model, stream, batch):
            return run_layers(model, self.first, self.layer, self.input_cache(stream, batch), batch["input_ids"],
                              batch["attention_mask"])
        key = id(model)
        if key not in self._module:
            self._module[key] = decoder_layers(model)[self.layer]
        return layer_output(model, self._module[key], batch["input_ids"], batch["attention_mask"])

    def frozen_hidden(self, stream: str, batch: dict[str, Any]) -> torch.Tensor:
        """Layer-l activations of the frozen original, cached per example of ``stream``."""
        if stream not in self.caches:
            self.caches[stream] = ExampleCache(
                lambda b: layer_output(self.frozen, self.layer, b["input_ids"], b["attention_mask"]), per_token=True)
        return self.caches[stream](batch)

    def forget_mse(self, model: Any, stream: str, batch: dict[str, Any]) -> torch.Tensor:
        """MSE between the in-scope activations of forget tokens and their target's ``c u``."""
        groups = batch["group"]
        if bool((groups < 0).any()):
            raise ValueError("a forget example has no target (group -1); RMU needs a target per forget example")
        h = self.hidden(model, batch, stream)
        target = (self.c * self.u[groups]).to(h.dtype).unsqueeze(1)
        return masked_mse(h, target, batch[self.scope_key])

    def retain_mse(self, model: Any, stream: str, batch: dict[str, Any]) -> torch.Tensor:
        """MSE between the model's and the frozen model's activations of retain tokens (padding masked)."""
        return masked_mse(self.hidden(model, batch, stream), self.frozen_hidden(stream, batch), batch["attention_mask"])


def prepare_rmu(ctx: MethodContext, cfg: RMUConfig) -> MethodPlan:
    """Set up RMU: resolve layer and c, trainable down-projections, the loss over forget/retain batches."""
    core = RMUCore(ctx, cfg)

    def loss_fn(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        f = core.forget_mse(model, "forget", batch["forget"])
        r = core.retain_mse(model, "retain", batch["retain"])
        return {"loss": cfg.gamma * f + cfg.alpha * r, "forget_loss": cfg.gamma * f, "forget_mse": f, "retain_mse": r}

    info = {"layer": core.layer, "c": round(core.c, 4), "mean_norm": core.norm}
    return MethodPlan(loss_fn=loss_fn, streams=ctx.streams, config=core.config, trainable=core.trainable(cfg), info=info)


RMU_TRAIN = {"lr": 1e-2, "max_steps": 30, "batch_size": 8, "warmup_ratio": 0.0, "schedule": "constant",
             "save_every": 10}

register(UnlearnMethod(
    name="rmu", config=RMUConfig, prepare=prepare_rmu,
    summary="steer layer-l activations of forget data to c*u, keep retain activations (WMDP)",
    forget_term="forget_mse", forget_direction="down", retain_term="retain_mse", train_defaults=RMU_TRAIN))
