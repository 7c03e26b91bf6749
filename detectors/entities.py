"""Entity matching on normalised text: full names, aliases, partial names and key phrases of targets.

Names are matched as token sequences on :func:`~detectors.normalize.skeleton_tokens` (so case,
accents, homoglyphs, zero-width characters, punctuation and leetspeak do not matter) and, for
multi-token names of distinctive length, also inside the text with spacing removed, which catches
``E l a r a V o s b e r g`` and ``ElaraVosberg``. Partial matches (the share of a name's distinctive
tokens present, e.g. only a surname) are reported as a feature, never as a hit on their own:
neighbours share surnames and first names on purpose. Key phrases (quoted titles in names, answers
and texts) are stored as salted hashes of their token sequences, so no forget text is kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from detectors.normalize import normalize, skeleton_tokens

_STOP = frozenset("""a an the of and or in on at to for by with from de da di du del der den van von al el la le
    mr mrs ms dr prof sir author writer person creator""".split())
_QUOTED = re.compile(r'"([^"]{3,120})"')
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_DIGIT_SPAN = re.compile(r"\d[\d\s().#/+-]{4,}\d")
_MIN_VALUE_DIGITS = 6
_DATE = re.compile(r"\d{4}\D\d{1,2}\D\d{1,2}|\d{1,2}\D\d{1,2}\D\d{2,4}|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b",
                   re.IGNORECASE)
_MAX_VALUE_TOKENS = 12
_MAX_PHRASE_TOKENS = 8
_MIN_COMPACT = 8


@dataclass(frozen=True)
class EntityHit:
    """How strongly one target's names or key phrases occur in a text (each value in [0, 1])."""

    full: float = 0.0
    partial: float = 0.0
    phrase: float = 0.0
    detail: str = ""
    full_tokens: int = 0
    """Identifying tokens (see :func:`key_tokens`) of the longest name found whole; 0 when none was."""
    value: bool = False
    """An identifying value of the target (see :func:`extract_values`) occurs."""


def name_tokens(name: str) -> tuple[str, ...]:
    """The matching key of a name: its skeleton tokens after normalisation."""
    return tuple(skeleton_tokens(normalize(name)))


def distinctive(tokens: Iterable[str]) -> frozenset[str]:
    """Tokens that carry meaning in a phrase (not stop words, at least 3 characters)."""
    return frozenset(t for t in tokens if len(t) >= 3 and t not in _STOP)


def key_tokens(tokens: Iterable[str]) -> frozenset[str]:
    """Tokens of a name that identify it (stop words dropped, initials kept), for partial matching."""
    return frozenset(t for t in tokens if t not in _STOP)


def phrase_hash(tokens: tuple[str, ...], salt: str) -> str:
    """Salted hash of a token sequence, so key phrases can be matched without storing them."""
    return hashlib.sha256((salt + "\x1f" + " ".join(tokens)).encode("utf-8")).hexdigest()[:24]


def extract_phrases(texts: Iterable[str]) -> set[tuple[str, ...]]:
    """Quoted phrases (titles and the like) of two or more tokens, as token tuples."""
    out: set[tuple[str, ...]] = set()
    for t in texts:
        for m in _QUOTED.finditer(normalize(t)):
            toks = tuple(skeleton_tokens(m.group(1)))
            if 2 <= len(toks) <= _MAX_PHRASE_TOKENS and distinctive(toks):
                out.add(toks)
    return out


def _digits(text: str) -> int:
    """How many digits a text has."""
    return sum(c.isdigit() for c in text)


def value_tokens(tokens: Iterable[str]) -> tuple[str, ...]:
    """Tokens with runs of all-digit tokens joined, so 721-625-3765, 721 625 3765 and 7216253765 compare equal."""
    out: list[str] = []
    prev_digit = False
    for t in tokens:
        if t.isdigit() and prev_digit:
            out[-1] += t
        else:
            out.append(t)
        prev_digit = t.isdigit()
    return tuple(out)


def _value_key(text: str) -> tuple[str, ...]:
    """The matching key of a value: its skeleton tokens with digit runs joined (see :func:`value_tokens`)."""
    return value_tokens(skeleton_tokens(normalize(text)))


def extract_values(answers: Iterable[str], texts: Iterable[str] = ()) -> set[tuple[str, ...]]:
    """Identifying values (PII-like: e-mail addresses and spans of 6+ digits, such as phone, account or ID
    numbers) of a target's answers and texts, and its short answers that hold 6+ digits (an address), as token
    tuples: stating one is a leak whoever is named. Dates are left out: people share birthdays."""
    out: set[tuple[str, ...]] = set()
    answers = list(answers)  # read twice below
    for t in [*answers, *texts]:
        t = t.replace("\\", "")  # markdown escapes ("tiffi\\_orr@me.com") would cut an address in two
        for m in _EMAIL.finditer(t):
            out.add(_value_key(m.group(0)))
        for m in _DIGIT_SPAN.finditer(t):
            if _digits(m.group(0)) >= _MIN_VALUE_DIGITS and not _DATE.search(m.group(0)):
                out.add(_value_key(m.group(0)))
    for a in answers:
        toks = _value_key(a)
        if len(toks) <= _MAX_VALUE_TOKENS and _digits(a) >= _MIN_VALUE_DIGITS and not _DATE.search(a):
            out.add(toks)
    return {v for v in out if v}


def value_hash(tokens: tuple[str, ...], salt: str) -> str:
    """Salted hash of an identifying value's tokens (kept apart from the key-phrase hashes)."""
    return phrase_hash(("\x00value", *tokens), salt)


@dataclass(frozen=True)
class TargetNames:
    """What the matcher knows about one target: its names (as given) and its phrase hashes."""

    target_id: str
    names: tuple[str, ...]
    phrase_hashes: frozenset[str] = field(default_factory=frozenset)
    phrase_starts: frozenset[str] = field(default_factory=frozenset)
    """Hashes of the phrases' first tokens (a cheap pre-check before hashing n-grams)."""
    value_hashes: frozenset[tuple[int, str]] = field(default_factory=frozenset)
    """(token count, :func:`value_hash`) of the target's identifying values."""


class EntityMatcher:
    """Immutable matcher over all targets; rebuilt (cheaply) whenever targets change."""

    def __init__(self, targets: Iterable[TargetNames], salt: str) -> None:
        """Index every name and phrase hash of ``targets``."""
        self.salt = salt
        self._by_first: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        self._token_names: dict[str, list[tuple[str, int]]] = {}
        self._name_sizes: dict[tuple[str, int], int] = {}
        self._phrases: dict[str, set[str]] = {}
        self._phrase_starts: set[str] = set()
        self._phrase_lengths: set[int] = set()
        self._values: dict[str, set[str]] = {}
        self._value_lengths: set[int] = set()
        compact: list[tuple[str, str, str]] = []
        for tn in targets:
            for ni, name in enumerate(tn.names):
                toks = name_tokens(name)
                if not toks:
                    continue
                self._by_first.setdefault(toks[0], []).append((toks, tn.target_id, name))
                dist = key_tokens(toks)
                self._name_sizes[(tn.target_id, ni)] = len(dist)
                for t in dist:
                    self._token_names.setdefault(t, []).append((tn.target_id, ni))
                if len(toks) >= 2 and all(len(t) >= 2 for t in toks) and len("".join(toks)) >= _MIN_COMPACT:
                    compact.append(("".join(toks), tn.target_id, name))
            for h in tn.phrase_hashes:
                self._phrases.setdefault(h, set()).add(tn.target_id)
            self._phrase_starts.update(tn.phrase_starts)
            for n, h in tn.value_hashes:
                self._values.setdefault(h, set()).add(tn.target_id)
                self._value_lengths.add(n)
        self._phrase_lengths = set(range(2, _MAX_PHRASE_TOKENS + 1)) if self._phrases else set()
        self._compact = compact
        self._compact_re = (re.compile("|".join(re.escape(c) for c, _, _ in sorted(compact, key=lambda x: -len(x[0]))))
                            if compact else None)
        self._compact_map: dict[str, list[tuple[str, str]]] = {}
        for c, tid, name in compact:
            self._compact_map.setdefault(c, []).append((tid, name))

    def match(self, normalized: str) -> dict[str, EntityHit]:
        """Hits per target id for one already-normalised text (targets without any signal omitted)."""
        return self.match_tokens(skeleton_tokens(normalized))

    def match_tokens(self, toks: list[str]) -> dict[str, EntityHit]:
        """:meth:`match` on the text's :func:`~detectors.normalize.skeleton_tokens`."""
        full: dict[str, str] = {}
        size: dict[str, int] = {}
        for i, t in enumerate(toks):
            for name_toks, tid, name in self._by_first.get(t, ()):
                if tuple(toks[i:i + len(name_toks)]) == name_toks:
                    n = len(key_tokens(name_toks))
                    if n > size.get(tid, -1):  # the longest name found wins (a full name over a bare surname)
                        full[tid], size[tid] = name, n
        if self._compact_re is not None:
            for m in self._compact_re.finditer("".join(toks)):
                for tid, name in self._compact_map.get(m.group(0), ()):
                    n = len(key_tokens(name_tokens(name)))
                    if n > size.get(tid, -1):
                        full[tid], size[tid] = name, n
        counts: dict[tuple[str, int], int] = {}
        for t in set(toks):
            for key in self._token_names.get(t, ()):
                counts[key] = counts.get(key, 0) + 1
        partial: dict[str, float] = {}
        for (tid, ni), c in counts.items():
            frac = c / max(1, self._name_sizes[(tid, ni)])
            if frac > partial.get(tid, 0.0):
                partial[tid] = frac
        phrase: set[str] = set()
        if self._phrases:
            for i in range(len(toks) - 1):
                # Without first-token hashes (older stores) every position is tried.
                if self._phrase_starts and phrase_hash((toks[i],), self.salt) not in self._phrase_starts:
                    continue
                for n in self._phrase_lengths:
                    if i + n > len(toks):
                        break
                    hit = self._phrases.get(phrase_hash(tuple(toks[i:i + n]), self.salt))
                    if hit:
                        phrase.update(hit)
        value: set[str] = set()
        vtoks = value_tokens(toks) if self._values else ()
        for n in self._value_lengths:
            for i in range(len(vtoks) - n + 1):
                hit = self._values.get(value_hash(vtoks[i:i + n], self.salt))
                if hit:
                    value.update(hit)
        out: dict[str, EntityHit] = {}
        for tid in set(full) | set(partial) | phrase | value:
            f = 1.0 if tid in full else 0.0
            out[tid] = EntityHit(full=f, partial=1.0 if f else min(1.0, partial.get(tid, 0.0)),
                                 phrase=1.0 if tid in phrase else 0.0, full_tokens=size.get(tid, 0),
                                 value=tid in value,
                                 detail=f"name {full[tid]!r}" if tid in full else ("key phrase" if tid in phrase else "partial name"))
        return out
