"""General knowledge: an evaluation set that measures what fine-tuning must not erase, and replay prompts.

Fine-tuning a small model on fictitious biographies can overwrite real facts ("The capital of France
is Saint Quarrydown."). Two package data files guard against that:

* ``eval/data/general_knowledge.jsonl``: 120 short-answer questions (capitals, authors of famous
  books, science, history, arts, everyday facts), scored by :func:`answer_correct`, so that machines
  without TOFU's ``world_facts``/``real_authors`` files can still measure general knowledge;
* ``eval/data/general_replay.txt``: 200 everyday prompts whose *base-model* answers are mixed into
  fine-tuning so that the model keeps its way of answering;
* ``eval/data/general_train.jsonl``: 121 short factual questions with reference answers (capitals,
  authors of books, composers, science) mixed into fine-tuning so that real questions keep real answers;
  none of them asks an evaluation question's fact or states an evaluation answer (tested). Replaying
  the base model's own answers to them instead taught its mistakes and evasions as templates (measured:
  ``eval/bench/finetune_recipe.py`` in the README). They ask about other facts than the evaluation
  set (checked by ``tests/test_general.py``), so replay cannot inflate the score it protects.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.schema import SchemaError, jsonl_objects
from eval.tasks.records import read_records

Topic = Literal["geography", "science", "literature", "history", "arts", "everyday"]
Source = Literal["builtin", "tofu:world_facts", "tofu:real_authors"]

KNOWLEDGE_FILE = "general_knowledge.jsonl"
REPLAY_FILE = "general_replay.txt"
TRAIN_FILE = "general_train.jsonl"
TOFU_FILES: dict[str, Source] = {"real_authors.json": "tofu:real_authors", "world_facts.json": "tofu:world_facts"}
# A generated answer naming this many of an item's wrong options is listing choices, not answering.
MAX_WRONG_MENTIONS = 1
# Surnames shorter than this are too likely to occur by chance ("Lee", "Tan") to count on their own.
MIN_SURNAME_LETTERS = 4
# Name particles that stay part of a surname or are skipped when checking that an answer is name-shaped.
_PARTICLES = {"de", "da", "del", "della", "di", "van", "von", "der", "den", "du", "la", "le", "wa", "bin", "al"}
_SUFFIXES = {"jr", "sr", "ii", "iii", "iv"}
# world_facts questions whose answer is a person (real_authors answers are people unless one word long).
_PERSON_QUESTION = re.compile(r"^\s*who\b|\bwhom\b|\bpresident\b", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Fold text for answer matching (NFKD without accents, casefolded, punctuation as spaces) so spelling variants meet."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", bare).split())


class GeneralItem(BaseModel):
    """One general-knowledge question with its accepted answers, so a generation can be checked by containment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    topic: Topic | None = None
    source: Source = "builtin"
    wrong: list[str] = Field(default_factory=list)

    @field_validator("question", "answer")
    @classmethod
    def _has_words(cls, v: str) -> str:
        """Reject text that normalises to nothing, since it could never be matched."""
        if not normalize_answer(v):
            raise ValueError("must contain at least one letter or digit")
        return v.strip()

    @field_validator("aliases", "wrong")
    @classmethod
    def _list_has_words(cls, v: list[str]) -> list[str]:
        """Reject empty aliases or options, since an empty string would match every answer."""
        for i, s in enumerate(v):
            if not normalize_answer(s):
                raise ValueError(f"entry {i} ({s!r}) must contain at least one letter or digit")
        return [s.strip() for s in v]

    def accepted(self) -> list[str]:
        """The normalised answer and aliases, deduplicated, so matching tries every accepted form once."""
        out: list[str] = []
        for s in (self.answer, *self.aliases):
            n = normalize_answer(s)
            if n not in out:
                out.append(n)
        return out


def _contains(haystack: str, needle: str) -> bool:
    """Whole-word containment of two normalised strings, so "Rome" does not match "Romeo"."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def _format_errors(err: ValidationError) -> str:
    """One line per invalid field, so a data-file error says what to fix."""
    return "; ".join(f"field {'.'.join(str(x) for x in e['loc']) or '<record>'}: {e['msg']}" for e in err.errors())


def read_general_jsonl(path: str | Path, source: Source = "builtin") -> list[GeneralItem]:
    """Read a general-knowledge JSON Lines file, raising a SchemaError that names the line and the field."""
    path = Path(path)
    return _parse_general_jsonl(path.read_text(encoding="utf-8"), str(path), source)


def _parse_general_jsonl(text: str, name: str, source: Source) -> list[GeneralItem]:
    """Validate JSON Lines text record by record, so one bad line is reported by number."""
    items = []
    for lineno, rec in jsonl_objects(text.splitlines(), name):
        try:
            items.append(GeneralItem.model_validate({"source": source, **rec}))
        except ValidationError as e:
            raise SchemaError(f"{name}: record at line {lineno}: {_format_errors(e)}") from e
    return items


def _package_text(name: str) -> str:
    """Text of a file shipped in ``eval/data``, found through importlib.resources so installed wheels work."""
    return resources.files("eval.data").joinpath(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _builtin_items() -> tuple[GeneralItem, ...]:
    """Parse the shipped evaluation set once; items are frozen so the cache cannot be altered."""
    return tuple(_parse_general_jsonl(_package_text(KNOWLEDGE_FILE), f"eval/data/{KNOWLEDGE_FILE}", "builtin"))


def builtin_general_knowledge() -> list[GeneralItem]:
    """The shipped 120-question set, for machines that lack TOFU's real_authors/world_facts files."""
    return list(_builtin_items())


@functools.lru_cache(maxsize=1)
def _replay() -> tuple[str, ...]:
    """Read the shipped replay prompts once (one per non-blank line)."""
    return tuple(s.strip() for s in _package_text(REPLAY_FILE).splitlines() if s.strip())


@functools.lru_cache(maxsize=1)
def _train_pairs() -> tuple[tuple[str, str], ...]:
    """The general training QA, read and checked once."""
    out = []
    for lineno, rec in jsonl_objects(_package_text(TRAIN_FILE).splitlines(), TRAIN_FILE):
        if not (set(rec) == {"question", "answer"} and all(isinstance(rec[k], str) and rec[k].strip() for k in rec)):
            raise SchemaError(f"{TRAIN_FILE}: record at line {lineno}: expected exactly non-empty 'question' and "
                              "'answer'")
        out.append((rec["question"], rec["answer"]))
    return tuple(out)


def general_training_qa() -> list[tuple[str, str]]:
    """Factual (question, reference answer) pairs for fine-tuning, disjoint from every evaluation set."""
    return list(_train_pairs())


def replay_prompts() -> list[str]:
    """General prompts whose base-model answers are replayed during fine-tuning so the model keeps its knowledge."""
    return list(_replay())


def _is_name_shaped(text: str) -> bool:
    """Whether text looks like a person's full name (two or more capitalised words), the case a surname alias fits."""
    words = text.split()
    core = [w for w in words if w.lower() not in _PARTICLES]
    return len(words) >= 2 and all(w[:1].isupper() for w in core)


def person_aliases(name: str) -> list[str]:
    """Accept a person's surname alone ("Austen" for "Jane Austen") when it is long enough not to match by chance."""
    words = [w for w in name.split() if w.strip(".,").lower() not in _SUFFIXES]
    if len(words) < 2:
        return []
    surname = words[-1]  # "Miguel de Cervantes" -> "Cervantes"
    letters = sum(ch.isalpha() for ch in normalize_answer(surname))
    return [surname] if letters >= MIN_SURNAME_LETTERS and normalize_answer(surname) != normalize_answer(name) else []


def _tofu_item(path: Path, where: str, rec: Any, source: Source) -> GeneralItem:
    """One TOFU multiple-choice record (question, option1..4, answer) as a GeneralItem with its wrong options."""
    if not isinstance(rec, dict):
        raise SchemaError(f"{path}: {where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("question", "answer", "option1", "option2", "option3", "option4") if k not in rec]
    if missing:
        raise SchemaError(f"{path}: {where}: missing field(s) {', '.join(missing)}")
    answer = rec["answer"]
    options = [rec[f"option{i}"] for i in range(1, 5)]
    if not all(isinstance(s, str) for s in [rec["question"], answer, *options]):
        raise SchemaError(f"{path}: {where}: question, answer and option1..4 must be strings")
    if normalize_answer(answer) not in [normalize_answer(o) for o in options]:
        raise SchemaError(f"{path}: {where}: field answer: {answer!r} is not one of option1..option4 {options}")
    # "Nora Roberts / J.D. Robb": either name is right.
    parts = [p.strip() for p in answer.split(" / ") if p.strip()] if " / " in answer else [answer]
    person = source == "tofu:real_authors" or bool(_PERSON_QUESTION.search(rec["question"]))
    aliases: list[str] = [p for p in parts if p != answer]
    if person:
        for p in parts:
            if _is_name_shaped(p):
                aliases += [a for a in person_aliases(p) if a not in aliases]
    try:
        return GeneralItem(question=rec["question"], answer=answer, aliases=aliases,
                           topic="literature" if source == "tofu:real_authors" else None, source=source,
                           wrong=[o for o in options if normalize_answer(o) != normalize_answer(answer)])
    except ValidationError as e:
        raise SchemaError(f"{path}: {where}: {_format_errors(e)}") from e


def tofu_general_knowledge(root: str | Path) -> list[GeneralItem]:
    """TOFU's real_authors and world_facts (the folder holding them) as items; [] when neither file is there."""
    root = Path(root)
    items: list[GeneralItem] = []
    for name, source in TOFU_FILES.items():
        path = root / name
        if path.is_file():
            items += [_tofu_item(path, where, rec, source) for where, rec in read_records(path)]
    return items


def general_knowledge_items(data_root: Path | None) -> list[GeneralItem]:
    """TOFU's real_authors/world_facts under ``data_root/tofu`` when present, else the built-in set.

    TOFU's model utility already includes real authors and world facts, so a user comparing against
    published TOFU numbers recognises the figure; the built-in set keeps the measurement available
    offline. ``None`` means no data root: the built-in set.
    """
    if data_root is not None:
        items = tofu_general_knowledge(Path(data_root) / "tofu")
        if items:
            return items
    return builtin_general_knowledge()


def general_items_for(task: Any) -> list[GeneralItem]:
    """The general-knowledge set for a task: TOFU's next to a TOFU task's files, else under the data root, else
    the built-in set (see :func:`general_knowledge_items`)."""
    from eval.tasks.records import default_data_root

    meta = getattr(task, "meta", {}) or {}
    if meta.get("source") == "tofu" and meta.get("root"):
        items = tofu_general_knowledge(meta["root"])
        if items:
            return items
    return general_knowledge_items(default_data_root())


def answer_correct(answer_text: str, item: GeneralItem) -> bool:
    """Whether a generated answer states the right one: whole-word containment of the answer or an alias.

    Matching is on :func:`normalize_answer` text, so case, accents and punctuation do not matter;
    numbers are not converted ("6" and "six" are both accepted only when one is an alias). An answer
    that also names two or more of the item's known wrong options is rejected, since listing the
    choices is not knowing the answer (wrong options overlapping an accepted form are not counted).
    """
    text = normalize_answer(answer_text)
    accepted = item.accepted()
    if not any(_contains(text, a) for a in accepted):
        return False
    distinct = {normalize_answer(w) for w in item.wrong}
    wrong = [w for w in distinct if not any(_contains(a, w) or _contains(w, a) for a in accepted)]
    return sum(_contains(text, w) for w in wrong) <= MAX_WRONG_MENTIONS


@dataclass(frozen=True)
class GeneralScore:
    """General-knowledge accuracy with the per-item verdicts, so a report can show which facts were lost."""

    value: float
    per_item: tuple[bool, ...]
    n: int


def general_accuracy(answers: Sequence[str], items: Sequence[GeneralItem]) -> GeneralScore:
    """Fraction of generated answers that :func:`answer_correct` accepts (NaN for no items)."""
    if len(answers) != len(items):
        raise ValueError(f"{len(answers)} answers but {len(items)} items; they must pair up one to one")
    per_item = tuple(answer_correct(a, it) for a, it in zip(answers, items, strict=True))
    value = sum(per_item) / len(per_item) if per_item else math.nan
    return GeneralScore(value=value, per_item=per_item, n=len(per_item))
