"""What every metric shares: the result type, the one ``METRICS`` registry and model unpacking."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from core.registry import Registry


class MetricResult(BaseModel):
    """A metric's mean value plus its per-item values, so reports can show distributions."""

    name: str
    value: float
    per_item: list[float] = []
    details: dict[str, Any] = Field(default_factory=dict)


# Every metric registers here by name: ``METRICS.get("truth_ratio")(...)``.
METRICS: Registry[Callable[..., MetricResult]] = Registry("metric")


def resolve_model(model: Any, tokenizer: Any | None) -> tuple[Any, Any]:
    """Accept ``(model, tokenizer)`` or a ``LoadedLLM`` with ``tokenizer=None``, so callers need not unpack."""
    if tokenizer is None:
        inner, tok = getattr(model, "model", None), getattr(model, "tokenizer", None)
        if inner is None or tok is None:
            raise TypeError("tokenizer is None, so model must be a core.models.LoadedLLM "
                            f"(with .model and .tokenizer); got {type(model).__name__}")
        return inner, tok
    return model, tokenizer


def finite_mean(values: Sequence[float]) -> float:
    """Mean over the finite values (NaN marks an item that could not be scored); NaN if there are none."""
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def check_pairs(name_a: str, a: Sequence[Any], name_b: str, b: Sequence[Any]) -> None:
    """Raise a clear error when two sequences that must pair up have different lengths."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {name_a} but {len(b)} {name_b}; they must pair up one to one")
