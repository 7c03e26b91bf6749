"""WMDP and MMLU: one hazard target per WMDP domain holding its MCQ; MMLU subjects as retain MCQ."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from pathlib import Path

from core.schema import ForgetTarget, ForgetTask, MCQItem, SchemaError
from eval.tasks.records import (
    _RECORD_SUFFIXES,
    DataFilesNotFoundError,
    _answer_index,
    _listing,
    _obj,
    _str,
    _str_list,
    _validated,
    read_records,
)

log = logging.getLogger(__name__)

WMDP_DOMAINS: tuple[str, ...] = ("bio", "chem", "cyber")
_WMDP_NAMES: dict[str, list[str]] = {
    "bio": ["hazardous biology knowledge (WMDP-Bio)", "bioweapons", "biosecurity hazards",
            "enhanced potential pandemic pathogens"],
    "chem": ["hazardous chemistry knowledge (WMDP-Chem)", "chemical weapons", "chemical security hazards"],
    "cyber": ["hazardous cybersecurity knowledge (WMDP-Cyber)", "offensive cyber operations", "cyberweapons",
              "exploit development"],
}
_WMDP_POLICY: dict[str, str] = {
    "bio": "Do not provide knowledge that would help develop, enhance or deploy biological weapons or "
           "dangerous pathogens (WMDP-Bio hazard area).",
    "chem": "Do not provide knowledge that would help synthesise, acquire or deploy chemical weapons "
            "(WMDP-Chem hazard area).",
    "cyber": "Do not provide knowledge that would help develop or carry out cyberattacks, exploits or "
             "malware (WMDP-Cyber hazard area).",
}
# MMLU subjects closest to each WMDP domain (the WMDP paper's auxiliary utility sets, plus chemistry).
WMDP_RELATED_MMLU: dict[str, tuple[str, ...]] = {
    "bio": ("college_biology", "virology"),
    "chem": ("college_chemistry", "high_school_chemistry"),
    "cyber": ("college_computer_science", "computer_security"),
}


def _path_tokens(path: Path, base: Path) -> set[str]:
    """Lowercase alphanumeric tokens of a path relative to ``base`` ("wmdp-bio/test.parquet" -> wmdp, bio, ...)."""
    rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
    return set(re.split(r"[^a-z0-9]+", str(rel).lower())) - {""}


def _domain_of(path: Path, base: Path, domains: Sequence[str]) -> str | None:
    """Which WMDP domain a file belongs to, from its path tokens."""
    hits = [d for d in domains if d in _path_tokens(path, base)]
    return hits[0] if len(hits) == 1 else None


def _wmdp_files(paths: str | Path | Sequence[str | Path], domains: Sequence[str]) -> dict[str, list[Path]]:
    """Map each requested domain to its file(s): discovered in a folder or given explicitly."""
    given = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    found: dict[str, list[Path]] = {d: [] for d in domains}
    for g in given:
        if g.is_dir():
            files = sorted(p for p in list(g.glob("*")) + list(g.glob("*/*"))
                           if p.is_file() and p.suffix in _RECORD_SUFFIXES)
            by_domain: dict[str, list[Path]] = {d: [] for d in domains}
            for f in files:
                d = _domain_of(f, g, domains)
                if d:
                    by_domain[d].append(f)
            for d, fs in by_domain.items():
                # One format per domain: prefer JSON, then JSONL, then parquet (shards of one format concatenate).
                for suffix in _RECORD_SUFFIXES:
                    pick = [f for f in fs if f.suffix == suffix]
                    if pick:
                        found[d].extend(pick)
                        break
        elif g.is_file():
            d = _domain_of(g, g.parent, WMDP_DOMAINS)
            if d is None:
                raise ValueError(f"{g}: cannot tell the WMDP domain from the file name; name it after one of "
                                 f"{', '.join(WMDP_DOMAINS)} (e.g. bio-questions.json)")
            if d in found:
                found[d].append(g)
        else:
            raise DataFilesNotFoundError(f"WMDP path {g} not found; {_listing(g.parent)}")
    missing = [d for d, fs in found.items() if not fs]
    if missing:
        where = "; ".join(_listing(g) if g.is_dir() else str(g) for g in given)
        raise DataFilesNotFoundError(f"no WMDP file for domain(s) {', '.join(missing)} "
                                     f"(expected e.g. {missing[0]}-questions.json); {where}")
    return found


def _mcq_file(path: Path, subject: str | None) -> list[MCQItem]:
    """MCQ records ``{question, choices, answer}`` of one JSON/JSONL/parquet file."""
    out = []
    for where, rec in read_records(path):
        rec = _obj(path, where, rec)
        q = _str(path, where, rec, "question")
        choices = _str_list(path, where, rec, "choices")
        if len(choices) < 2:
            raise SchemaError(f"{path}: {where}: field choices: expected at least 2 choices, got {len(choices)}")
        out.append(_validated(path, where, MCQItem, question=q, choices=choices,
                              answer=_answer_index(path, where, rec, len(choices)), subject=subject))
    return out


def load_wmdp(paths: str | Path | Sequence[str | Path], domains: Sequence[str] = WMDP_DOMAINS,
              mmlu_root: str | Path | None = None, mmlu_subjects: Sequence[str] | None = None) -> ForgetTask:
    """WMDP as a task: one hazard target per domain holding its MCQ; optional MMLU subjects as retain_mcq.

    ``paths`` is a folder (files are found by domain name: ``bio-questions.json``,
    ``wmdp-bio.jsonl``, ``wmdp-bio/test-*.parquet``...) or explicit files. MCQ subjects are lm-eval's
    ("biology", "chemistry", "computer security"). With ``mmlu_root``, ``mmlu_subjects`` (default:
    the subjects related to the chosen domains, :data:`WMDP_RELATED_MMLU`) become ``retain_mcq``.
    """
    from eval.metrics.mcq import WMDP_SUBJECTS

    domains = list(dict.fromkeys(domains))
    bad = [d for d in domains if d not in WMDP_DOMAINS]
    if bad or not domains:
        raise ValueError(f"unknown WMDP domain(s) {bad}; accepted: {', '.join(WMDP_DOMAINS)}")
    files = _wmdp_files(paths, domains)
    targets = []
    for d in domains:
        mcq = [it for f in files[d] for it in _mcq_file(f, WMDP_SUBJECTS[d])]
        targets.append(ForgetTarget(id=f"wmdp-{d}", kind="hazard", names=_WMDP_NAMES[d], policy=_WMDP_POLICY[d],
                                    mcq=mcq, meta={"source": "wmdp", "domain": d,
                                                   "files": [str(f) for f in files[d]]}))
    retain_mcq: list[MCQItem] = []
    subjects: list[str] = []
    if mmlu_root is not None:
        if mmlu_subjects is not None:
            subjects = list(mmlu_subjects)
        else:  # the related subjects that are present (a partial MMLU copy is fine here)
            related = [s for d in domains for s in WMDP_RELATED_MMLU[d]]
            available = set(mmlu_subjects_in(mmlu_root))
            subjects = [s for s in related if s in available]
            if len(subjects) < len(related):
                log.warning("MMLU at %s lacks related subject(s) %s", mmlu_root,
                            [s for s in related if s not in available])
        retain_mcq = load_mmlu(mmlu_root, subjects=subjects)
    return ForgetTask(name="wmdp-" + "-".join(domains), targets=targets, retain_mcq=retain_mcq,
                      meta={"source": "wmdp", "domains": domains, "mmlu_subjects": subjects,
                            "counts": {t.id: len(t.mcq) for t in targets}})


_MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def mmlu_subjects_in(root: str | Path, split: str = "test") -> list[str]:
    """The MMLU subjects available under ``root`` for a split (from ``{subject}_{split}.csv`` names)."""
    folder = _mmlu_folder(Path(root), split)
    return sorted(p.name[: -len(f"_{split}.csv")] for p in folder.glob(f"*_{split}.csv"))


def _mmlu_folder(root: Path, split: str) -> Path:
    """``root/split`` when it exists, else ``root`` itself."""
    if (root / split).is_dir():
        return root / split
    if root.is_dir():
        return root
    raise DataFilesNotFoundError(f"MMLU folder {root} not found; {_listing(root.parent)}")


def load_mmlu(root: str | Path, subjects: Sequence[str] | None = None, split: str = "test",
              limit_per_subject: int | None = None) -> list[MCQItem]:
    """MMLU questions as MCQ items (subject "college biology" etc., as lm-eval phrases it) for utility checks.

    Reads ``{root}/{split}/{subject}_{split}.csv`` (or ``{root}/{subject}_{split}.csv``), either with
    the header ``question,choice0..3,answer`` (answer 0-3) or headerless as in the original release
    (answer a letter).
    """
    root = Path(root)
    folder = _mmlu_folder(root, split)
    available = mmlu_subjects_in(root, split)
    chosen = list(subjects) if subjects is not None else available
    missing = [s for s in chosen if s not in available]
    if missing:
        raise DataFilesNotFoundError(f"MMLU subject(s) {missing} have no {split} file in {folder}; "
                                     f"available: {', '.join(available) or '(none)'}")
    out: list[MCQItem] = []
    for subj in chosen:
        path = folder / f"{subj}_{split}.csv"
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        start = 1 if rows and [c.strip().lower() for c in rows[0]] == _MMLU_HEADER else 0
        items = []
        for i, row in enumerate(rows[start:], start=start + 1):
            where = f"record at row {i}"
            if len(row) != 6:
                raise SchemaError(f"{path}: {where}: expected 6 columns (question, 4 choices, answer), got {len(row)}")
            rec = {"question": row[0], "choices": row[1:5], "answer": row[5]}
            q = _str(path, where, rec, "question")
            items.append(_validated(path, where, MCQItem, question=q, choices=row[1:5],
                                    answer=_answer_index(path, where, rec, 4), subject=subj.replace("_", " ")))
            if limit_per_subject is not None and len(items) >= limit_per_subject:
                break
        out.extend(items)
    return out

