"""Entity matching on normalised text: full names, aliases, partial names and key phrases of targets.

Names are matched as token sequences on :func:`~detectors.normalize.skeleton_tokens` (so case,
accents, homoglyphs, zero-width characters, punctuation and leetspeak do not matter) and, for
multi-token names of distinctive length, also inside the text with spacing removed, which catches
``E l a r a V o s b e r g`` and ``ElaraVosberg``. Partial matches (the share of a name's distinctive
tokens present, e.g. only a surname) are reported as a feature, never as a hit on their own:
neighbours share surnames and first names on purpose. Key phrases (quoted titles in names, answers
and texts) are stored as salted hashes of their token sequences, so no forget text is kept.

Name variants: a text token that is not a common word (``wordfreq`` Zipf frequency below
:data:`COMMON_ZIPF`) and is within a small edit distance of a name token (Damerau-Levenshtein 1 from 4
letters, 2 from 8), or sounds the same (equal Metaphone code, distance at most 2, from 5 letters), reads as
that name token ("Philipa Stavburg", "Filippa Stavberg"); non-Latin tokens are spelt in Latin letters first
(``anyascii``), so "Филиппа" reads as "filippa". A name found this way whole counts as the name; a near miss of one name
token alone counts for nothing ("Aisha" may be "Aysha" or someone else). An exact first name or surname
alone is a partial match (a common word only after a title: "Dr. Diamond"), and :attr:`EntityHit.variant` says that a distinctive part of the
name (a first name, a surname, "Ms. Stavberg") is there: whether that means the target is decided by
the caller from the rest of the text (no one else named, see :mod:`detectors.features`).

Facts: the distinctive span each forget answer adds to its question (:func:`core.facts.answer_novel_span`:
"East Ivelmoor", "1987", "Golden Quill Prize"), kept as salted hashes like key phrases; stating one is a
leak when the conversation is about that target (the caller passes which targets it is about).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import jellyfish
from anyascii import anyascii
from wordfreq import zipf_frequency

from core.facts import answer_novel_span
from detectors.normalize import normalize, proper_nouns, skeleton_tokens

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
COMMON_ZIPF = 3.5
"""Text tokens at least this frequent in English (wordfreq's Zipf scale: 3.5 is about 3 per million words,
"verify" 3.9, "philippa" 2.8) are words, never read as misspelt names."""
_VARIANT_ZIPF = COMMON_ZIPF
"""A single name token this frequent ("biography" of a prize's name, "silent" of a title alias, "field") does not on
its own point to a target (after a title it does: "Dr. Marshall")."""
_FUZZY_MIN = 4
_FUZZY_MIN_2 = 8
_TITLES = frozenset("mr mrs ms miss mx dr prof professor sir dame lady lord madam madame mme mlle herr frau".split())
_MAX_FACT_TOKENS = 8


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
    variant: bool = False
    """A distinctive part of a name (a first name or surname, exactly or as a near miss, not a common word) occurs
    without the whole name: the text may be about the target, or about a namesake."""
    fact: bool = False
    """A stored fact of the target (see :func:`extract_facts`) occurs (only searched when asked for)."""


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


_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_MONTH = r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
_ORD = r"(\d{1,2})(?:st|nd|rd|th)?"
_DATES = (  # (pattern, reader of its groups -> (year, month, day) readings)
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), lambda g: [(int(g[0]), int(g[1]), int(g[2]))]),
    (re.compile(r"\b(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})\b"),  # 05/30/1952 or 30/05/1952: both readings
     lambda g: [(int(g[2]), int(g[0]), int(g[1])), (int(g[2]), int(g[1]), int(g[0]))]),
    (re.compile(rf"\b{_MONTH}\.?\s+{_ORD},?\s+(\d{{4}})\b", re.IGNORECASE),
     lambda g: [(int(g[2]), _MONTHS[g[0][:3].lower()], int(g[1]))]),
    (re.compile(rf"\b{_ORD}\s+(?:of\s+)?{_MONTH}\.?,?\s+(\d{{4}})\b", re.IGNORECASE),
     lambda g: [(int(g[2]), _MONTHS[g[1][:3].lower()], int(g[0]))]),
)
_BIRTH = re.compile(r"\b(?:born|birth\w*|entered the world|came into the world|came into this world)\b",
                    re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?;])\s+(?=[A-Z])")


def birth_dates(text: str) -> set[tuple[int, int, int]]:
    """The full dates (year, month, day) a text gives in a sentence about a birth ("born on 05/30/1952", "the
    birth date of May 30, 1952", "entered the world on March 1st, 1936"), every reading of an ambiguous numeric
    one (05/06/1952: 6 May or 5 June). A person has one birth date, so a description that gives another one than
    the target's is about someone else (:func:`birth_date_hash`); years alone are left out."""
    out: set[tuple[int, int, int]] = set()
    for sent in _SENTENCES.split(text):
        if not _BIRTH.search(sent):
            continue
        for pat, read in _DATES:
            for m in pat.finditer(sent):
                out.update((y, mo, d) for y, mo, d in read(m.groups()) if 1 <= mo <= 12 and 1 <= d <= 31)
    return out


def without_dates(text: str) -> str:
    """The text with its full dates blanked out (a month name is not a proper noun)."""
    for pat, _ in _DATES:
        text = pat.sub(" ", text)
    return text


def birth_date_hash(ymd: tuple[int, int, int], salt: str) -> str:
    """Salted hash of a birth date (the store keeps no date in the clear)."""
    return phrase_hash(("\x00birth", *(str(x) for x in ymd)), salt)


def value_hash(tokens: tuple[str, ...], salt: str) -> str:
    """Salted hash of an identifying value's tokens (kept apart from the key-phrase hashes)."""
    return phrase_hash(("\x00value", *tokens), salt)


def _distinctive_span(span: str, answer: str) -> bool:
    """Whether a fact span names something (a capitalised word after the answer's first, or a number), rather
    than a common description ("a novelist"), which is left to the similarity check."""
    words = set(span.split())
    if any(c.isdigit() for c in span):
        return True
    cased = re.findall(r"[^\W\d_]+", answer)
    return any(w[:1].isupper() and normalize(w) in words for w in cased[1:]) or (
        len(cased) <= 3 and any(w[:1].isupper() for w in cased))


_CONNECTORS = frozenset("of the de da di du del der van von la le for".split())
_CASED_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?:;]\s*$")


def text_spans(text: str) -> list[str]:
    """Names and numbers a text states: runs of capitalised words (joined by "of", "the", ...; a capitalised
    common word that starts a sentence is not part of one) and numbers, in the text's words."""
    spans: list[str] = []
    run: list[str] = []

    def close() -> None:
        while run and run[-1].lower() in _CONNECTORS:
            run.pop()
        if run:
            spans.append(" ".join(run))
        run.clear()

    prev_end = 0
    for m in _CASED_WORD.finditer(text):
        w = m.group(0)
        gap = text[prev_end:m.start()]
        starts = m.start() == 0 or bool(_SENTENCE_END.search(text[:m.start()]))
        prev_end = m.end()
        if run and gap.strip() not in ("",):  # punctuation between words ends a run
            close()
        if any(c.isdigit() for c in w):
            close()
            spans.append(w)
            continue
        if w[:1].isupper() and not (starts and is_common_word(w.lower())):
            run.append(w.split("'")[0])
            if "'" in w:
                close()
        elif run and w.lower() in _CONNECTORS:
            run.append(w)
        else:
            close()
    close()
    return spans


_FACT_WORD_ZIPF = 4.0
"""A word of a target's texts at least this frequent in English ("teacher", "chess") is not a fact on its own."""


def uncommon_word(tok: str) -> bool:
    """Whether a skeleton token is a word rare enough in English to tell someone apart ("linguist", "ferrocite"):
    alphabetic, 4+ letters, no stop word, below ``_FACT_WORD_ZIPF``."""
    return len(tok) >= 4 and tok.isalpha() and tok not in _STOP and word_frequency(tok) < _FACT_WORD_ZIPF


def extract_facts(pairs: Iterable[tuple[str, str]], values: Iterable[str] = (), texts: Iterable[str] = (),
                  names: Iterable[str] = (), template: Collection[str] = ()) -> set[tuple[str, ...]]:
    """The distinctive facts of a target as token tuples: for each (question, answer) the span the answer adds
    (a place, a title, a year), the given fact values where they are distinctive the same way, and what its texts
    state: names and numbers (:func:`text_spans`) other than its own names, and uncommon words ("linguist",
    "ferrocite") that are not ``template`` words (those most texts of the kind use: "hometown")."""
    out: set[tuple[str, ...]] = set()
    own = {t for n in names for t in name_tokens(n)}
    for text in texts:
        for span in text_spans(text):
            toks = tuple(skeleton_tokens(normalize(span)))
            if key_tokens(toks) - own:
                out.add(toks)
        for tok in set(skeleton_tokens(normalize(text))):
            if tok not in own and tok not in template and uncommon_word(tok):
                out.add((tok,))
    for question, answer in pairs:
        span = answer_novel_span(question, answer)
        if span and _distinctive_span(span, answer):
            out.add(tuple(skeleton_tokens(normalize(span))))
    for v in values:
        if _distinctive_span(normalize(v), v):
            out.add(tuple(skeleton_tokens(normalize(v))))
    return {f for f in out if f and len(f) <= _MAX_FACT_TOKENS and len("".join(f)) >= 3}


def fact_hash(tokens: tuple[str, ...], salt: str) -> str:
    """Salted hash of a fact's tokens (kept apart from key phrases and values)."""
    return phrase_hash(("\x00fact", *tokens), salt)


def telling_tokens(cased: str, template: Collection[str] = ()) -> set[str]:
    """The tokens of a cased, normalised text that can single someone out (as skeleton tokens): proper nouns,
    numbers, and :func:`uncommon_word` words ("lighthouse", "conjoined") that are not ``template`` words.
    "Where was this person born?" has none, so it describes no one in particular."""
    out = {t for t in proper_nouns(cased) if t not in _STOP}
    out.update(tok for tok in skeleton_tokens(normalize(cased)) if tok.isdigit() or uncommon_word(tok))
    return out.difference(template)


@lru_cache(maxsize=131072)
def word_frequency(token: str) -> float:
    """A token's Zipf frequency in English (wordfreq; 0 for words it has never seen), cached."""
    return float(zipf_frequency(token, "en"))


def is_common_word(token: str) -> bool:
    """Whether a token is an ordinary English word (see :data:`COMMON_ZIPF`), so never a misspelt name."""
    return word_frequency(token) >= COMMON_ZIPF


def _deletes(token: str) -> set[str]:
    """The token and every string one deletion away (the keys of the symmetric-delete index)."""
    return {token} | {token[:i] + token[i + 1:] for i in range(len(token))}


def _max_edits(token: str) -> int:
    """How many edits a near miss of a name token of this length may have."""
    return 2 if len(token) >= _FUZZY_MIN_2 else 1


def transliterated(toks: list[str]) -> list[str]:
    """The tokens with non-Latin ones spelt in Latin letters (``anyascii``: "Филиппа" -> "filippa"): a spelling,
    not a near miss, so it counts wherever the token as written would."""
    if all(t.isascii() for t in toks):
        return toks
    out: list[str] = []
    for t in toks:
        out.extend([t] if t.isascii() else (skeleton_tokens(normalize(anyascii(t))) or [t]))
    return out


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
    fact_hashes: frozenset[tuple[int, str]] = field(default_factory=frozenset)
    """(token count, :func:`fact_hash`) of the target's facts."""


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
        self._facts: dict[str, set[str]] = {}
        self._fact_lengths: set[int] = set()
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
            for n, h in tn.fact_hashes:
                self._facts.setdefault(h, set()).add(tn.target_id)
                self._fact_lengths.add(n)
        # Near misses of name tokens: a symmetric-delete index (edit distance) and a Metaphone index (sound).
        self._near: dict[str, set[str]] = {}
        self._sound: dict[str, set[str]] = {}
        self._near_memo: dict[str, str | None] = {}
        for t in self._token_names:
            if len(t) >= _FUZZY_MIN and t.isalpha():
                for d in _deletes(t):
                    self._near.setdefault(d, set()).add(t)
                if len(t) > _FUZZY_MIN:  # a 4-letter Metaphone code is shared by too many words
                    self._sound.setdefault(jellyfish.metaphone(t), set()).add(t)
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

    def _near_miss(self, token: str) -> str | None:
        """The name token that ``token`` misspells or transliterates, or None (exact names, common words and
        short tokens are left alone); memoised per matcher."""
        if token in self._token_names or len(token) < _FUZZY_MIN:
            return None
        try:
            return self._near_memo[token]
        except KeyError:
            pass
        fix = self._find_near_miss(token)
        if len(self._near_memo) < 65536:
            self._near_memo[token] = fix
        return fix

    def _find_near_miss(self, token: str) -> str | None:
        """The uncached body of :meth:`_near_miss`."""
        t = token
        if not t.isalpha() or not t.isascii() or len(t) < _FUZZY_MIN or is_common_word(t):
            return None
        best: tuple[int, str] | None = None
        for d in _deletes(t):
            for cand in self._near.get(d, ()):
                dist = jellyfish.damerau_levenshtein_distance(t, cand)
                if dist <= _max_edits(cand) and (best is None or (dist, cand) < best):
                    best = (dist, cand)
        if best is None:
            for cand in self._sound.get(jellyfish.metaphone(t), ()):
                dist = jellyfish.damerau_levenshtein_distance(t, cand)
                if dist <= 2 and (best is None or (dist, cand) < best):
                    best = (dist, cand)
        return best[1] if best else None

    def corrected(self, toks: list[str]) -> tuple[list[str], bool]:
        """The tokens with near misses of name tokens replaced by the name token; True when any was."""
        if not self._near and not self._sound:
            return toks, False
        out, changed = list(toks), False
        for i, t in enumerate(toks):
            fix = self._near_miss(t)
            if fix is not None:
                out[i], changed = fix, True
        return out, changed

    def match_tokens(self, toks: list[str], facts: Collection[str] = ()) -> dict[str, EntityHit]:
        """:meth:`match` on the text's :func:`~detectors.normalize.skeleton_tokens`; stored facts are searched for
        the target ids in ``facts`` (the targets a conversation is about)."""
        raw = transliterated(toks)
        toks, fuzzy = self.corrected(raw)
        full, size = self._full_names(toks)
        counts: dict[tuple[str, int], int] = {}
        variant: set[str] = set()
        # Partial names from the tokens as written: a near miss counts only where it completes a whole name (a
        # near-miss first name alone is as likely someone else's: "Aisha" for "Aysha").
        titled = {raw[i + 1] for i in range(len(raw) - 1) if raw[i] in _TITLES}  # "Dr. Diamond" is a name
        for t in set(raw):
            for key in self._token_names.get(t, ()):
                counts[key] = counts.get(key, 0) + 1
                if len(t) >= 3 and t not in _STOP and (word_frequency(t) < _VARIANT_ZIPF or t in titled):
                    variant.add(key[0])
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
        fact: set[str] = set()
        if facts and self._facts:
            for n in self._fact_lengths:
                for i in range(len(raw) - n + 1):
                    hit = self._facts.get(fact_hash(tuple(raw[i:i + n]), self.salt))
                    if hit:
                        fact.update(hit & set(facts))
        value: set[str] = set()
        vtoks = value_tokens(raw) if self._values else ()
        for n in self._value_lengths:
            for i in range(len(vtoks) - n + 1):
                hit = self._values.get(value_hash(vtoks[i:i + n], self.salt))
                if hit:
                    value.update(hit)
        written = self._full_names(raw)[0] if fuzzy else full  # the names found without near-miss correction
        out: dict[str, EntityHit] = {}
        for tid in set(full) | set(partial) | phrase | value | fact:
            f = 1.0 if tid in full else 0.0
            if tid in full:
                detail = f"name {full[tid]!r}" + (" (as written, a near miss)" if tid not in written else "")
            else:
                detail = "key phrase" if tid in phrase else ("stated fact" if tid in fact else "partial name")
            out[tid] = EntityHit(full=f, partial=1.0 if f else min(1.0, partial.get(tid, 0.0)),
                                 phrase=1.0 if tid in phrase else 0.0, full_tokens=size.get(tid, 0),
                                 value=tid in value, variant=not f and tid in variant, fact=tid in fact,
                                 detail=detail)
        return out

    def _full_names(self, toks: list[str]) -> tuple[dict[str, str], dict[str, int]]:
        """Per target, the longest of its names found whole in the tokens (spaced or run together) and its count of
        identifying tokens."""
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
        return full, size
