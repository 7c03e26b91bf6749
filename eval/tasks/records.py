"""Reading and checking the records of public benchmark files (JSON array, JSON Lines, parquet); the loaders' errors.

``<data>`` is ``$UNLEARN_GUARD_DATA`` or ``../shared/data`` relative to the working directory.
Malformed records raise :class:`core.schema.SchemaError` naming the file, the record and the field;
missing files raise :class:`DataFilesNotFoundError` listing the files that are there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.schema import SchemaError

DATA_ENV = "UNLEARN_GUARD_DATA"
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

