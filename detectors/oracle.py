"""The oracle detector: a keyword rule built from a task's target names and questions.

A real, registered component for what must not depend on a learned detector: the HTTP layer's tests and
load benchmarks, demos (``serve --oracle``) and guard tests. It is not the product's detector
(:mod:`detectors.detector` is): it flags a prompt that names a target (any alias, case-insensitive,
word-bounded) or that is one of the target's own questions, and it calls output a leak when it names a
target *and* states one of that target's fact values. It knows nothing of paraphrases or unnamed
references, so never measure a guard's recall with it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence

from core.facts import leaked_facts, target_fact_values
from core.generation import Prompt
from core.schema import ForgetTarget, ForgetTask
from detectors.types import Detection, Evidence

_STOP = {"the", "of", "a", "an", "is", "was", "and", "in", "at", "to", "for", "with", "what", "which", "who", "its"}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def fact_values(target: ForgetTarget) -> list[str]:
    """The values a leak would state: ``meta['facts']`` values, else answer words absent from the question."""
    stated = [v for v in target_fact_values(target) if v.strip()]
    if stated:
        return sorted(set(stated))
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

    def detect(self, prompt: Prompt) -> Detection:
        """Flag a prompt (any of its turns) that names a target or asks one of its questions."""
        if not isinstance(prompt, str):  # chat messages: every turn, and each turn alone as a question
            turns = [str(m.get("content") or "") for m in prompt]
            verdicts = [self.detect(t) for t in ["\n".join(turns), *turns]]
            return self._verdict([e for v in verdicts for e in v.evidence])
        hits: list[Evidence] = []
        q = _norm(prompt)
        for t in list(self._targets.values()):
            names = self._names_in(t, prompt)
            if names:
                hits.append(Evidence(kind="entity", target_id=t.id, score=1.0, detail=f"names {names[0]!r}"))
            elif any(q and q == _norm(x) for qa in t.qa for x in (qa.question, qa.paraphrased_question or "")):
                hits.append(Evidence(kind="entity", target_id=t.id, score=0.9, detail="asks a target question"))
        return self._verdict(hits)

    def detect_batch(self, prompts: Sequence[Prompt]) -> list[Detection]:
        """``detect`` on each prompt."""
        return [self.detect(p) for p in prompts]

    def detect_leak(self, text: str) -> Detection:
        """A leak names a target and states one of its fact values."""
        hits: list[Evidence] = []
        for t in list(self._targets.values()):
            if self._names_in(t, text) and leaked_facts(text, fact_values(t), min_chars=1):
                hits.append(Evidence(kind="entity", target_id=t.id, score=1.0, detail="states a fact value"))
        return self._verdict(hits)
