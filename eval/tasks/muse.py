"""MUSE (news or books): one copyright target with knowmem/verbmem QA and privleak texts, plus retain/holdout."""

from __future__ import annotations

from pathlib import Path

from core.schema import ForgetTarget, ForgetTask, QAItem, SchemaError
from eval.tasks.records import (
    DataFilesNotFoundError,
    _listing,
    _obj,
    _qa_records,
    _str,
    _validated,
    read_records,
)

MUSE_CORPORA: tuple[str, ...] = ("news", "books")
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

