"""Question variants generated in code, so the store covers rephrasings a user may try.

No model is involved: variants come from (a) swapping the canonical name for each alias, (b)
wrapping the question in conversational frames ("Do you know ...", "Quick question: ..."), (c)
turning a stated fact into a prompt ("Is it true that ...") and (d) generic name probes ("Who is
X?", "Tell me about X."). Deterministic for a given input.
"""

from __future__ import annotations

import re

_FRAMES = (
    "Do you know {q}",
    "Quick question: {q}",
    "I'd like to know: {q}",
    "Can you tell me {ql}",
    "{q} Please answer briefly.",
    "My friend asked me this: {q}",
)
_NAME_PROBES = (
    "Who is {n}?",
    "Tell me about {n}.",
    "What do you know about {n}?",
    "Write a short biography of {n}.",
    "Give me some facts about {n}.",
    "What is {n} known for?",
)
_PHRASE_PROBES = (
    'Who is behind "{p}"?',
    'Tell me about the creator of "{p}".',
    'What do you know about "{p}"?',
)
_STATEMENT_FRAMES = (
    "Is it true that {s}?",
    "Complete this sentence: {s}",
)


def _lower_first(q: str) -> str:
    """Lower-case the first letter, for embedding a question inside a frame."""
    return q[:1].lower() + q[1:] if q[:1].isupper() and not q[1:2].isupper() else q


def swap_names(text: str, names: list[str]) -> list[str]:
    """Return ``text`` with whichever of ``names`` it mentions replaced by each of the other names."""
    out: list[str] = []
    for src in names:
        pat = re.compile(re.escape(src), re.IGNORECASE)
        if not pat.search(text):
            continue
        for dst in names:
            if dst.lower() != src.lower():
                out.append(pat.sub(lambda _m, d=dst: d, text))
        break
    return out


def question_variants(question: str, names: list[str], max_frames: int = 3, salt: int = 0) -> list[str]:
    """Alias swaps plus a few conversational frames of one question (the question itself excluded)."""
    q = question.strip()
    variants = swap_names(q, names)
    ql = _lower_first(q)
    start = salt % len(_FRAMES)
    for i in range(max_frames):
        variants.append(_FRAMES[(start + i) % len(_FRAMES)].format(q=q, ql=ql))
    seen = {q}
    return [v for v in variants if not (v in seen or seen.add(v))]


def statement_variants(statement: str, salt: int = 0) -> list[str]:
    """Prompts that ask the model to confirm or complete a forget fact."""
    s = statement.strip().rstrip(".")
    return [_STATEMENT_FRAMES[salt % len(_STATEMENT_FRAMES)].format(s=_lower_first(s))]


def name_probes(names: list[str]) -> list[str]:
    """Generic questions about a target by each of its names ("Who is X?", "Tell me about X.")."""
    out: list[str] = []
    for i, n in enumerate(names):
        k = len(_NAME_PROBES) if i == 0 else 3
        out.extend(_NAME_PROBES[(i + j) % len(_NAME_PROBES)].format(n=n) for j in range(k))
    return out


def phrase_probes(phrases: list[str]) -> list[str]:
    """Questions that reach a target through one of its key phrases (a title) instead of its name."""
    return [_PHRASE_PROBES[i % len(_PHRASE_PROBES)].format(p=p) for i, p in enumerate(phrases)]
