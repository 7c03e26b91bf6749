"""Typed detector results shared with the guard: scores in [0, 1], never bare booleans."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EvidenceKind = Literal["entity", "embedding", "classifier", "rule"]


class Evidence(BaseModel):
    """One reason a prompt or an output matched a forget target."""

    model_config = ConfigDict(frozen=True)

    kind: EvidenceKind
    target_id: str
    score: float = Field(ge=0.0, le=1.0)
    detail: str = ""


class Detection(BaseModel):
    """The detector's verdict on one prompt: ``score`` in [0, 1] is compared with ``threshold``."""

    model_config = ConfigDict(frozen=True)

    flagged: bool
    score: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)
    target_ids: list[str] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)
    about: list[str] = Field(default_factory=list)
    """Targets the text is about: the flagged ones and any it names, flagged or not (in full, or by a first name,
    surname or near miss that points to no one else); the guard passes them to the output check."""
