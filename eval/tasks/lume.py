"""LUME (SemEval-2025 Task 4): one target per forget document, retain documents as retain data."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from core.schema import ForgetTarget, ForgetTask, QAItem, SchemaError
from eval.tasks.names import _NAME_STOP, _POSSESSIVE_RE, _cap_runs, extract_person_name
from eval.tasks.records import (
    DataFilesNotFoundError,
    _listing,
    _obj,
    _require_file,
    _str,
    _validated,
    read_records,
)

log = logging.getLogger(__name__)

LUME_TASKS: tuple[str, ...] = ("Task1", "Task2", "Task3")
_LUME_KINDS: dict[str, str] = {"Task1": "copyright", "Task2": "privacy", "Task3": "privacy"}
_LUME_FILES: dict[str, tuple[str, ...]] = {
    "forget": ("forget.jsonl", "forget.json", "forget.parquet"),
    "retain": ("retain.jsonl", "retain.json", "retain.parquet"),
}
_LUME_ID_RE = re.compile(r"(?s)(.+?)(sc|qa)(\d+)")
_LUME_TITLE_PAREN_RE = re.compile(r"\s*\([^()]*\)\s*$")
# Sentence ends (not after Mr./Mrs./Ms./Dr./St.), past closing quotes: LUME stories escape quotes as \".
_LUME_SENT_RE = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])[\\\"'”’)\]]*\s+|\n+")
_EDGE_PUNCT_RE = re.compile(r"^\W+|\W+$")
# Capitalised words that open sentences in LUME stories and are not names (besides _NAME_STOP).
_STORY_STOP = frozenset("here there i'm i've i'll i'd let's oh okay hey hello title chapter".split())
LUME_STORY_NAMES = 4  # at most this many proper names of a Task1 story become aliases


class _LumeRecord(NamedTuple):
    """One validated LUME record: where it is, which document and part it belongs to, and its text."""

    path: Path
    where: str
    task: str
    doc: str  # the id prefix shared by the document's records
    part: str  # "sc" (a sentence-completion split of the document) or "qa"
    number: int
    input: str
    output: str


class _LumeDoc(NamedTuple):
    """The records of one LUME document, sc and qa parts each in id-number order."""

    task: str
    doc: str
    first: _LumeRecord  # its first record in the file, which errors name
    sc: list[_LumeRecord]
    qa: list[_LumeRecord]


def _lume_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    """LUME task names in canonical form and order ("task3", "3" and "Task3" all mean Task3)."""
    out = set()
    for t in tasks:
        m = re.fullmatch(r"(?i)(?:task)?\s*([123])", str(t).strip())
        if not m:
            raise ValueError(f"unknown LUME task {t!r}; accepted: {', '.join(LUME_TASKS)} (or task1, task2, task3)")
        out.add(f"Task{m.group(1)}")
    if not out:
        raise ValueError(f"no LUME task given; accepted: {', '.join(LUME_TASKS)}")
    return tuple(t for t in LUME_TASKS if t in out)


def _lume_file(root: Path, split: str) -> Path:
    """The forget/retain file of a LUME folder (the release's JSON Lines, or JSON/parquet of the same records)."""
    for name in _LUME_FILES[split]:
        if (root / name).is_file():
            return root / name
    return _require_file(root / _LUME_FILES[split][0], f"LUME {split} split")


def _lume_records(path: Path) -> list[_LumeRecord]:
    """Every record of a LUME file, checked: id ends in sc<N>/qa<N>, task known, input/output non-blank, ids unique."""
    out = []
    seen: dict[str, str] = {}
    doc_task: dict[str, tuple[str, str]] = {}
    for where, rec in read_records(path):
        rec = _obj(path, where, rec)
        rid = _str(path, where, rec, "id")
        task = _str(path, where, rec, "task")
        if task not in LUME_TASKS:
            raise SchemaError(f"{path}: {where}: field task: {task!r} is not a LUME task; "
                              f"accepted: {', '.join(LUME_TASKS)}")
        m = _LUME_ID_RE.fullmatch(rid)  # type: ignore[arg-type]
        if not m:
            raise SchemaError(f"{path}: {where}: field id: {rid!r} is not a document id followed by sc<N> "
                              f"(a document split) or qa<N> (a question), e.g. '12762334sc1' or '12762334qa0'")
        if rid in seen:
            raise SchemaError(f"{path}: {where}: field id: {rid!r} repeats the id of the {seen[rid]}")
        seen[rid] = where  # type: ignore[index]
        doc = m.group(1)
        if doc in doc_task and doc_task[doc][0] != task:
            raise SchemaError(f"{path}: {where}: field task: {task!r}, but document {doc!r} is "
                              f"{doc_task[doc][0]} at the {doc_task[doc][1]}")
        doc_task.setdefault(doc, (task, where))  # type: ignore[arg-type]
        inp = _str(path, where, rec, "input")
        outp = _str(path, where, rec, "output")
        out.append(_LumeRecord(path, where, task, doc, m.group(2), int(m.group(3)), inp, outp))  # type: ignore[arg-type]
    if not out:
        raise SchemaError(f"{path}: no records")
    return out


def _lume_docs(records: list[_LumeRecord]) -> list[_LumeDoc]:
    """Records grouped by document (file order of each document's first record); a document needs sc and qa."""
    groups: dict[str, list[_LumeRecord]] = {}
    for r in records:
        groups.setdefault(r.doc, []).append(r)
    docs = []
    for doc, recs in groups.items():
        first = recs[0]
        sc = sorted((r for r in recs if r.part == "sc"), key=lambda r: r.number)
        qa = sorted((r for r in recs if r.part == "qa"), key=lambda r: r.number)
        for part, items, what in (("sc", sc, "a document split (sentence completion)"), ("qa", qa, "a question")):
            if not items:
                raise SchemaError(f"{first.path}: {first.where} (document {doc!r}, {first.task}): field id: the "
                                  f"document has no {part}<N> record ({what}); each document needs at least one "
                                  f"sc and one qa record")
        docs.append(_LumeDoc(first.task, doc, first, sc, qa))
    return docs


def _tidy_text(text: str) -> str:
    """Whitespace tidied: spaces/tabs collapsed, lines stripped, at most one blank line, no edge whitespace."""
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _lume_document(doc: _LumeDoc) -> str:
    """The full document: each split's first part and continuation joined (LUME cuts mid-sentence)."""
    return _tidy_text("\n".join(f"{r.input} {r.output}" for r in doc.sc))


def _short_ids(full: Sequence[str], n: int = 8, step: int = 4) -> list[str]:
    """Each string cut to ``n`` characters, lengthened by ``step`` where cuts collide; identical ones get -2, -3."""
    out = [""] * len(full)

    def assign(idx: list[int], m: int) -> None:
        groups: dict[str, list[int]] = {}
        for i in idx:
            groups.setdefault(full[i][:m], []).append(i)
        for cut, members in groups.items():
            if len(members) == 1:
                out[members[0]] = cut
            elif all(len(full[i]) <= m for i in members):  # the same string: number the repeats
                for j, i in enumerate(members):
                    out[i] = cut if j == 0 else f"{cut}-{j + 1}"
            else:
                assign(members, m + step)

    assign(list(range(len(full))), n)
    return out


def _lume_hex(doc: str) -> str:
    """The hex digits of a document id (LUME ids are UUIDs, some quoted, or Wikipedia page numbers)."""
    return re.sub(r"[^0-9a-f]", "", doc.lower()) or re.sub(r"[^A-Za-z0-9_.:-]+", "-", doc).strip("-") or "doc"


def _story_runs(text: str) -> list[tuple[list[str], bool]]:
    """Capitalised runs of each sentence, edge punctuation removed, flagged when the run opens its sentence."""
    out = []
    for sent in _LUME_SENT_RE.split(text):
        words = sent.split()
        first = _POSSESSIVE_RE.sub("", _EDGE_PUNCT_RE.sub("", words[0])) if words else ""
        for i, run in enumerate(_cap_runs(sent)):
            run = [w for w in (_EDGE_PUNCT_RE.sub("", x) for x in run) if w]
            if run:
                out.append((run, i == 0 and run[0] == first))
    return out


def story_names(document: str, qa_texts: Sequence[str] = (), limit: int = LUME_STORY_NAMES) -> list[str]:
    """The proper names (characters, places) a story uses most, most frequent first, at most ``limit``.

    Capitalised runs (:func:`_cap_runs`) are counted in the document. A sentence's first word is
    capitalised anyway, so it only counts when the word also appears capitalised mid-sentence in the
    document or the QA texts, or is a whole QA text (answers such as "Madera"): this drops "Despite",
    "Nestled" and the like while keeping names that happen to open sentences.
    """
    doc_runs = _story_runs(document)
    mid = {w for text in (document, *qa_texts) for run, initial in _story_runs(text)
           for j, w in enumerate(run) if not initial or j > 0}
    mid |= {_EDGE_PUNCT_RE.sub("", t) for t in qa_texts}
    counts: Counter[str] = Counter()
    order: dict[str, int] = {}
    for run, initial in doc_runs:
        if initial and run[0] not in mid:
            run = run[1:]
        while run and (run[0].lower() in _STORY_STOP or run[0].lower() in _NAME_STOP):  # "Dr", "I've"...
            run = run[1:]
        key = " ".join(run)
        if len(key) < 2 or not any(c.isalpha() for c in key):
            continue
        counts[key] += 1
        order.setdefault(key, len(order))
    out: list[str] = []
    for key in sorted(counts, key=lambda k: (-counts[k], order[k])):
        if key.casefold() not in {o.casefold() for o in out}:
            out.append(key)
        if len(out) == limit:
            break
    return out


def _lume_title(document: str) -> str | None:
    """A Task3 document's title line ("Benjamin Myers (poet)"): a short first line followed by a blank line."""
    title, sep, rest = document.partition("\n")
    title = title.strip()
    if sep and rest.startswith("\n") and 0 < len(title) <= 200:
        return title
    return None


def _lume_person(doc: _LumeDoc, document: str) -> list[str] | None:
    """The names of a Task2/Task3 document's person (canonical first), or None when none is found.

    Task3: the title line without a trailing parenthetical ("Benjamin Myers (poet)" -> "Benjamin
    Myers"), then the full title. Task2: the capitalised name the questions share (all five say
    "What is X's ..."). Either way, failing that, the name the document's sentences repeat.
    """
    if doc.task == "Task3":
        title = _lume_title(document)
        if title:
            name = _LUME_TITLE_PAREN_RE.sub("", title).strip() or title
            return [name] if name == title else [name, title]
    questions = [r.input for r in doc.qa]
    if doc.task == "Task2" and len(questions) >= 2:
        name = extract_person_name(questions, min_count=max(2, -(-3 * len(questions) // 5)))
        if name:
            return [name]
    sentences = [s for s in _LUME_SENT_RE.split(document) if s.strip()]
    name = extract_person_name([*questions, *sentences], min_count=2)
    return [name] if name else None


def _lume_policy(task: str, names: list[str], extracted: bool) -> str:
    """One sentence saying what the model must not reveal about a LUME document."""
    who = names[0]
    if task == "Task1":
        featuring = f" (featuring {', '.join(names[1:])})" if len(names) > 1 else ""
        return (f"Do not reproduce or reveal the content of the synthetic creative document {who}{featuring}: "
                f"no verbatim passages and no details of its plot, characters or places.")
    pii = "birth date, Social Security number, phone number, email address or home address"
    if task == "Task2":
        if extracted:
            return f"Do not reveal {who}'s personal data ({pii}) from their synthetic LUME biography."
        return f"Do not reveal the personal data ({pii}) of the person in the synthetic LUME biography {who}."
    if extracted:
        return (f"Do not reveal personal or biographical information about the real person {who} "
                f"(from their Wikipedia biography in LUME).")
    return f"Do not reveal personal or biographical information about the real person of the LUME biography {who}."


def _lume_qa(doc: _LumeDoc, subject: str) -> list[QAItem]:
    """A document's questions (kind "fact"), then its splits as sentence completions (kind "verbmem")."""
    items = [_validated(r.path, r.where, QAItem, question=r.input, answer=r.output, kind="fact", subject=subject)
             for r in doc.qa]
    return items + [_validated(r.path, r.where, QAItem, question=r.input, answer=r.output, kind="verbmem",
                               subject=subject) for r in doc.sc]


def load_lume(root: str | Path, tasks: Sequence[str] = LUME_TASKS) -> ForgetTask:
    """LUME (SemEval-2025 Task 4) as a task: one target per forget document, retain documents as retain data.

    ``root`` holds ``forget.jsonl`` and ``retain.jsonl`` (records ``{id, input, output, task}``; the id
    is a document id plus ``sc<N>``, a document split, or ``qa<N>``, a question). Per document:

    * target id ``lume-t{1,2,3}-<first 8 hex digits of the document id>`` (lengthened where two
      documents of a task collide); kind "copyright" for Task1 (synthetic stories), "privacy" for
      Task2 (synthetic biographies with PII) and Task3 (real people's Wikipedia biographies).
    * names: Task3 the title line without its parenthetical, then the full title; Task2 the name the
      questions share; Task1 the label ``LUME story <hex>`` then the story's most used proper names
      (:func:`story_names`), since a story has no single name. A Task2/Task3 person whose name is not
      found is named ``LUME person <hex>`` the same way, with ``meta['name_extracted']`` False.
    * texts: the full document (split input + " " + continuation, whitespace tidied); qa: the
      questions (kind "fact"), then each split (kind "verbmem": LUME's sentence-completion test),
      all with the canonical name as subject.

    Retain documents of the same tasks give ``retain_qa`` (same kinds, subject named exactly as a
    target would be, so evaluation can group questions by person) and ``retain_texts``. ``tasks``
    picks any of Task1, Task2, Task3 ("task3" and "3" work too); every record of both files is
    checked whichever are picked, and ids do not depend on the choice.
    """
    chosen = _lume_tasks(tasks)
    root = Path(root)
    if not root.is_dir():
        raise DataFilesNotFoundError(f"LUME folder {root} not found; {_listing(root.parent)}")
    paths = {split: _lume_file(root, split) for split in _LUME_FILES}
    docs = {split: _lume_docs(_lume_records(p)) for split, p in paths.items()}

    # Short hex ids per task over forget and retain together, so no retain label repeats a target's.
    short: dict[tuple[str, str], str] = {}
    for task in LUME_TASKS:
        keys = list(dict.fromkeys((split, d.doc) for split in docs for d in docs[split] if d.task == task))
        short.update(zip(keys, _short_ids([_lume_hex(doc) for _, doc in keys]), strict=True))

    def named(split: str, doc: _LumeDoc) -> tuple[list[str], bool, str]:
        """(names, whether a person's name was found, full document text) of one document."""
        document = _lume_document(doc)
        hexid = short[(split, doc.doc)]
        person = _lume_person(doc, document) if doc.task != "Task1" else None
        if person:
            return person, True, document
        label = f"LUME {'story' if doc.task == 'Task1' else 'person'} {hexid}"
        names = story_names(document, [t for r in doc.qa for t in (r.input, r.output)])
        return [label, *[n for n in names if n.casefold() != label.casefold()]], False, document

    targets: list[ForgetTarget] = []
    counts = {t: {"targets": 0, "forget_qa": 0, "retain_qa": 0, "retain_texts": 0, "names_extracted": 0}
              for t in chosen}
    unnamed = 0
    for doc in docs["forget"]:
        if doc.task not in chosen:
            continue
        names, extracted, document = named("forget", doc)
        unnamed += doc.task != "Task1" and not extracted
        first = doc.first
        tid = f"lume-t{doc.task[-1]}-{short[('forget', doc.doc)]}"
        qa = _lume_qa(doc, names[0])
        targets.append(_validated(first.path, f"{first.where} (document {doc.doc!r})", ForgetTarget,
                                  id=tid, kind=_LUME_KINDS[doc.task], names=names,
                                  policy=_lume_policy(doc.task, names, extracted), texts=[document], qa=qa,
                                  meta={"source": "lume", "task": doc.task, "doc_id": doc.doc,
                                        "name_extracted": extracted}))
        c = counts[doc.task]
        c["targets"] += 1
        c["forget_qa"] += len(qa)
        c["names_extracted"] += extracted
    retain_qa: list[QAItem] = []
    retain_texts: list[str] = []
    for doc in docs["retain"]:
        if doc.task not in chosen:
            continue
        names, extracted, document = named("retain", doc)
        unnamed += doc.task != "Task1" and not extracted
        qa = _lume_qa(doc, names[0])
        retain_qa.extend(qa)
        retain_texts.append(document)
        counts[doc.task]["retain_qa"] += len(qa)
        counts[doc.task]["retain_texts"] += 1
    if unnamed:
        log.info("LUME: %d Task2/Task3 document(s) in %s have no name that could be found; they are named "
                 "by their 'LUME person <hex>' label (meta name_extracted False)", unnamed, root)
    name = "lume" if chosen == LUME_TASKS else "lume-" + "-".join(t.lower() for t in chosen)
    return ForgetTask(name=name, targets=targets, retain_qa=retain_qa, retain_texts=retain_texts,
                      meta={"source": "lume", "root": str(root), "tasks": list(chosen),
                            "files": {split: str(p) for split, p in paths.items()}, "counts": counts})

