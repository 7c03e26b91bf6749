"""An oracle detector built from a task's target names and questions: for tests, benchmarks and demos.

It is not the product's detector (``detectors/`` is): it flags a prompt that names a target (any alias,
case-insensitive, word-bounded) or that is one of the target's own questions, and it calls output a
leak when it names a target *and* states one of that target's fact values.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from core.schema import ForgetTarget, ForgetTask
from detectors.types import Detection, Evidence
from guard.backends.base import Backend, GenOutput, GenParams, Messages

_STOP = {"the", "of", "a", "an", "is", "was", "and", "in", "at", "to", "for", "with", "what", "which", "who", "its"}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def fact_values(target: ForgetTarget) -> list[str]:
    """The values a leak would state: ``meta['facts']`` values, else answer words absent from the question."""
    facts = target.meta.get("facts")
    if isinstance(facts, dict) and facts:
        return sorted({str(v) for v in facts.values() if str(v).strip()})
    vals: set[str] = set()
    names = {w for n in target.names for w in _norm(n).split()}
    for qa in target.qa:
        q = set(_norm(qa.question).split())
        for w in _norm(qa.answer).split():
            if w not in q and w not in names and w not in _STOP and len(w) > 3:
                vals.add(w)
    return sorted(vals)


class OracleDetector:
    """Keyword/question oracle implementing ``guard.types.DetectorProtocol`` plus run-time target changes."""

    def __init__(self, targets: ForgetTask | Iterable[ForgetTarget], threshold: float = 0.5) -> None:
        """Index names, questions and fact values of each target."""
        self.threshold = threshold
        self._lock = threading.Lock()
        self._targets: dict[str, ForgetTarget] = {}
        for t in targets.targets if isinstance(targets, ForgetTask) else targets:
            self.add_target(t)

    def add_target(self, target: ForgetTarget) -> None:
        """Start guarding a target."""
        with self._lock:
            self._targets[target.id] = target

    def remove_target(self, target_id: str) -> bool:
        """Stop guarding a target; False when it was unknown."""
        with self._lock:
            return self._targets.pop(target_id, None) is not None

    def target(self, target_id: str) -> ForgetTarget:
        """The target with this id (KeyError when unknown)."""
        return self._targets[target_id]

    def target_ids(self) -> list[str]:
        """Ids of the guarded targets."""
        return sorted(self._targets)

    @staticmethod
    def _names_in(target: ForgetTarget, text: str) -> list[str]:
        low = _norm(text)
        return [n for n in target.names if re.search(rf"(?<![a-z0-9]){re.escape(_norm(n))}(?![a-z0-9])", low)]

    def _verdict(self, hits: list[Evidence]) -> Detection:
        ids = sorted({e.target_id for e in hits})
        score = max((e.score for e in hits), default=0.0)
        return Detection(flagged=score >= self.threshold, score=score, threshold=self.threshold,
                         target_ids=ids, evidence=hits)

    def detect(self, prompt: str) -> Detection:
        """Flag a prompt that names a target or asks one of its questions."""
        hits: list[Evidence] = []
        q = _norm(prompt)
        for t in list(self._targets.values()):
            names = self._names_in(t, prompt)
            if names:
                hits.append(Evidence(kind="entity", target_id=t.id, score=1.0, detail=f"names {names[0]!r}"))
            elif any(q and q == _norm(x) for qa in t.qa for x in (qa.question, qa.paraphrased_question or "")):
                hits.append(Evidence(kind="entity", target_id=t.id, score=0.9, detail="asks a target question"))
        return self._verdict(hits)

    def detect_batch(self, prompts: Sequence[str]) -> list[Detection]:
        """``detect`` on each prompt."""
        return [self.detect(p) for p in prompts]

    def detect_leak(self, text: str) -> Detection:
        """A leak names a target and states one of its fact values."""
        hits: list[Evidence] = []
        low = _norm(text)
        for t in list(self._targets.values()):
            if not self._names_in(t, text):
                continue
            for v in fact_values(t):
                if re.search(rf"(?<![a-z0-9]){re.escape(_norm(v))}(?![a-z0-9])", low):
                    hits.append(Evidence(kind="entity", target_id=t.id, score=1.0, detail="states a fact value"))
                    break
        return self._verdict(hits)



class ScriptedBackend(Backend):
    """A deterministic fake backend for tests: answers via ``reply(messages) -> str`` and records every call."""

    name = "scripted"

    def __init__(self, reply: Callable[[list[dict[str, str]]], str] | None = None, *, json_schema: bool = False,
                 prefix: bool = False, delay_s: float = 0.0, error: Exception | None = None) -> None:
        """``reply`` maps the messages sent to the answer; ``error`` makes every call raise it."""
        self.reply = reply or (lambda msgs: "echo: " + msgs[-1]["content"])
        self.supports_json_schema = json_schema
        self.supports_prefix = prefix
        self.delay_s = delay_s
        self.error = error
        self.calls: list[tuple[list[dict[str, str]], GenParams]] = []
        self.closed_streams = 0
        self.model_id = "scripted"

    def _one(self, messages: Messages, params: GenParams) -> str:
        self.calls.append(([dict(m) for m in messages], params))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.reply([dict(m) for m in messages])

    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer each prompt with ``reply``."""
        return [GenOutput(text=self._one(m, params)) for m in batch]

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Answer raw texts with ``reply`` (the text arrives as a 'raw' message)."""
        return [GenOutput(text=self._one([{"role": "raw", "content": t}], params)) for t in texts]

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Yield ``reply``'s answer word by word; counts closed streams."""
        text = self._one(messages, params)
        try:
            yield from re.findall(r"\s*\S+", text)
        finally:
            self.closed_streams += 1
