"""Task specs: one entry point, :func:`load_task_spec`, turns a short spec string into a task::

    offline                       our generated benchmark (eval.tasks.offline), default config
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
Malformed records and missing files raise the errors of :mod:`eval.tasks.records`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import ValidationError

from core.registry import Registry
from core.schema import ForgetTask, load_task
from eval.tasks.lume import LUME_TASKS, load_lume
from eval.tasks.muse import MUSE_CORPORA, load_muse
from eval.tasks.records import DATA_ENV, DataFilesNotFoundError, TaskSpecError, _listing, default_data_root
from eval.tasks.tofu import TOFU_QA_PER_AUTHOR, load_tofu
from eval.tasks.wmdp import WMDP_DOMAINS, load_wmdp, mmlu_subjects_in

log = logging.getLogger(__name__)

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
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark

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
