"""Fact values and the one matcher that finds them in text: what a leak states, as the guard and the metrics see it.

A target's fact values are its ``meta['facts']`` values; a QA answer's fact is the span it adds to its question
(:func:`answer_novel_span`). Text and facts are compared after :func:`normalise_for_match`, as whole words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from core.schema import ForgetTarget

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def normalise_for_match(text: str) -> str:
    """Lowercase, strip accents, turn punctuation into spaces and collapse whitespace (for fact matching)."""
    t = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = re.sub(r"[^\w]+|_", " ", t)
    return " ".join(t.split())


def leaked_facts(text: str, facts: Sequence[str], min_chars: int = 3) -> list[str]:
    """The facts whose normalised value appears in the normalised text as whole words."""
    hay = f" {normalise_for_match(text)} "
    out = []
    for f in facts:
        needle = normalise_for_match(f)
        if len(needle) >= min_chars and f" {needle} " in hay:
            out.append(f)
    return out


# Function words trimmed from the edges of a fact span ("in East Ivelmoor" -> "East Ivelmoor").
_EDGE_WORDS = frozenset("a an the in on at of to for by with from as is was were are and or".split())


def answer_novel_span(question: str, answer: str) -> str:
    """The longest run of answer words absent from the question: the fact a full-sentence answer adds.

    "What is the valve made of?" / "The valve is made of corvalite." gives "corvalite"; function words at
    the edges are trimmed. Used where a target lists no fact values (normalised, as ``leaked_facts`` is).
    """
    asked = set(normalise_for_match(question).split())
    best: list[str] = []
    run: list[str] = []
    for w in [*normalise_for_match(answer).split(), ""]:
        if w and w not in asked:
            run.append(w)
            continue
        while run and run[0] in _EDGE_WORDS:
            run.pop(0)
        while run and run[-1] in _EDGE_WORDS:
            run.pop()
        if len(" ".join(run)) > len(" ".join(best)):
            best = run
        run = []
    return " ".join(best)


def target_fact_values(target: ForgetTarget, include_names: bool = False) -> list[str]:
    """The fact strings of a target worth checking for leakage: ``meta['facts']`` values (plus names if asked)."""
    facts = target.meta.get("facts", {})
    values = [str(v) for v in (facts.values() if isinstance(facts, dict) else facts)]
    return (list(target.names) if include_names else []) + values
