"""Loaders from public unlearning benchmarks (TOFU, WMDP, MMLU, MUSE, LUME) into our :class:`ForgetTask` schema.

One entry point, :func:`load_task_spec`, turns a short spec string into a task::

    offline                       our generated benchmark (eval.benchmark), default config
    offline:seed=3,num_people=30  ... with BenchmarkConfig fields
    tofu:forget05                 TOFU from <data>/tofu (retain split: the complement, retain95)
    tofu:forget01,retain_split=retain99@/path/to/tofu
    wmdp:bio,chem@/path/to/wmdp   WMDP domains (+ related MMLU subjects as retain_mcq, see mmlu=)
    muse:news@/path/to/muse       MUSE news or books
    lume                          LUME (SemEval-2025 Task 4) from <data>/lume: all three tasks
    lume:task3                    ... one task: task1 stories, task2 synthetic PII, task3 real biographies
    lume:task2,task3@/path/to/lume
    path/to/task.json[l]          a task file written by core.schema.save_task

``<data>`` is ``$UNLEARN_GUARD_DATA`` or ``../shared/data`` relative to the working directory.
Malformed records raise :class:`core.schema.SchemaError` naming the file, the record and the field;
missing files raise :class:`DataFilesNotFoundError` listing the files that are there.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from core.registry import Registry
from core.schema import ForgetTarget, ForgetTask, MCQItem, QAItem, SchemaError, load_task

log = logging.getLogger(__name__)

DATA_ENV = "UNLEARN_GUARD_DATA"
TOFU_FULL_SIZE = 4000  # records in TOFU's `full` split; forgetXX is its last XX% (20 QA per author)
TOFU_QA_PER_AUTHOR = 20
WMDP_DOMAINS: tuple[str, ...] = ("bio", "chem", "cyber")
MUSE_CORPORA: tuple[str, ...] = ("news", "books")
_RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")


class DataFilesNotFoundError(FileNotFoundError):
    """A benchmark file or folder is missing; the message lists what the folder does contain."""


class MissingDependencyError(ImportError):
    """An optional dependency is needed for this file type; the message names the pip extra."""


class TaskSpecError(ValueError):
    """A task spec string could not be parsed; the message lists the accepted forms."""


def default_data_root() -> Path:
    """Where public benchmark data lives: ``$UNLEARN_GUARD_DATA`` or ``../shared/data`` from the cwd."""
    return Path(os.environ.get(DATA_ENV) or Path("..") / "shared" / "data")


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------

def _listing(folder: Path) -> str:
    """A short listing of a folder for error messages."""
    if not folder.is_dir():
        return f"{folder} does not exist or is not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} entries)" if len(names) > 40 else "")
    return f"files in {folder}: {shown or '(empty)'}"


def _require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise an error listing its folder's contents."""
    if not path.is_file():
        raise DataFilesNotFoundError(f"{what}: {path} not found; {_listing(path.parent)}")
    return path


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    """Rows of a parquet file as (label, dict), importing pyarrow only now."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MissingDependencyError(
            f"{path}: reading parquet needs pyarrow, which is not installed; "
            f"install the extra with `pip install unlearn-guard[parquet]` (or `pip install pyarrow`)") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SchemaError(f"{path}: not a readable parquet file: {e}") from e
    return [(f"record {i}", row) for i, row in enumerate(rows)]


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """Records of a JSON array, JSON Lines (whatever the suffix) or parquet file, each labelled for errors."""
    path = Path(path)
    _require_file(path, "data file")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        return [(f"record {i}", obj) for i, obj in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"record at line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: record at line {lineno}: invalid JSON: {e.msg} "
                              f"(expected a JSON array or JSON Lines, one object per line)") from e
    return out


def _obj(path: Path, where: str, rec: Any) -> dict[str, Any]:
    """The record as a dict, or an error naming it."""
    if not isinstance(rec, dict):
        raise SchemaError(f"{path}: {where}: expected an object, got {type(rec).__name__}")
    return rec


def _str(path: Path, where: str, rec: dict[str, Any], field: str, required: bool = True) -> str | None:
    """A non-empty string field (or None when optional and absent)."""
    v = rec.get(field)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        got = "missing" if field not in rec else f"{type(v).__name__} {v!r}"[:80]
        raise SchemaError(f"{path}: {where}: field {field}: expected a non-empty string, got {got}")
    return v


def _str_list(path: Path, where: str, rec: dict[str, Any], field: str, required: bool = True) -> list[str]:
    """A list-of-strings field (empty when optional and absent)."""
    v = rec.get(field)
    if v is None and not required:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        got = "missing" if field not in rec else type(v).__name__
        raise SchemaError(f"{path}: {where}: field {field}: expected a list of strings, got {got}")
    return list(v)


def _answer_index(path: Path, where: str, rec: dict[str, Any], n_choices: int) -> int:
    """An MCQ answer as a 0-based index: an int, a digit string or a letter A, B, C..."""
    v = rec.get("answer")
    if isinstance(v, bool):
        v = None
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    elif isinstance(v, str) and len(v.strip()) == 1 and v.strip().upper().isalpha():
        v = ord(v.strip().upper()) - ord("A")
    if not isinstance(v, int) or not 0 <= v < n_choices:
        raise SchemaError(f"{path}: {where}: field answer: expected an index 0..{n_choices - 1} "
                          f"(or a letter), got {rec.get('answer')!r}")
    return v


def _validated(path: Path, where: str, cls: Any, **data: Any) -> Any:
    """Build a schema item, turning a validation error into one naming file, record and field."""
    try:
        return cls(**data)
    except ValidationError as e:
        parts = [f"field {'.'.join(str(x) for x in err['loc']) or '<record>'}: {err['msg']}" for err in e.errors()]
        raise SchemaError(f"{path}: {where}: " + "; ".join(parts)) from e


def _qa_records(path: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, question, answer, record) for every record of a question/answer file."""
    out = []
    for where, rec in read_records(path):
        rec = _obj(path, where, rec)
        out.append((where, _str(path, where, rec, "question"), _str(path, where, rec, "answer"), rec))  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------
# TOFU
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# WMDP and MMLU
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# MUSE
# ---------------------------------------------------------------------------------------------

_MUSE_NAMES: dict[str, list[str]] = {
    "news": ["MUSE-News forget articles", "BBC News articles in the MUSE forget set"],
    "books": ["Harry Potter books", "Harry Potter", "Hogwarts"],
}


def _text_list(path: Path) -> list[str]:
    """A JSON list of strings (MUSE privleak), each checked."""
    out = []
    for where, rec in read_records(path):
        if not isinstance(rec, str) or not rec.strip():
            raise SchemaError(f"{path}: {where}: expected a non-empty string, got {type(rec).__name__}")
        out.append(rec)
    return out


def load_muse(root: str | Path, corpus: str = "news") -> ForgetTask:
    """MUSE as a task: one copyright target with knowmem/verbmem QA and privleak texts, plus retain/holdout.

    * ``knowmem/forget_qa.json`` -> target QA (kind "knowmem"); ``knowmem/retain_qa.json`` ->
      ``retain_qa`` (kind "knowmem"); the ``*_icl.json`` in-context examples -> ``meta['knowmem_icl']``.
    * ``verbmem/forget.json`` (prompt, gt) -> target QA (kind "verbmem": question = prompt, answer = gt).
    * ``privleak/forget.json`` -> target texts (the MinK/PrivLeak members); without it the verbmem
      ``prompt + gt`` passages are the texts. ``privleak/retain.json`` -> ``retain_texts``,
      ``privleak/holdout.json`` -> ``holdout_texts``.

    ``root`` is the MUSE folder holding ``news/`` and ``books/``, or the corpus folder itself.
    """
    if corpus not in MUSE_CORPORA:
        raise ValueError(f"unknown MUSE corpus {corpus!r}; accepted: {', '.join(MUSE_CORPORA)}")
    root = Path(root)
    folder = root / corpus if (root / corpus).is_dir() else root if root.name == corpus and root.is_dir() else None
    if folder is None:
        raise DataFilesNotFoundError(f"MUSE corpus folder {root / corpus} not found; {_listing(root)}")
    known = ["knowmem/forget_qa.json", "knowmem/retain_qa.json", "verbmem/forget.json", "privleak/forget.json",
             "privleak/retain.json", "privleak/holdout.json"]
    if not any((folder / k).is_file() for k in known):
        present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        raise DataFilesNotFoundError(f"no MUSE files in {folder} (expected e.g. {', '.join(known)}); "
                                     f"files found: {', '.join(present) or '(none)'}")

    def qa(rel: str, kind: str) -> list[QAItem]:
        """QA items of an optional knowmem file (empty when absent)."""
        p = folder / rel
        if not p.is_file():
            return []
        return [_validated(p, w, QAItem, question=q, answer=a, kind=kind) for w, q, a, _ in _qa_records(p)]

    forget_qa = qa("knowmem/forget_qa.json", "knowmem")
    verb: list[QAItem] = []
    vpath = folder / "verbmem" / "forget.json"
    if vpath.is_file():
        for where, rec in read_records(vpath):
            rec = _obj(vpath, where, rec)
            verb.append(_validated(vpath, where, QAItem, question=_str(vpath, where, rec, "prompt"),
                                   answer=_str(vpath, where, rec, "gt"), kind="verbmem"))

    def texts(rel: str) -> list[str]:
        """Texts of an optional privleak file (empty when absent)."""
        p = folder / "privleak" / rel
        return _text_list(p) if p.is_file() else []

    forget_texts = texts("forget.json")
    texts_source = "privleak/forget.json"
    if not forget_texts and verb:
        forget_texts, texts_source = [f"{v.question}{v.answer}" for v in verb], "verbmem/forget.json"
    icl = {split: [{"question": it.question, "answer": it.answer}
                   for it in qa(f"knowmem/{split}_qa_icl.json", "knowmem")] for split in ("forget", "retain")}
    target = ForgetTarget(
        id=f"muse-{corpus}", kind="copyright", names=_MUSE_NAMES[corpus],
        policy=(f"Do not reproduce or reveal the content of the MUSE {corpus} forget corpus "
                f"({_MUSE_NAMES[corpus][0]}): no verbatim passages and no facts learned from it."),
        texts=forget_texts, qa=forget_qa + verb,
        meta={"source": "muse", "corpus": corpus, "texts_source": texts_source if forget_texts else None,
              "knowmem": len(forget_qa), "verbmem": len(verb)})
    return ForgetTask(name=f"muse-{corpus}", targets=[target], retain_qa=qa("knowmem/retain_qa.json", "knowmem"),
                      retain_texts=texts("retain.json"), holdout_texts=texts("holdout.json"),
                      meta={"source": "muse", "corpus": corpus, "root": str(folder), "knowmem_icl": icl})


# ---------------------------------------------------------------------------------------------
# LUME (SemEval-2025 Task 4)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Task specs
# ---------------------------------------------------------------------------------------------

SourceFn = Callable[[list[str], dict[str, str], Path | None], ForgetTask]
TASK_SOURCES: Registry[SourceFn] = Registry("task source")
SPEC_FORMS: tuple[str, ...] = (
    "offline", "offline:seed=3,num_people=30",
    "tofu", "tofu:forget05", "tofu:forget01,retain_split=retain99@/path/to/tofu",
    "wmdp", "wmdp:bio,chem@/path/to/wmdp", "wmdp:cyber,mmlu=none",
    "muse", "muse:news@/path/to/muse",
    "lume", "lume:task1", "lume:task2", "lume:task3", "lume:task2,task3@/path/to/lume",
    "path/to/task.json", "path/to/task.jsonl",
)


def _spec_help() -> str:
    """The accepted spec forms, for error messages."""
    return ("accepted forms: " + ", ".join(SPEC_FORMS)
            + f" (data root: ${DATA_ENV} or ../shared/data; sources: {', '.join(TASK_SOURCES.names())})")


def _reject(source: str, kind: str, extra: Iterable[str], accepted: str) -> None:
    """Raise a spec error for unexpected positional args or options."""
    extra = list(extra)
    if extra:
        raise TaskSpecError(f"{source}: unexpected {kind} {extra}; {accepted}")


@TASK_SOURCES.register("offline")
def _offline_source(args: list[str], opts: dict[str, str], path: Path | None) -> ForgetTask:
    """``offline[:field=value,...]``: the generated benchmark with BenchmarkConfig overrides."""
    from eval.benchmark import BenchmarkConfig, generate_benchmark

    fields = sorted(BenchmarkConfig.model_fields)
    _reject("offline", "arguments", args, f"use key=value with fields {fields}")
    _reject("offline", "options", [k for k in opts if k not in fields], f"fields: {fields}")
    if path is not None:
        raise TaskSpecError("offline: takes no @path (the benchmark is generated)")
    try:
        cfg = BenchmarkConfig(**opts)  # type: ignore[arg-type]  # pydantic converts "3" to 3
    except ValidationError as e:
        raise TaskSpecError(f"offline: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e
    return generate_benchmark(cfg)


@TASK_SOURCES.register("tofu")
def _tofu_source(args: list[str], opts: dict[str, str], path: Path | None) -> ForgetTask:
    """``tofu[:forgetXX][,retain_split=retainYY][,qa_per_author=N][@root]``."""
    if len(args) > 1:
        raise TaskSpecError(f"tofu: one forget split expected (e.g. tofu:forget05), got {args}")
    _reject("tofu", "options", [k for k in opts if k not in ("retain_split", "qa_per_author")],
            "options: retain_split, qa_per_author")
    per = opts.get("qa_per_author", str(TOFU_QA_PER_AUTHOR))
    if not per.isdigit():
        raise TaskSpecError(f"tofu: qa_per_author must be a positive integer, got {per!r}")
    return load_tofu(path or default_data_root() / "tofu", args[0] if args else "forget05", opts.get("retain_split"),
                     qa_per_author=int(per))


@TASK_SOURCES.register("wmdp")
def _wmdp_source(args: list[str], opts: dict[str, str], path: Path | None) -> ForgetTask:
    """``wmdp[:bio,chem,...][,mmlu=related|none|all|subj+subj][@dir]``; MMLU is read from the sibling ``mmlu`` folder."""
    _reject("wmdp", "options", [k for k in opts if k not in ("mmlu", "mmlu_root")], "options: mmlu, mmlu_root")
    root = path or default_data_root() / "wmdp"
    mode = opts.get("mmlu", "related")
    mmlu_root = Path(opts["mmlu_root"]) if "mmlu_root" in opts else root.parent / "mmlu"
    subjects: list[str] | None
    if mode == "none":
        mmlu_root_arg = None
        subjects = None
    else:
        if not mmlu_root.is_dir():
            if "mmlu" in opts or "mmlu_root" in opts:
                raise DataFilesNotFoundError(f"wmdp: MMLU folder {mmlu_root} not found; {_listing(mmlu_root.parent)}")
            log.info("no MMLU folder at %s: the WMDP task has no retain_mcq", mmlu_root)
        mmlu_root_arg = mmlu_root if mmlu_root.is_dir() else None
        subjects = (None if mode == "related" else mmlu_subjects_in(mmlu_root) if mode == "all"
                    else [s for s in mode.split("+") if s])
    return load_wmdp(root, domains=args or list(WMDP_DOMAINS), mmlu_root=mmlu_root_arg, mmlu_subjects=subjects)


@TASK_SOURCES.register("muse")
def _muse_source(args: list[str], opts: dict[str, str], path: Path | None) -> ForgetTask:
    """``muse[:news|books][@root]``."""
    if len(args) > 1:
        raise TaskSpecError(f"muse: one corpus expected ({', '.join(MUSE_CORPORA)}), got {args}")
    _reject("muse", "options", opts, "muse takes no options")
    return load_muse(path or default_data_root() / "muse", args[0] if args else "news")


@TASK_SOURCES.register("lume")
def _lume_source(args: list[str], opts: dict[str, str], path: Path | None) -> ForgetTask:
    """``lume[:task1,task2,task3][@root]``: any of LUME's tasks (default all three)."""
    accepted = "accepted arguments: task1, task2, task3, or several joined by commas (e.g. lume:task2,task3)"
    _reject("lume", "options", [f"{k}={v}" for k, v in opts.items()], f"lume takes no options; {accepted}")
    _reject("lume", "arguments", [a for a in args if a.lower() not in ("task1", "task2", "task3")], accepted)
    return load_lume(path or default_data_root() / "lume", args or LUME_TASKS)


def parse_task_spec(spec: str) -> tuple[str, list[str], dict[str, str], Path | None]:
    """Split ``source[:arg,key=value,...][@path]`` into its source, positional args, options and path."""
    head, _, at = spec.partition("@")
    source, _, rest = head.partition(":")
    args, opts = [], {}
    for part in (p.strip() for p in rest.split(",")) if rest else ():
        if not part:
            raise TaskSpecError(f"task spec {spec!r} has an empty argument; {_spec_help()}")
        if "=" in part:
            k, _, v = part.partition("=")
            if not k.strip():
                raise TaskSpecError(f"task spec {spec!r}: option {part!r} has no name; {_spec_help()}")
            opts[k.strip()] = v.strip()
        else:
            args.append(part)
    if "@" in spec and not at.strip():
        raise TaskSpecError(f"task spec {spec!r} has an empty @path; {_spec_help()}")
    return source.strip(), args, opts, Path(at.strip()).expanduser() if at.strip() else None


def load_task_spec(spec: str) -> ForgetTask:
    """Load a task from a spec string (see the module docstring); unknown specs list the accepted forms."""
    spec = spec.strip()
    if not spec:
        raise TaskSpecError(f"empty task spec; {_spec_help()}")
    source = spec.split("@", 1)[0].split(":", 1)[0].strip()
    if source in TASK_SOURCES:
        name, args, opts, path = parse_task_spec(spec)
        log.info("loading task %s (args=%s, options=%s, path=%s)", name, args, opts, path)
        return TASK_SOURCES.get(name)(args, opts, path)
    if Path(spec).suffix in (".json", ".jsonl"):
        return load_task(spec)
    raise TaskSpecError(f"unknown task spec {spec!r}; {_spec_help()}")
