"""The forget-target schema shared by the detector, the guard, the trainers and the evaluation.

A :class:`ForgetTask` says *what to forget* (its :class:`ForgetTarget` s) and *what to keep*
(retain data, and neighbour data: retain items that resemble the targets on purpose, so that a
detector or an unlearner that over-reaches is caught). Tasks round-trip through JSON (one object)
and JSONL (one record a line, each tagged with ``"record"``); validation errors name the file,
the record and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.io import atomic_write_text

TargetKind = Literal["privacy", "copyright", "hazard"]
TARGET_KINDS: tuple[str, ...] = ("privacy", "copyright", "hazard")


class _Strict(BaseModel):
    """Base model: unknown fields are errors, so typos in data files do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class QAItem(_Strict):
    """A question with its reference answer, plus the variants TOFU-style metrics need."""

    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    paraphrased_question: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: list[str] = Field(default_factory=list)
    subject: str | None = None
    kind: str = "fact"


class MCQItem(_Strict):
    """A multiple-choice question in WMDP's schema: ``answer`` indexes ``choices``."""

    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2)
    answer: int
    subject: str | None = None

    @model_validator(mode="after")
    def _answer_in_range(self) -> MCQItem:
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is outside choices[0..{len(self.choices) - 1}]")
        return self


class ForgetTarget(_Strict):
    """One thing to forget: an entity, a work or a hazardous topic, with its evidence."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: TargetKind
    names: list[str] = Field(min_length=1, description="Canonical name first, then aliases.")
    policy: str = Field(min_length=1, description="What the model must not reveal, in one or two sentences.")
    texts: list[str] = Field(default_factory=list)
    qa: list[QAItem] = Field(default_factory=list)
    mcq: list[MCQItem] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("names")
    @classmethod
    def _names_not_blank(cls, names: list[str]) -> list[str]:
        if any(not n.strip() for n in names):
            raise ValueError("names must not contain blank strings")
        return names

    @property
    def name(self) -> str:
        """The canonical name (the first of ``names``)."""
        return self.names[0]

    @property
    def aliases(self) -> list[str]:
        """Every name but the canonical one."""
        return self.names[1:]


class ForgetTask(_Strict):
    """Targets to forget, bundled with the data that must survive the forgetting."""

    name: str = Field(min_length=1)
    targets: list[ForgetTarget] = Field(default_factory=list)
    retain_qa: list[QAItem] = Field(default_factory=list)
    retain_texts: list[str] = Field(default_factory=list)
    retain_mcq: list[MCQItem] = Field(default_factory=list)
    neighbour_qa: list[QAItem] = Field(default_factory=list)
    benign_questions: list[str] = Field(default_factory=list)
    holdout_texts: list[str] = Field(default_factory=list, description="Never-trained texts (MUSE privleak holdout).")
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_target_ids(self) -> ForgetTask:
        seen: set[str] = set()
        for t in self.targets:
            if t.id in seen:
                raise ValueError(f"duplicate target id {t.id!r}")
            seen.add(t.id)
        return self

    def target(self, target_id: str) -> ForgetTarget:
        """Return the target with this id, or raise KeyError listing the known ids."""
        for t in self.targets:
            if t.id == target_id:
                return t
        raise KeyError(f"no target {target_id!r} in task {self.name!r}; known: {[t.id for t in self.targets]}")

    @property
    def forget_qa(self) -> list[QAItem]:
        """All forget QA items of all targets, in target order."""
        return [q for t in self.targets for q in t.qa]

    @property
    def forget_texts(self) -> list[str]:
        """All forget texts of all targets, in target order."""
        return [x for t in self.targets for x in t.texts]

    @property
    def forget_mcq(self) -> list[MCQItem]:
        """All forget MCQ items of all targets, in target order."""
        return [q for t in self.targets for q in t.mcq]


class SchemaError(ValueError):
    """A data file does not match the schema; the message names file, record and field."""


# Fields of ForgetTask that JSONL stores as one record per list element.
_LIST_RECORDS: dict[str, str] = {
    "target": "targets",
    "retain_qa": "retain_qa",
    "retain_text": "retain_texts",
    "retain_mcq": "retain_mcq",
    "neighbour_qa": "neighbour_qa",
    "benign_question": "benign_questions",
    "holdout_text": "holdout_texts",
}
_TEXT_RECORDS = {"retain_text", "benign_question", "holdout_text"}


def _format_validation(err: ValidationError, path: Path, record: str) -> SchemaError:
    """Turn a pydantic error into one message naming the file, the record and each field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<record>"
        parts.append(f"field {loc}: {e['msg']}")
    return SchemaError(f"{path}: {record}: " + "; ".join(parts))


def task_to_records(task: ForgetTask) -> Iterator[dict[str, Any]]:
    """Yield the JSONL records of a task: a header, then one record per list element."""
    yield {"record": "task", "name": task.name, "meta": task.meta}
    for rtype, field in _LIST_RECORDS.items():
        for item in getattr(task, field):
            if rtype in _TEXT_RECORDS:
                yield {"record": rtype, "text": item}
            else:
                yield {"record": rtype, **item.model_dump(mode="json", exclude_defaults=True)}


def save_task(task: ForgetTask, path: str | Path) -> Path:
    """Write a task atomically as JSON (``.json``) or JSONL (``.jsonl``), chosen by suffix."""
    path = Path(path)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_to_records(task))
    elif path.suffix == ".json":
        text = task.model_dump_json(indent=1, exclude_defaults=True)
    else:
        raise SchemaError(f"{path}: unknown suffix {path.suffix!r}; accepted: .json, .jsonl")
    atomic_write_text(path, text)
    return path


def jsonl_objects(lines: Iterable[str], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank JSON Lines line, with errors naming ``name`` and the line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{name}: record at line {lineno}: invalid JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            raise SchemaError(f"{name}: record at line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a file, with errors naming the line."""
    with path.open(encoding="utf-8") as fh:
        yield from jsonl_objects(fh, str(path))


def _task_from_records(path: Path, records: Iterable[tuple[int, dict[str, Any]]]) -> ForgetTask:
    """Assemble a task from tagged JSONL records, validating each one where it stands."""
    data: dict[str, Any] = {"name": path.stem, "meta": {}}
    lists: dict[str, list[Any]] = {f: [] for f in _LIST_RECORDS.values()}
    item_models: dict[str, type[BaseModel]] = {
        "target": ForgetTarget,
        "retain_qa": QAItem,
        "retain_mcq": MCQItem,
        "neighbour_qa": QAItem,
    }
    for lineno, obj in records:
        where = f"record at line {lineno}"
        rtype = obj.pop("record", None)
        if rtype == "task":
            data["name"] = obj.get("name", data["name"])
            data["meta"] = obj.get("meta", {})
            continue
        if rtype not in _LIST_RECORDS:
            known = ", ".join(["task", *_LIST_RECORDS])
            raise SchemaError(f"{path}: {where}: field record: {rtype!r} is not a record type; accepted: {known}")
        if rtype in _TEXT_RECORDS:
            text = obj.get("text")
            if not isinstance(text, str) or set(obj) != {"text"}:
                raise SchemaError(f"{path}: {where} ({rtype}): field text: expected exactly one string field 'text'")
            lists[_LIST_RECORDS[rtype]].append(text)
            continue
        try:
            lists[_LIST_RECORDS[rtype]].append(item_models[rtype].model_validate(obj))
        except ValidationError as e:
            ident = f" id={obj.get('id')!r}" if rtype == "target" and "id" in obj else ""
            raise _format_validation(e, path, f"{where} ({rtype}{ident})") from e
    try:
        return ForgetTask.model_validate({**data, **lists})
    except ValidationError as e:
        raise _format_validation(e, path, "task") from e


def load_task(path: str | Path) -> ForgetTask:
    """Read a task from JSON or JSONL, raising :class:`SchemaError` that names file, record, field."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file; a task is a .json or .jsonl file written by save_task")
    if path.suffix == ".jsonl":
        return _task_from_records(path, _read_jsonl(path))
    if path.suffix != ".json":
        raise SchemaError(f"{path}: unknown suffix {path.suffix!r}; accepted: .json, .jsonl")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(obj, dict):
        raise SchemaError(f"{path}: expected a JSON object with a 'targets' list, got {type(obj).__name__}")
    try:
        return ForgetTask.model_validate(obj)
    except ValidationError as e:
        # Name the record by its list and index (e.g. targets[2]) and the rest as the field.
        parts = []
        for err in e.errors():
            loc = list(err["loc"])
            if len(loc) >= 2 and isinstance(loc[1], int):
                record, field = f"{loc[0]}[{loc[1]}]", ".".join(str(x) for x in loc[2:]) or "<record>"
            else:
                record, field = "task", ".".join(str(x) for x in loc) or "<record>"
            parts.append(f"{record}: field {field}: {err['msg']}")
        raise SchemaError(f"{path}: " + "; ".join(parts)) from e


def load_targets(path: str | Path) -> list[ForgetTarget]:
    """Read forget targets alone: a JSON target or list of targets, or JSONL of target records."""
    path = Path(path)
    if path.suffix == ".jsonl":
        recs = [(n, {"record": o.get("record", "target"), **o}) for n, o in _read_jsonl(path)]
        return _task_from_records(path, recs).targets
    if not path.is_file():
        raise SchemaError(f"{path}: no such file; targets are a .json or .jsonl file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ForgetTarget.model_validate(item))
        except ValidationError as e:
            raise _format_validation(e, path, f"target[{i}]") from e
    return out
