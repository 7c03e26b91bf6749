"""Turn a prompt (a string or chat messages) into the text units that get scored.

A multi-turn conversation is scored as each turn, the user turns joined and all turns joined, so a
question split over several turns is seen whole. Long units are also scored in overlapping word
windows and every multi-sentence unit also sentence by sentence, because the encoder reads only
the first 256 tokens and a forget question buried in other text would otherwise be diluted or cut
off. Units are normalised but keep their case (proper nouns matter to one feature).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from core.generation import Prompt
from detectors.normalize import normalize_cased

_SENT = re.compile(r"(?<=[.!?;:])\s+")
_MAX_UNITS = 64


class PromptError(TypeError):
    """A prompt is neither a string nor a list of {"role", "content"} messages."""


def _content_text(content: Any, where: str) -> str:
    """Text of a message's content: a string or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for p in content:
            if isinstance(p, Mapping) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
        return "\n".join(parts)
    if content is None:
        return ""
    raise PromptError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def turns_of(prompt: Prompt, max_turns: int = 32) -> list[tuple[str, str]]:
    """(role, text) of the last ``max_turns`` turns; a plain string is one user turn."""
    if isinstance(prompt, str):
        return [("user", prompt)]
    if not isinstance(prompt, Sequence):
        raise PromptError(f"a prompt must be a str or a list of messages, got {type(prompt).__name__}")
    out = []
    for i, msg in enumerate(prompt):
        if not isinstance(msg, Mapping) or "content" not in msg:
            raise PromptError(f"message {i}: expected a mapping with 'role' and 'content', got {msg!r:.80}")
        role = str(msg.get("role", "user"))
        out.append((role, _content_text(msg["content"], f"message {i}")))
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
    turns = turns_of(prompt, max_turns)
    raw: list[str] = []
    non_system = [(r, normalize_cased(t)) for r, t in turns if r != "system" and t.strip()]
    if not non_system:
        non_system = [(r, normalize_cased(t)) for r, t in turns if t.strip()]
    for _, t in non_system:
        raw.append(t)
    user = [t for r, t in non_system if r == "user"]
    if len(user) > 1:
        raw.append(" ".join(user))
    if len(non_system) > 1:
        raw.append(" ".join(t for _, t in non_system))
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
