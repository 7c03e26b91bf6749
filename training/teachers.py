"""Teachers that write supervised targets for forget queries: a deterministic template, or any local LLM.

TRU trains on *reasoning + refusal* targets; the guard is fine-tuned on JSON decisions. Both come
from a teacher. :class:`TemplateTeacher` works offline and is query-specific: it names the entity
asked about and the kind of fact asked for (birthplace, awards, the material of a component...).
:class:`LLMTeacher` asks a local LLM through :func:`core.generation.generate` and falls back to the
template for any answer it cannot parse. Teacher outputs are cached as JSONL by the callers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from core.generation import generate
from core.io import atomic_write_text
from core.schema import ForgetTarget

log = logging.getLogger(__name__)

# (pattern on the lower-cased query, kind of fact). First match wins, so specific patterns come first.
_FACT_KINDS: list[tuple[str, str]] = [
    (r"\bfather\b", "father's occupation"),
    (r"\bmother\b", "mother's occupation"),
    (r"\bparents?\b|\bfamily\b", "family"),
    (r"birth year|year .*born|when was .*born", "year of birth"),
    (r"\bborn\b|birthplace|birth place", "birthplace"),
    (r"\blanguage\b", "home language"),
    (r"\bmarried\b|\bspouse\b|\bpartner\b|\bwife\b|\bhusband\b", "spouse"),
    (r"\bpets?\b|\banimals?\b", "pets"),
    (r"pastime|hobby|free time|spare time", "hobbies"),
    (r"award|prize|honou?r|medal", "awards"),
    (r"stud(y|ied)|educat|institution|attend|university|school", "education"),
    (r"profession|for a living|kind of work|occupation|\bjob\b", "profession"),
    (r"best-known work|famous for|celebrated work|\bwrote\b|\bcreator\b|\bworks?\b", "best-known work"),
    (r"\blives?\b|resid|\bhome\b|address", "place of residence"),
    (r"made of|material", "construction materials"),
    (r"tuned to|frequency", "operating frequency"),
    (r"cooled|cooling|coolant", "cooling method"),
    (r"build|assemble|operate|component|how (do|does|to)", "technical details"),
]


def fact_kind(query: str) -> str:
    """The kind of fact a query asks for ("birthplace", "awards", ...), or "details" if none is recognised."""
    q = query.lower()
    for pattern, kind in _FACT_KINDS:
        if re.search(pattern, q):
            return kind
    return "details"


def mentioned_name(query: str, target: ForgetTarget) -> str:
    """The target name (canonical or alias) the query uses, else the canonical name."""
    q = query.lower()
    for n in sorted(target.names, key=len, reverse=True):
        if n.lower() in q:
            return n
    return target.name


def component(query: str) -> str | None:
    """For technical queries, the component asked about ("the stabiliser coil"), if the query names one."""
    q = query.lower()
    m = (re.search(r"\bthe ([a-z][a-z -]{2,40}?) of (?:a|an|the)\b", q)
         or re.search(r"\bwhat is the ([a-z][a-z -]{2,40}?) (?:made of|tuned to|cooled with)\b", q))
    return m.group(1).strip() if m else None


def subject_phrase(query: str, target: ForgetTarget) -> str:
    """What the query is about, e.g. "the birthplace of Elara Vos" or "the construction materials of the
    stabiliser coil of a Quillon resonance drive"."""
    kind, name = fact_kind(query), target.name
    if target.kind == "hazard":
        part = component(query)
        return f"the {kind} of the {part} of a {name}" if part else f"the {kind} of a {name}"
    return f"{name}'s {kind}"


class TRUTarget(BaseModel):
    """A TRU supervision target: reasoning about why not to answer, then the refusal."""

    question: str
    reasoning: str
    refusal: str
    source: str = "template"


class Teacher(Protocol):
    """Writes TRU targets for forget queries; ``name`` identifies it in cache keys."""

    name: str

    def tru_targets(self, items: Sequence[tuple[str, ForgetTarget]]) -> list[TRUTarget]:
        """One target per (query, forget target)."""
        ...


def template_tru_target(query: str, target: ForgetTarget) -> TRUTarget:
    """The deterministic reasoning + refusal for one query (names the entity and the kind of fact).

    The reasoning says what is asked without restating the question word for word (hazard queries
    name the kind of detail, not the component), so the target teaches *why* not to answer.
    """
    name = mentioned_name(query, target)
    kind = fact_kind(query)
    if target.kind == "hazard":
        name = name if name.lower().startswith("the ") else f"the {name}"
        reasoning = (f"This asks for the {kind} of {name}, a restricted technology. Giving such technical "
                     f"details could help someone build it, so I must not provide, confirm or guess them.")
        what = "technical details"
    else:
        reasoning = (f"The question asks for {name}'s {kind}. That is personal information about {name}, which "
                     f"I must not reveal, so I will not state, confirm or guess it.")
        what = "personal information"
    refusal = f"I'm sorry, but I can't share {what} about {name}."
    return TRUTarget(question=query, reasoning=reasoning, refusal=refusal, source="template")


class TemplateTeacher:
    """Offline teacher: :func:`template_tru_target` for every query."""

    name = "template-v1"

    def tru_targets(self, items: Sequence[tuple[str, ForgetTarget]]) -> list[TRUTarget]:
        """Template targets for every (query, target)."""
        return [template_tru_target(q, t) for q, t in items]


_TRU_PROMPT = (
    "An assistant must not reveal information covered by this policy: {policy}\n"
    "A user asked: \"{query}\"\n"
    "Write the assistant's reply in exactly two lines:\n"
    "Reasoning: <one or two sentences on what is asked and why it must not be revealed>\n"
    "Refusal: <one short, polite sentence declining>"
)


def parse_tru_reply(query: str, text: str, source: str) -> TRUTarget | None:
    """Parse a teacher reply of the form "Reasoning: ...\\nRefusal: ..."; None if it does not fit."""
    m = re.search(r"reasoning\s*:\s*(?P<r>.+?)\s*refusal\s*:\s*(?P<f>.+)", text, re.IGNORECASE | re.DOTALL)
    if not m:
        return None
    r, f = " ".join(m.group("r").split()), " ".join(m.group("f").split())
    if len(r) < 12 or len(f) < 6:
        return None
    return TRUTarget(question=query, reasoning=r, refusal=f, source=source)


class LLMTeacher:
    """A local LLM as teacher (e.g. the guard model); unparseable replies fall back to the template."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 96, batch_size: int = 8) -> None:
        """Wrap a loaded model; ``name`` (e.g. its path plus weight digest) keys the cache."""
        self.model, self.tokenizer = model, tokenizer
        self.name = f"llm-{name}"
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.fallbacks = 0

    def tru_targets(self, items: Sequence[tuple[str, ForgetTarget]]) -> list[TRUTarget]:
        """Ask the LLM for each target; use the template where its reply does not parse."""
        prompts = [_TRU_PROMPT.format(policy=t.policy, query=q) for q, t in items]
        replies = generate(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                           batch_size=self.batch_size, progress=True, desc="teacher")
        out = []
        for (q, t), reply in zip(items, replies, strict=True):
            parsed = parse_tru_reply(q, reply, self.name)
            if parsed is None:
                self.fallbacks += 1
                parsed = template_tru_target(q, t)
            out.append(parsed)
        if self.fallbacks:
            log.warning("teacher %s: %d of %d replies did not parse; used the template for them",
                        self.name, self.fallbacks, len(items))
        return out


def cached_tru_targets(teacher: Teacher, items: Sequence[tuple[str, ForgetTarget]], root: Path,
                       path: Path | None = None) -> list[TRUTarget]:
    """TRU targets from the JSONL cache when it holds exactly these queries, else from the teacher (then cached)."""
    key = json.dumps([teacher.name, [(q, t.id, t.policy) for q, t in items]])
    path = path or root / "tru" / f"{teacher.name.replace('/', '_')[:60]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    if path.exists():
        cached = [TRUTarget.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if [c.question for c in cached] == [q for q, _ in items]:
            log.info("reusing %d cached TRU targets from %s", len(cached), path)
            return cached
    targets = teacher.tru_targets(items)
    atomic_write_text(path, "".join(t.model_dump_json() + "\n" for t in targets))
    return targets
