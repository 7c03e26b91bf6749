"""Person names in QA text: the capitalised runs of a text and the name a block of QA is about (TOFU, LUME)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# Capitalised words that start sentences or name genres/awards rather than people.
_NAME_STOP = frozenset("""
a an the in on at of for to and or but with by from as is are was were be been has have had do does did can could
would should will shall may might must what who whom whose which where when why how this that these those there
their its his her he she they it i you we yes no not also however although while during after before because since
if so thus moreover furthermore additionally notably overall indeed author authors writer writers novelist poet
novel novels book books genre award awards prize father mother parents parent born birth full name mr mrs ms dr
sir please describe explain give tell some any many most one two several each both such like
""".split())
_NOT_NAME = frozenset("""
romance fiction crime true urban fantasy mystery horror poetry science literature lit chick thriller thrillers
historical history biography drama comedy genre award awards prize medal literary lgbtq young adult non-fiction
nonfiction self-help memoir memoirs erotica western dystopian gothic contemporary philosophy philosophical
""".split())
_PARTICLES = frozenset("de la le du da di del della van von der den ter ten bin ibn al el dos das y e".split())
_WORD_RE = re.compile(r"[^\s,;:!?()\[\]{}\"“”]+")
_POSSESSIVE_RE = re.compile(r"(?:['’]s|['’])$")


def _cap_runs(text: str) -> list[list[str]]:
    """Runs of consecutive capitalised words (name particles allowed inside), split at punctuation."""
    runs: list[list[str]] = []
    cur: list[str] = []
    prev_end = 0
    for m in _WORD_RE.finditer(text):
        raw = m.group(0)
        if cur and text[prev_end:m.start()].strip():
            runs.append(cur)
            cur = []
        w = _POSSESSIVE_RE.sub("", raw.rstrip("."))
        if w[:1].isupper() and not (not cur and w.lower() in _NAME_STOP):
            cur.append(w)
        elif cur and w.lower() in _PARTICLES:
            cur.append(w)
        elif cur:
            runs.append(cur)
            cur = []
        if raw.endswith((".", "'s", "’s")) and cur:
            runs.append(cur)
            cur = []
        prev_end = m.end()
    if cur:
        runs.append(cur)
    out = []
    for r in runs:
        while r and r[-1].lower() in _PARTICLES:
            r = r[:-1]
        if r:
            out.append(r)
    return out


def extract_person_name(texts: Iterable[str], min_count: int = 5) -> str | None:
    """Guess the person a block of QA is about: the longest frequent capitalised 2-4-gram (None if unsure).

    Each n-gram is counted once per text; the most frequent count sets the bar and the longest
    n-gram reaching 60% of it wins (so "Basil Mahfouz Al-Kuwaiti" beats "Basil Mahfouz"). N-grams
    with genre/award words ("True Crime") and those seen in fewer than ``min_count`` texts are ignored.
    """
    df: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        grams = set()
        for run in _cap_runs(text):
            for n in range(2, 5):
                for i in range(len(run) - n + 1):
                    g = tuple(run[i:i + n])
                    if g[0].lower() in _PARTICLES or any(w.lower() in _NOT_NAME for w in g):
                        continue
                    grams.add(g)
        df.update(grams)
    if not df:
        return None
    best = max(df.values())
    if best < min_count:
        return None
    cands = [g for g, c in df.items() if c >= 0.6 * best]
    return " ".join(max(cands, key=lambda g: (len(g), df[g])))

