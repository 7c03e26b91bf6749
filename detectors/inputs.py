"""Turn a prompt (a string or chat messages) into the text units that get scored.

A multi-turn conversation is scored as each turn (system, user, assistant and tool turns alike: a forget
question placed in any of them is seen), the user turns joined and all turns joined, so a question split
over several turns is seen whole. Long units are also scored in overlapping word
windows and every multi-sentence unit also sentence by sentence, because the encoder reads only
the first 256 tokens and a forget question buried in other text would otherwise be diluted or cut
off. Units are normalised but keep their case (proper nouns matter to one feature).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from core.generation import Prompt, turn_text
from detectors.normalize import normalize_cased

if TYPE_CHECKING:
    from detectors.store import CalibrationSet

_SENT = re.compile(r"(?<=[.!?;:])\s+")
_MAX_UNITS = 64


class PromptError(TypeError):
    """A prompt is neither a string nor a list of {"role", "content"} messages."""


def turns_of(prompt: Prompt, max_turns: int = 32) -> list[tuple[str, str]]:
    """(role, text) of the last ``max_turns`` turns; a plain string is one user turn."""
    if isinstance(prompt, str):
        return [("user", prompt)]
    if not isinstance(prompt, Sequence):
        raise PromptError(f"a prompt must be a str or a list of messages, got {type(prompt).__name__}")
    out = []
    for i, msg in enumerate(prompt):
        if not isinstance(msg, Mapping) or ("content" not in msg and not msg.get("tool_calls")):
            raise PromptError(f"message {i}: expected a mapping with 'role' and 'content', got {msg!r:.80}")
        role = str(msg.get("role", "user"))
        try:
            out.append((role, turn_text(msg)))
        except TypeError as e:
            raise PromptError(f"message {i}: {e}") from e
    return out[-max_turns:]


def windows(text: str, size: int, stride: int) -> list[str]:
    """Overlapping word windows of a long text (the text itself when short)."""
    words = text.split()
    if len(words) <= size:
        return [text]
    out = [" ".join(words[i:i + size]) for i in range(0, max(1, len(words) - size + stride), stride)]
    return out


def expand(text: str, window: int, stride: int) -> list[str]:
    """A normalised unit plus its windows and, when it has several, its sentences (of 3+ words)."""
    units = windows(text, window, stride)
    sents = [s for s in _SENT.split(text) if len(s.split()) >= 3]
    if len(sents) > 1:
        units += sents
    return units


def prompt_units(prompt: Prompt, window: int = 96, stride: int = 64, max_turns: int = 32) -> list[str]:
    """The normalised (cased) text units of a prompt (deduplicated, at most 64)."""
    turns = [(r, normalize_cased(t)) for r, t in turns_of(prompt, max_turns) if t.strip()]
    raw: list[str] = [t for _, t in turns]
    user = [t for r, t in turns if r == "user"]
    if len(user) > 1:
        raw.append(" ".join(user))
    if len(turns) > 1:
        raw.append(" ".join(t for _, t in turns))
    units: list[str] = []
    for t in raw:
        units.extend(expand(t, window, stride))
    units = list(dict.fromkeys(u for u in units if u))
    if not units:
        units = [""]
    if len(units) > _MAX_UNITS:
        # Keep the joined conversation windows (last) and the most recent turns.
        units = units[-_MAX_UNITS:]
    return units


def text_units(text: str, window: int = 96, stride: int = 64) -> list[str]:
    """The normalised units of a generated text (output check): windows and sentences."""
    if not isinstance(text, str):
        raise PromptError(f"detect_leak expects a str, got {type(text).__name__}")
    t = normalize_cased(text)
    units = windows(t, window, stride)
    sents = [s for s in _SENT.split(t) if len(s.split()) >= 3]
    if len(sents) > 1:
        units += sents
    units = list(dict.fromkeys(u for u in units if u)) or [""]
    return units[:_MAX_UNITS]


_CAL_SYSTEM = ("You are a helpful assistant. Answer the user's questions accurately and concisely.",
               "You are a customer-support assistant. Be polite and keep answers short.")
_LONG_TEXTS = 8
_SHARE_COMPOSED = 0.5


def calibration_prompts(queries: CalibrationSet, contents: CalibrationSet | None = None, seed: int = 0,
                        composed: bool = True) -> tuple[list[Prompt], list[str]]:
    """The held-out prompts a threshold is calibrated on, with their groups: every calibration text alone and,
    with ``composed``, prompts shaped like deployed ones, each within one cluster (person, document):
    a conversation (question, the cluster's answer as the assistant's turn, another question), a long
    message of several of the cluster's texts, and a question under a system turn. A composed prompt's group
    is ``<group>|<shape>``, so group-wise calibration holds the FPR for each shape, not only for the mix."""
    prompts: list[Prompt] = list(queries.texts)
    groups = list(queries.groups)
    if not composed or not queries.texts:
        return prompts, groups
    rng = random.Random(seed)
    clusters = queries.clusters if len(queries.clusters) == len(queries.texts) else tuple(range(len(queries.texts)))
    by_cluster: dict[int, list[int]] = {}
    for i, c in enumerate(clusters):
        by_cluster.setdefault(c, []).append(i)
    answers: dict[int, list[str]] = {}
    if contents is not None and len(contents.clusters) == len(contents.texts):
        for t, c in zip(contents.texts, contents.clusters, strict=True):
            answers.setdefault(c, []).append(t)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    budget = max(1, int(_SHARE_COMPOSED * len(prompts)))
    extra: list[tuple[Prompt, str]] = []
    for c in sorted(by_cluster):
        idx = by_cluster[c]
        g = queries.groups[idx[0]]
        q = [queries.texts[i] for i in idx]
        if len(q) >= 2:
            a = (answers.get(c) or ["I see. What else would you like to know?"])[0]
            extra.append(([{"role": "user", "content": q[0]}, {"role": "assistant", "content": a},
                           {"role": "user", "content": q[1]}], f"{g}|conversation"))
        if len(q) >= 3:
            extra.append((" ".join(q[:_LONG_TEXTS]), f"{g}|long"))
        extra.append(([{"role": "system", "content": rng.choice(_CAL_SYSTEM)}, {"role": "user", "content": q[-1]}],
                      f"{g}|system"))
    for g, idx in sorted(by_group.items()):  # groups of one-text clusters (benign questions): long messages
        if all(len(by_cluster[clusters[i]]) == 1 for i in idx) and len(idx) >= _LONG_TEXTS:
            pick = rng.sample(idx, len(idx))
            for k in range(0, len(pick) - _LONG_TEXTS + 1, _LONG_TEXTS * 4):
                extra.append((" ".join(queries.texts[i] for i in pick[k:k + _LONG_TEXTS]), f"{g}|long"))
    rng.shuffle(extra)
    for p, g in extra[:budget]:
        prompts.append(p)
        groups.append(g)
    return prompts, groups
