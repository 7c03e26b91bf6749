"""Hidden states at one decoder layer without running the rest of the model (RMU and R²MU).

RMU's loss reads the output of decoder layer ``l`` only, so the layers above it and the LM head
are wasted work. :func:`layer_output` runs the model as usual but a forward hook on layer ``l``
captures its output and raises :class:`StopForward`, which ends the pass there. Because it goes
through the model's own ``forward`` (embeddings, rotary embeddings, causal/padding mask), it works
for every Hugging Face decoder with a ``layers`` ModuleList (Llama, Mistral, Qwen, SmolLM, ...)
and through peft/accelerate wrappers. :func:`frozen_prefix` copies only the part of a model that
such a pass touches, so a frozen reference costs ``l+1`` layers of memory, not a whole model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the wanted layer."""


def _forward_until_stop(model: Any, handle: torch.utils.hooks.RemovableHandle, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> None:
    """Run the model until a hook raises :class:`StopForward` (or to the end), then remove the hook."""
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder's ``layers`` ModuleList (searched by name, so peft and other wrappers are fine)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in {"layers", "h", "blocks"} and len(mod) > 0:
            if n is None or len(mod) == n:
                return mod
            best = best or mod
    if best is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer list (looked for a ModuleList named "
                         f"'layers', 'h' or 'blocks'); RMU needs a decoder-only transformer")
    return best


def _check_layer(model: Any, layer: int) -> nn.Module:
    """The decoder layer module at index ``layer``, with a clear error when it is out of range."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is outside 0..{len(layers) - 1} for this {len(layers)}-layer model")
    return layers[layer]


def layer_output(model: Any, layer: int | nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 truncate: bool = True) -> torch.Tensor:
    """Output of decoder layer ``layer`` (an index or the module, [B, T, H]); ``truncate`` stops the pass there."""
    module = layer if isinstance(layer, nn.Module) else _check_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        store["h"] = out[0] if isinstance(out, tuple) else out
        if truncate:
            raise StopForward

    _forward_until_stop(model, module.register_forward_hook(hook), input_ids, attention_mask)
    if "h" not in store:
        raise RuntimeError(f"decoder layer {layer} did not run in the forward pass of {type(model).__name__}")
    return store["h"]


def layer_call_kwargs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments the model passes its decoder layers for this batch (mask, rotary embeddings...).

    Captured by a pre-hook on layer 0 that stops the pass there, so only the embedding, the mask
    and the rotary embeddings are computed.
    """
    store: dict[str, Any] = {}

    def hook(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        store["kwargs"] = dict(kwargs)
        store["nargs"] = len(args)
        raise StopForward

    _forward_until_stop(model, decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True),
                        input_ids, attention_mask)
    if store.get("nargs") != 1:
        raise RuntimeError("decoder layers are not called as layer(hidden_states, **kwargs); cannot run them directly")
    return store["kwargs"]


def run_layers(model: Any, first: int, last: int, hidden: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
    """Output of layer ``last`` computed from the input of layer ``first`` (``hidden``): layers first..last only.

    Used when every parameter below ``first`` is frozen, so that input can be cached per example.
    """
    kwargs = layer_call_kwargs(model, input_ids, attention_mask)
    layers = decoder_layers(model)
    h = hidden
    for i in range(first, last + 1):
        out = layers[i](h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h


def frozen_prefix(model: Any, layer: int) -> Any:
    """A frozen, eval-mode copy of ``model`` holding real weights only up to decoder layer ``layer``.

    Layers above ``layer`` and the LM head are replaced by empty ``Identity`` modules in the copy
    (the deep copy never duplicates them), so only :func:`layer_output` with ``truncate=True``
    may be run on it.
    """
    layers = decoder_layers(model)
    _check_layer(model, layer)
    memo: dict[int, Any] = {id(m): nn.Identity() for m in list(layers)[layer + 1:]}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        memo[id(head)] = nn.Identity()
    ref = copy.deepcopy(model, memo)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def frozen_copy(model: Any) -> Any:
    """A full frozen eval-mode copy of ``model`` (the reference NPO and KL need)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def mean_token_norm(model: Any, layer: int, batches: list[dict[str, Any]], scope_key: str = "scope") -> float:
    """Mean L2 norm of layer-``layer`` activations over the in-scope tokens of ``batches`` (RMU's c scale)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            h = layer_output(model, layer, b["input_ids"], b["attention_mask"])
            m = b.get(scope_key, b["attention_mask"]).bool()
            norms = h.float().norm(dim=-1)[m]
            total += float(norms.sum())
            count += int(norms.numel())
    if count == 0:
        raise ValueError("no in-scope tokens to measure activation norms on")
    return total / count
