"""The guard's contracts: the detector protocol it codes against, its errors, and the trace it returns."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, computed_field

from core.generation import Prompt
from core.schema import ForgetTarget
from detectors.types import Detection

_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")


def redact(text: str | bytes) -> str:
    """A log-safe stand-in for a prompt, an answer or an upstream body: its length and a short hash, never its words."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    unit = "chars" if isinstance(text, str) else "bytes"
    return f"<redacted {len(text)} {unit} sha256:{hashlib.sha256(raw).hexdigest()[:10]}>"


def safe_token(value: object) -> str | None:
    """``value`` when it is a short identifier-like token (an error code, a class name), else None: no free text
    from an upstream or an exception reaches a client."""
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None


@runtime_checkable
class DetectorProtocol(Protocol):
    """What the guard needs from a detector (``detectors.detector`` implements it; tests use fakes)."""

    def detect(self, prompt: Prompt) -> Detection:
        """Verdict on one prompt: a string, or chat messages whose every turn is judged."""
        ...

    def detect_batch(self, prompts: Sequence[Prompt]) -> list[Detection]:
        """Verdicts on many prompts, in order."""
        ...

    def detect_leak(self, text: str) -> Detection:
        """Verdict on model output: does it reveal a forget target's facts? A detector may also take ``about`` (the
        target ids the conversation is about, :attr:`Detection.about`): the guard passes it when it does."""
        ...


class Stage(str, Enum):
    """A guard stage that can fail: the prompt check, the CoT guard model, the output check."""

    DETECTOR = "detector"
    GUARD = "guard"
    OUTPUT_CHECK = "output_check"


class Fault(BaseModel):
    """One failed guard stage, as a value: the HTTP layer, the metrics and the logs read its fields."""

    stage: Stage
    timeout: bool = False
    error: str = Field(description="The exception's class name.")
    message: str = ""

    @classmethod
    def of(cls, stage: Stage, err: BaseException) -> Fault:
        """The fault of ``err`` at ``stage`` (a timeout anywhere in its cause chain makes it a timeout)."""
        timeout, cur, seen = False, err, 0
        while cur is not None and seen < 8:
            timeout = timeout or isinstance(cur, TimeoutError)
            cur, seen = cur.__cause__, seen + 1
        return cls(stage=stage, timeout=timeout, error=err.__class__.__name__, message=str(err))

    @property
    def metric(self) -> str:
        """The Prometheus fault label: e.g. ``detector_timeout``, ``guard_model_error``."""
        name = "guard_model" if self.stage is Stage.GUARD else self.stage.value
        return f"{name}_{'timeout' if self.timeout else 'error'}"

    def __str__(self) -> str:
        return f"{self.stage.value}: {self.error}: {self.message}"


class GuardError(RuntimeError):
    """Base of the guard's own errors."""


class GuardUnavailableError(GuardError):
    """The detector or the guard model failed or timed out and the guard fails closed (HTTP 503)."""

    def __init__(self, fault: Fault) -> None:
        """Keep the fault, so the HTTP layer and logs can say which stage failed and how."""
        super().__init__(f"guard unavailable ({fault.stage.value}): {fault.error}: {fault.message}")
        self.fault = fault
        self.stage = fault.stage.value


class BackendError(GuardError):
    """A model backend failed (upstream HTTP error, engine error); the message says which and why.

    ``kind`` tells the HTTP layer and the metrics what went wrong: 'unreachable', 'timeout',
    'http_error', 'bad_response' (not JSON, wrong schema), 'stream_cut', 'stream_error' or 'error'.
    """

    KINDS = ("unreachable", "timeout", "http_error", "bad_response", "stream_cut", "stream_error", "error")

    def __init__(self, message: str, kind: str = "error") -> None:
        """Keep the message and the failure kind (one of ``KINDS``)."""
        if kind not in self.KINDS:
            raise ValueError(f"unknown BackendError kind {kind!r}; accepted: {', '.join(self.KINDS)}")
        super().__init__(message)
        self.kind = kind


class RequestFieldError(GuardError, ValueError):
    """A request field holds a value the backend cannot take (HTTP 400 naming ``field``), found before any model
    call: a logit_bias id outside the vocabulary, a schema that cannot be compiled, a bad vendor field."""

    code = "invalid_value"

    def __init__(self, field: str, message: str) -> None:
        """The request field and what was wrong with it (and what is accepted)."""
        super().__init__(message)
        self.field = field


class UnsupportedFeatureError(RequestFieldError):
    """A request uses an optional chat feature the target backend does not implement (HTTP 400 naming ``field``)."""

    code = "unsupported"


class AdminError(GuardError):
    """A run-time target change could not be made (e.g. the detector does not support it)."""


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class GuardTrace(BaseModel):
    """What the guard did for one request: verdict, targets, instruction, output check and stage timings."""

    flagged: bool = False
    score: float = 0.0
    threshold: float = 0.0
    target_ids: list[str] = Field(default_factory=list)
    requires_refusal: bool = False
    cot_instruction: str | None = None
    instruction_source: Literal["none", "llm", "template"] = "none"
    fallback_reason: str | None = None
    parts_removed: int = Field(0, description="Parts of the last user turn that the detector flagged on their own "
                               "and that were removed before the target answered the rest (GuardConfig.split_mixed).")
    output_check_fired: bool = False
    output_check_mode: str = "off"
    output_checks: int = 0
    leak_target_ids: list[str] = Field(default_factory=list)
    blocked_parts: list[str] = Field(default_factory=list, description="What the output check blocked, one entry "
                                     "per blocked part of a choice: 'content', 'json', 'reasoning', 'tool_call'.")
    choices_blocked: int = 0
    logprobs_withheld: bool = Field(False, description="Alternative tokens (top_logprobs) were withheld: the "
                                    "conversation is about a forget target, or they named one.")
    fail_open_used: bool = False
    faults: list[Fault] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def errors(self) -> list[str]:
        """The faults as text (``"stage: Error: message"``), for logs and clients; code reads ``faults``."""
        return [str(f) for f in self.faults]

    def add_time(self, stage: str, seconds: float) -> None:
        """Accumulate a stage's wall time in milliseconds."""
        self.timings_ms[stage] = round(self.timings_ms.get(stage, 0.0) + seconds * 1000.0, 3)


class GuardResult(BaseModel):
    """An answer (its first choice) plus its trace; ``finish_reason`` is 'content_filter' when the guard refused or
    blocked it. ``others`` holds choices 1..n-1 (each checked on its own, sharing the trace)."""

    text: str
    finish_reason: FinishReason = "stop"
    trace: GuardTrace
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: dict[str, Any] | None = None
    reasoning: str | None = Field(None, description="The target's reasoning where its server returns it apart, checked "
                                  "like the answer (None when there is none or the choice was blocked).")
    others: list[GuardResult] = Field(default_factory=list)

    @property
    def blocked(self) -> bool:
        """Whether this choice is the guard's refusal (of the prompt, or of an answer the output check blocked)."""
        return self.finish_reason == "content_filter"

    def choices(self) -> list[GuardResult]:
        """Every choice, the first one included, in order."""
        return [self, *self.others]


class TargetBook:
    """Resolves target ids to their policy and names: from the detector where it can, else a local mapping."""

    def __init__(self, detector: Any, targets: Sequence[ForgetTarget] | None = None) -> None:
        """Keep the detector and an optional id -> target mapping (a ForgetTask's targets)."""
        self._detector = detector
        self._local: dict[str, ForgetTarget] = {t.id: t for t in targets or []}

    def get(self, target_id: str) -> ForgetTarget | None:
        """Return the target with this id, or None when neither the detector nor the mapping knows it."""
        if target_id in self._local:
            return self._local[target_id]
        lookup = getattr(self._detector, "target", None)
        if callable(lookup):
            try:
                t = lookup(target_id)
            except (KeyError, LookupError):
                return None
            if isinstance(t, ForgetTarget):
                return t
        return self._from_store(target_id)

    def _from_store(self, target_id: str) -> ForgetTarget | None:
        """Read id/kind/names/policy from a detector's store snapshot (``detectors.detector.Detector``)."""
        snapshot = getattr(getattr(self._detector, "store", None), "snapshot", None)
        if not callable(snapshot):
            return None
        try:
            snap = snapshot()
            rec = snap.targets[snap.num_of[target_id]]
            kind = rec.kind if rec.kind in {"privacy", "copyright", "hazard"} else "privacy"
            return ForgetTarget(id=rec.id, kind=kind, names=list(rec.names) or [rec.id],
                                policy=rec.policy or "Do not reveal information covered by this forget target.")
        except (AttributeError, KeyError, LookupError, ValueError):
            return None

    def add(self, target: ForgetTarget) -> None:
        """Remember a target added at run time."""
        self._local[target.id] = target

    def remove(self, target_id: str) -> None:
        """Forget a target removed at run time."""
        self._local.pop(target_id, None)

    def ids(self) -> list[str]:
        """Every target id known locally or to the detector."""
        ids = set(self._local)
        det_ids = getattr(self._detector, "target_ids", None)
        if callable(det_ids):
            det_ids = det_ids()
        if det_ids is None:
            targets = getattr(self._detector, "targets", None)
            if callable(targets):
                targets = targets()
            if isinstance(targets, dict):
                det_ids = list(targets)
            elif isinstance(targets, list | tuple):
                det_ids = [getattr(t, "id", t) for t in targets]
        ids.update(str(i) for i in det_ids or [])
        return sorted(ids)
