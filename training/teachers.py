"""Teachers that write supervised targets for forget queries: a local LLM reasoning about the query, or a template.

TRU trains on *reasoning + refusal* targets; the guard is fine-tuned on JSON decisions. Both come
from a teacher. :class:`LLMTeacher` is TRU's: a local LLM (by default the embedded instruct model,
untuned) is given a chain-of-thought prompt (:func:`tru_prompt`: two demonstrations, then the question,
its protected subject and policy) and writes why answering would reveal protected information, then
declines. Every reply is validated (:func:`tru_target_problem`: some reasoning, the subject named, no
forget fact stated, as :func:`core.facts.leaked_facts` sees it, a reason given for declining); an
unusable reply falls back to the template for that query and is counted. :class:`TemplateTeacher` is
deterministic and offline: it names the entity asked about and the kind of fact asked for (birthplace,
awards, the material of a component...). Teacher outputs are cached as JSONL by :func:`cached_tru_targets`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from core.facts import answer_novel_span, leaked_facts, normalise_for_match, target_fact_values
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
    source: str = Field("template", description="'template', or the name of the LLM teacher that wrote it.")
    note: str = Field("", description="Why the template was used ('fallback: ...'), or 'template refusal'.")
    reply: str = Field("", description="The LLM teacher's raw reply, when there was one.")


class Teacher(Protocol):
    """Writes TRU targets for forget queries; ``name`` identifies it in cache keys."""

    name: str

    def tru_targets(self, items: Sequence[tuple[str, ForgetTarget]],
                    answers: Sequence[str | None] | None = None) -> list[TRUTarget]:
        """One target per (query, forget target); ``answers`` are the forget answers a target must not state."""
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

    def tru_targets(self, items: Sequence[tuple[str, ForgetTarget]],
                    answers: Sequence[str | None] | None = None) -> list[TRUTarget]:
        """Template targets for every (query, target); they never state a fact, so ``answers`` go unused."""
        return [template_tru_target(q, t) for q, t in items]


TRU_PROMPT_VERSION = "cot2-v2"
"""Version of the LLM teacher's prompt, reply parsing and validation; part of every cache key, so a change
regenerates (v2: a reply must give a reason for declining)."""

_TRU_ASK = ('Question: "{query}"\nProtected subject: {subject}. Policy: {policy}\n'
            "Reason step by step about why answering would reveal protected information about {subject}, then decline.")
# Two worked demonstrations (a person, a device; both invented and outside every task) that show the shape of a
# reasoning target: what is asked, why it is protected, what answering would do, then a one-sentence refusal.
_TRU_SHOTS = [
    ("Where does Jonas Miller live?", "Jonas Miller", "Do not reveal personal information about Jonas Miller.",
     "The question asks where Jonas Miller lives. His home is personal information about Jonas Miller, and the "
     "policy protects it, so stating, confirming or guessing it would reveal protected information. "
     "I'm sorry, but I can't share personal information about Jonas Miller."),
    ("What metal is the rotor of a Vantor pump made of?", "Vantor pump",
     "Do not give technical details on building a Vantor pump.",
     "The question asks for the material of a part of the Vantor pump. That is a technical detail of a restricted "
     "device, and sharing it could help someone build one, so I must not give it. "
     "I'm sorry, but I can't provide technical details about the Vantor pump."),
]


def tru_prompt(query: str, target: ForgetTarget) -> list[dict[str, str]]:
    """The LLM teacher's chain-of-thought prompt: two demonstrations, then the query with its protected subject.

    The last user turn names the question, the subject (the target's canonical name) and its policy, and asks
    the model to reason about why answering would reveal protected information, then decline.
    """
    msgs: list[dict[str, str]] = []
    for q, subject, policy, reply in _TRU_SHOTS:
        msgs += [{"role": "user", "content": _TRU_ASK.format(query=q, subject=subject, policy=policy)},
                 {"role": "assistant", "content": reply}]
    return msgs + [{"role": "user", "content": _TRU_ASK.format(query=query, subject=target.name, policy=target.policy)}]


def parse_tru_reply(query: str, text: str, source: str) -> TRUTarget | None:
    """Parse a teacher reply of the form "Reasoning: ...\\nRefusal: ..."; None if it does not fit."""
    m = re.search(r"reasoning\s*:\s*(?P<r>.+?)\s*refusal\s*:\s*(?P<f>.+)", text, re.IGNORECASE | re.DOTALL)
    if not m:
        return None
    r, f = " ".join(m.group("r").split()), " ".join(m.group("f").split())
    if len(r) < 12 or len(f) < 6:
        return None
    return TRUTarget(question=query, reasoning=r, refusal=f, source=source)


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_REFUSAL = re.compile(r"\b(sorry|apologi[sz]e|can ?not|can't|unable|won't|will not|not able to|decline)\b", re.I)


def split_reasoning_reply(text: str) -> tuple[str, str | None]:
    """Reasoning and refusal of a teacher reply: the labelled form, or free text split at its first refusal sentence.

    Free text is cut into sentences; a trailing sentence without end punctuation (cut by the token cap) and
    repeated sentences (small models loop) are dropped. The refusal is the first sentence after the reasoning
    that declines ("sorry", "can't", "unable", ...); None if no sentence declines.
    """
    labelled = parse_tru_reply("", text, "")
    if labelled is not None:
        return labelled.reasoning, labelled.refusal
    sentences = [s for s in _SENTENCE_BREAK.split(" ".join(text.split())) if s]
    if sentences and not _SENTENCE_END.search(sentences[-1]):
        sentences.pop()
    kept: list[str] = []
    for s in sentences:
        if normalise_for_match(s) not in {normalise_for_match(k) for k in kept}:
            kept.append(s)
    for i, s in enumerate(kept):
        if _REFUSAL.search(s):
            return " ".join(kept[:i]), s
    return " ".join(kept), None


def forget_facts(query: str, target: ForgetTarget, answer: str | None = None) -> list[str]:
    """What a target for ``query`` must not state: the target's fact values and the span its forget answer adds."""
    facts = target_fact_values(target)
    span = answer_novel_span(query, answer) if answer else ""
    return facts + [span] if span else facts


_GIVES_REASON = re.compile(
    r"\b(protect\w*|polic(?:y|ies)|personal|private|privacy|confidential\w*|restricted|hazard\w*|danger\w*|"
    r"sensitive|harm\w*|unsafe|must not|should not|not allowed|can ?not|can't|won't|will not|refrain|declin\w*|"
    r"reveal\w*|disclos\w*|withh[eo]ld\w*)\b", re.IGNORECASE)
"""Words with which a reasoning target says why it will not answer (the unlearning scope). A reply without one
is not reasoning about the question but a statement about the subject: measured on the fine-tuned SmolLM2
target, 10 of its 15 replies to the offline task's forget questions were answers such as "Philippa Stavberg
was born in High Juniperfield." (a wrong place, so the fact check passed them)."""


def tru_target_problem(reasoning: str, refusal: str, target: ForgetTarget, facts: Sequence[str]) -> str | None:
    """Why a written reasoning target is unusable, or None: no reasoning, the subject not named, a fact stated,
    or no reason given for declining (:data:`_GIVES_REASON`: an answer, right or wrong, is no reasoning target)."""
    if len(reasoning.split()) < 5:
        return "no reasoning"
    text = f"{reasoning} {refusal}"
    hay = f" {normalise_for_match(text)} "
    if not any(f" {normalise_for_match(n)} " in hay for n in target.names):
        return "subject not named"
    leaks = leaked_facts(text, facts)
    if leaks:
        return f"states {leaks[0]!r}"
    return None if _GIVES_REASON.search(reasoning) else "gives no reason"


class LLMTeacher:
    """A local LLM as teacher (TRU's default: the embedded instruct model): it writes each reasoning target itself.

    Each query gets :func:`tru_prompt`; the replies are generated greedily in left-padded batches of
    ``batch_size``, at most ``max_new_tokens`` tokens each, then split into reasoning and refusal
    (:func:`split_reasoning_reply`) and checked (:func:`tru_target_problem`). A reply that fails the check
    falls back to the template target for that query (``note`` says why, ``fallbacks`` counts them); a
    valid reply without a refusal sentence keeps its reasoning and takes the template's refusal.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 96, batch_size: int = 8) -> None:
        """Wrap a loaded model; ``name`` (e.g. its path plus weight digest) keys the cache with the prompt version."""
        self.model, self.tokenizer = model, tokenizer
        self.name = f"llm-{name}-{TRU_PROMPT_VERSION}-t{max_new_tokens}"
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.fallbacks = 0

    def tru_targets(self, items: Sequence[tuple[str, ForgetTarget]],
                    answers: Sequence[str | None] | None = None) -> list[TRUTarget]:
        """Ask the LLM for each target; use the template where its reply is unusable (``answers`` widen the leak check)."""
        answers = list(answers) if answers is not None else [None] * len(items)
        prompts = [tru_prompt(q, t) for q, t in items]
        replies = generate(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                           batch_size=self.batch_size, progress=True, desc="teacher")
        out = []
        for (q, t), answer, reply in zip(items, answers, replies, strict=True):
            template = template_tru_target(q, t)
            reasoning, refusal = split_reasoning_reply(reply)
            problem = tru_target_problem(reasoning, refusal or "", t, forget_facts(q, t, answer))
            if problem is not None:
                self.fallbacks += 1
                out.append(template.model_copy(update={"note": f"fallback: {problem}", "reply": reply}))
                continue
            out.append(TRUTarget(question=q, reasoning=reasoning, refusal=refusal or template.refusal,
                                 source=self.name, note="" if refusal else "template refusal", reply=reply))
        if self.fallbacks:
            log.warning("teacher %s: %d of %d replies were unusable; used the template for them",
                        self.name, self.fallbacks, len(items))
        return out


def cached_tru_targets(teacher: Teacher, items: Sequence[tuple[str, ForgetTarget]], root: Path,
                       path: Path | None = None, answers: Sequence[str | None] | None = None) -> list[TRUTarget]:
    """TRU targets from the JSONL cache when it holds exactly these queries, else from the teacher (then cached).

    The file name hashes the teacher's name (model digest and prompt version for an LLM teacher), the queries,
    their targets' policies and the forget answers the replies are checked against.
    """
    key = json.dumps([teacher.name, [(q, t.id, t.policy) for q, t in items], list(answers or [])])
    path = path or root / "tru" / f"{teacher.name.replace('/', '_')[:60]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    if path.exists():
        cached = [TRUTarget.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if [c.question for c in cached] == [q for q, _ in items]:
            log.info("reusing %d cached TRU targets from %s", len(cached), path)
            return cached
    targets = teacher.tru_targets(items, answers)
    atomic_write_text(path, "".join(t.model_dump_json() + "\n" for t in targets))
    return targets
