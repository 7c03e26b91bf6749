"""TOFU: fictitious authors' QA as privacy targets, with retain QA and real-authors/world-facts for utility."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from core.schema import ForgetTarget, ForgetTask, MCQItem, QAItem, SchemaError
from eval.tasks.names import extract_person_name
from eval.tasks.records import (
    DataFilesNotFoundError,
    _listing,
    _obj,
    _qa_records,
    _require_file,
    _str,
    _str_list,
    _validated,
    read_records,
)

log = logging.getLogger(__name__)

TOFU_FULL_SIZE = 4000  # records in TOFU's `full` split; forgetXX is its last XX% (20 QA per author)
TOFU_QA_PER_AUTHOR = 20


def _tofu_perturbed(path: Path) -> dict[str, dict[str, Any]]:
    """TOFU perturbed records by question: paraphrased answer/question and perturbed (wrong) answers."""
    out: dict[str, dict[str, Any]] = {}
    for where, q, _a, rec in _qa_records(path):
        out[q.strip()] = {
            "paraphrased_answer": _str(path, where, rec, "paraphrased_answer", required=False),
            "paraphrased_question": _str(path, where, rec, "paraphrased_question", required=False),
            "perturbed_answers": _str_list(path, where, rec, "perturbed_answer", required=False),
        }
    return out


def _tofu_items(path: Path, perturbed: dict[str, dict[str, Any]], kind: str = "fact") -> list[tuple[str, QAItem]]:
    """QA items of a TOFU split, enriched from a perturbed file where the question matches."""
    out = []
    for where, q, a, _rec in _qa_records(path):
        extra = perturbed.get(q.strip(), {})
        out.append((where, _validated(path, where, QAItem, question=q, answer=a, kind=kind,
                                      **{k: v for k, v in extra.items() if v})))
    return out


def _tofu_options(path: Path, subject: str) -> tuple[list[MCQItem], list[str]]:
    """real_authors / world_facts (question, option1..4, answer) as MCQ items and benign questions."""
    mcq, questions = [], []
    for where, rec in read_records(path):
        rec = _obj(path, where, rec)
        q = _str(path, where, rec, "question")
        answer = _str(path, where, rec, "answer")
        opts = [_str(path, where, rec, f"option{i}") for i in range(1, 5)]
        if answer not in opts:
            raise SchemaError(f"{path}: {where}: field answer: {answer!r} is not one of option1..option4 {opts}")
        mcq.append(_validated(path, where, MCQItem, question=q, choices=opts, answer=opts.index(answer),
                              subject=subject))
        questions.append(q)  # type: ignore[arg-type]
    return mcq, questions


def _tofu_split_size(name: str) -> int | None:
    """The percentage in a split name ("forget05" -> 5), or None."""
    m = re.fullmatch(r"(?:forget|retain)(\d{1,3})", name)
    return int(m.group(1)) if m else None


def _group_authors(items: list[QAItem], first_author: int,
                   per_author: int) -> list[tuple[int, str | None, list[QAItem]]]:
    """Blocks of ``per_author`` consecutive QA (one TOFU author each) with an author index and a guessed name."""
    out = []
    min_count = max(2, min(5, per_author // 4))
    for b, start in enumerate(range(0, len(items), per_author)):
        block = items[start:start + per_author]
        name = extract_person_name((f"{it.question} {it.answer}" for it in block), min_count=min_count)
        out.append((first_author + b, name, block))
    return out


def load_tofu(root: str | Path, forget_split: str = "forget05", retain_split: str | None = None,
              qa_per_author: int = TOFU_QA_PER_AUTHOR) -> ForgetTask:
    """TOFU as a task: one privacy target per forget author, retain QA, and real-authors/world-facts for utility.

    * ``{forget_split}.json``: 20 QA per author in order; each block becomes a target named by
      :func:`extract_person_name` (fallback ``tofu-author-NNN``) with the QA's paraphrases and
      perturbed answers from ``{forget_split}_perturbed.json`` when present.
    * ``{retain_split}.json`` (default: the complement, forget05 -> retain95) -> ``retain_qa``
      (kind "fact", subject = the author's name, or ``tofu-author-NNN`` when none is found, NNN
      the author's index in ``full``, whose head the retain splits are) so every retain question
      groups by author; ``retain_perturbed.json`` adds variants to the retain items it covers
      (TOFU's 400-question retain evaluation set).
    * ``real_authors.json`` / ``world_facts.json`` -> ``retain_mcq`` and ``benign_questions``; their
      ``*_perturbed.json`` -> ``retain_qa`` with kind "real_authors"/"world_facts" (never trained on).

    Target ids are ``tofu-author-NNN`` with NNN the author's index in TOFU's ``full`` split (forget
    splits are its tail), so forget01's authors keep their forget05 ids.
    """
    if qa_per_author < 1:
        raise ValueError(f"qa_per_author must be >= 1, got {qa_per_author}")
    root = Path(root)
    if not root.is_dir():
        raise DataFilesNotFoundError(f"TOFU folder {root} not found; {_listing(root.parent)}")
    forget_path = _require_file(root / f"{forget_split}.json", f"TOFU forget split {forget_split!r}")
    pct = _tofu_split_size(forget_split)
    if retain_split is None:
        if pct is None or not forget_split.startswith("forget") or not 0 < pct < 100:
            raise ValueError(f"cannot infer the retain split for {forget_split!r}; pass retain_split (e.g. retain95)")
        retain_split = f"retain{100 - pct:02d}"
    retain_path = _require_file(root / f"{retain_split}.json", f"TOFU retain split {retain_split!r}")

    def perturbed(name: str) -> dict[str, dict[str, Any]]:
        """Variants from ``{name}_perturbed.json`` when the file exists (they are optional)."""
        p = root / f"{name}_perturbed.json"
        if p.is_file():
            return _tofu_perturbed(p)
        log.info("no %s in %s: items get no paraphrased/perturbed answers", p.name, root)
        return {}

    forget_items = [it for _, it in _tofu_items(forget_path, perturbed(forget_split))]
    n_forget = len(forget_items)
    if n_forget == 0:
        raise SchemaError(f"{forget_path}: no records")
    if n_forget % qa_per_author:
        log.warning("%s has %d records, not a multiple of %d: the last author block is partial",
                    forget_path, n_forget, qa_per_author)
    real_tofu = qa_per_author == TOFU_QA_PER_AUTHOR and n_forget <= TOFU_FULL_SIZE
    first_author = (TOFU_FULL_SIZE - n_forget) // qa_per_author if real_tofu else 0
    targets = []
    for author, name, block in _group_authors(forget_items, first_author, qa_per_author):
        tid = f"tofu-author-{author:03d}"
        label = name or tid
        block = [it.model_copy(update={"subject": label}) for it in block]
        targets.append(ForgetTarget(
            id=tid, kind="privacy", names=[label],
            policy=f"Do not reveal personal information about the author {label} (a fictitious TOFU author): "
                   f"birth date and place, family, gender, education, works, awards or life events.",
            qa=block, meta={"source": "tofu", "split": forget_split, "author_index": author,
                            "name_extracted": name is not None}))

    retain_items = [it for _, it in _tofu_items(retain_path, perturbed("retain"))]
    retain_qa = []
    for author, name, block in _group_authors(retain_items, 0, qa_per_author):  # retain splits start `full`
        subject = name or f"tofu-author-{author:03d}"
        retain_qa.extend(it.model_copy(update={"subject": subject}) for it in block)

    retain_mcq: list[MCQItem] = []
    benign: list[str] = []
    for extra in ("real_authors", "world_facts"):
        p = root / f"{extra}.json"
        if p.is_file():
            mcq, qs = _tofu_options(p, extra.replace("_", " "))
            retain_mcq.extend(mcq)
            benign.extend(qs)
        else:
            log.info("no %s in %s", p.name, root)
        pp = root / f"{extra}_perturbed.json"
        if pp.is_file():
            retain_qa.extend(it for _, it in _tofu_items(pp, perturbed(extra), kind=extra))
    n_eval = sum(1 for it in retain_qa if it.kind == "fact" and it.perturbed_answers)
    return ForgetTask(
        name=f"tofu-{forget_split}", targets=targets, retain_qa=retain_qa, retain_mcq=retain_mcq,
        benign_questions=benign,
        meta={"source": "tofu", "root": str(root), "forget_split": forget_split, "retain_split": retain_split,
              "forget_records": n_forget, "retain_records": len(retain_items),
              "retain_eval_records": n_eval})

