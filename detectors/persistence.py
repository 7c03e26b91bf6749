"""Save and load a detector as a directory, without pickle, atomically, with checksums.

Layout (``FORMAT_VERSION`` 2; version 1 had no description bank)::

    manifest.json          format name and version, sha256 and size of every other file
    config.json            DetectorConfig
    meta.json              encoder name and dimension, entity salt, counters, provenance
    targets.json           per target: id, kind, names, policy, key-phrase and vocabulary hashes
    store.json             per bank: stored texts (negatives; forget texts only with keep_raw_text)
                           and proper-noun hashes; negative subject names; the calibration
                           negatives' texts and groups
    arrays.safetensors     bank metadata (ids, target, group, role, entity features) and the
                           calibration negatives' vectors
    index_<bank>.faiss     one faiss index per bank (faiss.write_index)
    index_<bank>.exact.faiss  only for a bank on the 8-bit IVF: its float vectors, for exact re-ranking
    classifier.safetensors logistic-regression parameters per channel
    classifier.json        feature names and calibration report per channel

The directory is written with ``core.io.atomic_dir`` (every file fsynced, the manifest last, then
swapped into place in one step), so a process killed at any moment of a save leaves the previous or
the new version, never none and never a mix; :func:`read_detector` first calls
``core.io.recover_dir`` for the two-rename fallback of file systems without an atomic exchange.
Saves to one path are serialised within a process (snapshot and write under one lock).

``save_detector(..., plaintext=False)`` writes an embeddings-only directory even from a store that
keeps forget texts (``keep_raw_text=True``): vectors, classifier, salted hashes, names and policy,
but no forget question, answer or text; detection scores are the same after loading.

Loading verifies the manifest, the format version and every file's size and sha256 *before*
parsing anything (faiss must never see a corrupt file), and raises :class:`DetectorFormatError`
naming the file and what was expected.

Generations (so that a served store only moves forward): ``meta.json`` records ``generation`` (an
integer), ``task`` (the name of the ``ForgetTask`` the store was built for, from ``Detector.build``:
the task fingerprint) and ``content_digest`` (sha256 over every other file's checksum and meta's store
fields, so it ignores ``saved_at``). A save writes the detector's generation plus one when its content
differs from what it was loaded as or last saved as (a fresh build saves as 1; an unchanged detector
saved again keeps its number), and never less than the generation already in the destination directory
(one more when that directory holds other content), so every save moves that directory forward; a
copied-in directory keeps the generation it was saved with. ``Detector.load`` puts ``generation`` and
``content_digest`` into ``det.meta``. Directories saved before generations existed load as generation 0.
:func:`read_store_header` reads a directory's generation, task and digests from ``manifest.json`` and
``meta.json`` alone (``meta.json`` checked against the manifest), without loading the detector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from core.io import atomic_dir, atomic_write_bytes, atomic_write_json, path_lock, recover_dir
from detectors.calibration import CalibrationReport
from detectors.classifier import ChannelModel, ClassifierError, LogisticScorer
from detectors.config import DetectorConfig
from detectors.encoder import Encoder
from detectors.features import CHANNELS, FEATURES
from detectors.index import VectorIndex, VectorIndexError, index_options
from detectors.store import (
    BANKS,
    FORGET_BANKS,
    Bank,
    CalibrationSet,
    ForgetStore,
    StoreSnapshot,
    TargetRecord,
    _matcher,
    neg_name_matcher,
)

if TYPE_CHECKING:
    from detectors.detector import Detector

log = logging.getLogger(__name__)

FORMAT_NAME = "unlearn-guard-detector"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
EXACT_SUFFIX = ".exact.faiss"
"""``index_<bank>.exact.faiss``: an ivf-sq8 bank's float vectors (:attr:`VectorIndex.exact_index`), when it has one."""
_BANK_FIELDS = ("ids", "target", "group", "role", "ent")
_DTYPES = {"ids": np.int64, "target": np.int32, "group": np.int64, "role": np.int8, "ent": np.float32}


class DetectorFormatError(ValueError):
    """A detector directory is missing, foreign, corrupt, truncated or from another format version."""

    def __init__(self, file: str | Path, problem: str, expected: str) -> None:
        """Say which file is wrong, how, and what a valid detector directory has there."""
        self.file = Path(file)
        self.problem = problem
        self.expected = expected
        super().__init__(f"{self.file}: {problem}; expected {expected}")


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON (atomic file write inside the atomic directory)."""
    atomic_write_json(path, obj)


# meta.json fields that are part of the store's content (saved_at, counters of time and the generation are not)
_CONTENT_META = ("encoder", "dim", "salt", "next_id", "next_group", "next_num", "keep_raw_text", "task")
_GENERATION_KEYS = ("generation", "content_digest")  # kept in det.meta by load and save, not in meta["detector"]


def _content_digest(file_sums: dict[str, str], meta: dict[str, Any]) -> str:
    """sha256 of a save's content (checksums of every file but meta.json, meta's store fields): equal stores, equal digest."""
    body = {"files": dict(sorted(file_sums.items())), "meta": {k: meta.get(k) for k in _CONTENT_META}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StoreHeader:
    """A detector directory's version, read from manifest.json and meta.json without loading the detector."""

    generation: int  # 0 for directories saved before generations existed
    task: str | None  # name of the forget task the store was built for (None when not recorded)
    content_digest: str | None  # see _content_digest; None for directories saved before generations existed
    manifest_digest: str  # sha256 of manifest.json: changes with every save


def read_store_header(path: str | Path) -> StoreHeader:
    """Read a directory's generation and task cheaply (meta.json verified against the manifest), to decide on a reload."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise DetectorFormatError(mpath, f"cannot be read ({e.strerror or e.__class__.__name__})",
                                  f"a {MANIFEST} written by Detector.save") from e
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetectorFormatError(mpath, f"is not valid JSON ({e})", "the manifest JSON written by Detector.save") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DetectorFormatError(mpath, "is not a detector manifest", f"format {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DetectorFormatError(mpath, f"has format_version {manifest.get('format_version')!r}",
                                  f"format_version {FORMAT_VERSION}")
    files = manifest.get("files")
    info = files.get("meta.json") if isinstance(files, dict) else None
    if not isinstance(info, dict):
        raise DetectorFormatError(mpath, "does not list meta.json", "a sha256 and size per file")
    mfile = path / "meta.json"
    try:
        data = mfile.read_bytes()
    except OSError as e:
        raise DetectorFormatError(mfile, f"cannot be read ({e.strerror or e.__class__.__name__})",
                                  f"a file listed in {MANIFEST}") from e
    if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise DetectorFormatError(mfile, f"does not match {MANIFEST} (incomplete, corrupt or modified)",
                                  f"the size and sha256 recorded in {MANIFEST}")
    try:
        meta = json.loads(data)
        generation = int(meta.get("generation", 0))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        raise DetectorFormatError(mfile, f"is not a valid meta.json ({e})", "the meta.json written by Detector.save") from e
    inner = meta.get("detector") if isinstance(meta.get("detector"), dict) else {}
    task = meta.get("task", inner.get("task"))
    return StoreHeader(generation=generation, task=None if task is None else str(task),
                       content_digest=meta.get("content_digest"), manifest_digest=hashlib.sha256(raw).hexdigest())


def _next_generation(det: Detector, path: Path, digest: str) -> int:
    """The generation a save of content ``digest`` to ``path`` gets: never below the detector's or the directory's."""
    own = det.meta
    gen = int(own.get("generation", 0) or 0)
    if own.get("content_digest") != digest:
        gen += 1  # changed since it was loaded or last saved (or never saved)
    try:
        disk = read_store_header(path) if (path / MANIFEST).is_file() else None
    except DetectorFormatError:
        disk = None  # a damaged directory is replaced; it has no generation to respect
    if disk is not None:
        gen = max(gen, disk.generation if disk.content_digest == digest else disk.generation + 1)
    return gen


def save_detector(det: Detector, path: str | Path, plaintext: bool | None = None) -> Path:
    """Write ``det`` to directory ``path`` atomically (replacing an existing one).

    ``plaintext``: None keeps forget texts exactly when the store keeps them (``keep_raw_text``);
    False writes none (embeddings-only, also for later additions after loading); True is the same as None.
    """
    path = Path(path)
    with path_lock(path):  # the snapshot and its write in one step, so saves land in the order taken
        return _save(det, path, plaintext)


def _save(det: Detector, path: Path, plaintext: bool | None) -> Path:
    """The body of :func:`save_detector` (the caller holds the path's lock)."""
    snap = det.store.snapshot()
    models = det.models
    if set(models) != set(CHANNELS):
        raise ClassifierError("only a fitted detector can be saved; call Detector.fit() first")
    keep_text = snap.keep_raw_text and plaintext is not False
    config = det.config.model_dump(mode="json")
    if not keep_text:
        config["keep_raw_text"] = False

    def texts_of(bank: str) -> list[str | None]:
        texts = list(snap.banks[bank].texts)
        return texts if keep_text or bank not in FORGET_BANKS else [None] * len(texts)

    with atomic_dir(path) as tmp:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "targets.json", [
            {"num": r.num, "id": r.id, "kind": r.kind, "names": list(r.names), "policy": r.policy,
             "phrase_hashes": sorted(r.phrase_hashes), "phrase_starts": sorted(r.phrase_starts), "vocab": {h: sorted(g) for h, g in sorted(r.vocab.items())},
             "question_keys": sorted(r.question_keys), "value_hashes": sorted([n, h] for n, h in r.value_hashes),
             "fact_hashes": sorted([n, h] for n, h in r.fact_hashes),
             "birth_hashes": sorted(r.birth_hashes)}
            for _, r in sorted(snap.targets.items())])
        _write_json(tmp / "store.json", {
            "banks": {b: {"texts": texts_of(b), "caps": [list(c) for c in snap.banks[b].caps]}
                      for b in BANKS},
            "neg_names": list(snap.neg_names),
            "calib": {c: {"texts": list(cs.texts), "groups": list(cs.groups), "clusters": list(cs.clusters)}
                      for c, cs in snap.calib.items()}})
        arrays: dict[str, np.ndarray] = {}
        for b in BANKS:
            bank = snap.banks[b]
            for f in _BANK_FIELDS:
                arrays[f"{b}.{f}"] = np.ascontiguousarray(getattr(bank, f))
            faiss.write_index(bank.index.faiss_index, str(tmp / f"index_{b}.faiss"))
            if bank.index.exact_index is not None:  # ivf-sq8: the float vectors its candidates are re-scored against
                faiss.write_index(bank.index.exact_index, str(tmp / f"index_{b}{EXACT_SUFFIX}"))
        for c, cs in snap.calib.items():
            arrays[f"calib.{c}.vectors"] = np.ascontiguousarray(cs.vectors, dtype=np.float32)
        atomic_write_bytes(tmp / "arrays.safetensors", st_save(arrays))
        clf: dict[str, np.ndarray] = {}
        for ch, m in models.items():
            clf.update(m.scorer.to_arrays(ch))
        atomic_write_bytes(tmp / "classifier.safetensors", st_save(clf))
        _write_json(tmp / "classifier.json", {
            "features": list(FEATURES),
            "channels": {ch: {"features": list(m.scorer.feature_names), "calibration": m.calibration.model_dump()}
                         for ch, m in models.items()}})
        # meta.json last but one: its generation depends on the content digest of all the other files
        meta = {"encoder": det.encoder.name, "dim": snap.dim, "salt": snap.salt, "next_id": snap.next_id,
                "next_group": snap.next_group, "next_num": snap.next_num, "keep_raw_text": keep_text,
                "task": det.meta.get("task")}
        digest = _content_digest({p.name: _sha256(p) for p in tmp.iterdir() if p.is_file()}, meta)
        generation = _next_generation(det, path, digest)
        _write_json(tmp / "meta.json", {
            **meta, "generation": generation, "content_digest": digest,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "detector": {k: v for k, v in det.meta.items() if k not in _GENERATION_KEYS}})
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / MANIFEST, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "files": files})
    det.meta.update(generation=generation, content_digest=digest)  # what the detector now is on disk
    log.info("detector saved to %s (%d files, generation %d)", path, len(files) + 1, generation)
    return path


def _expected_files() -> set[str]:
    """Every file a version-2 detector directory must list in its manifest."""
    return ({"config.json", "meta.json", "targets.json", "store.json", "arrays.safetensors", "classifier.safetensors",
             "classifier.json"} | {f"index_{b}.faiss" for b in BANKS})


def verify_directory(path: str | Path) -> dict[str, Any]:
    """Check manifest, format version, presence, sizes and checksums; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise DetectorFormatError(path, "is not a directory", "a detector directory written by Detector.save")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DetectorFormatError(mpath, "is missing (not a detector directory?)",
                                  f"a {MANIFEST} written by Detector.save")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetectorFormatError(mpath, f"is not valid JSON ({e})", "the manifest JSON written by Detector.save") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DetectorFormatError(mpath, f"has format {got!r}", f"format {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DetectorFormatError(mpath, f"has format_version {version!r}",
                                  f"format_version {FORMAT_VERSION} (rebuild the detector with this version)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DetectorFormatError(mpath, "has no 'files' mapping", "a sha256 and size per file")
    missing = _expected_files() - set(files)
    if missing:
        raise DetectorFormatError(mpath, f"does not list {sorted(missing)}", f"entries for {sorted(_expected_files())}")
    for name, info in files.items():
        fpath = path / name
        if not fpath.is_file():
            raise DetectorFormatError(fpath, "is missing", f"a file listed in {MANIFEST}")
        size = fpath.stat().st_size
        if size != info.get("bytes"):
            raise DetectorFormatError(fpath, f"has {size} bytes (truncated or modified)",
                                      f"{info.get('bytes')} bytes as recorded in {MANIFEST}")
        digest = _sha256(fpath)
        if digest != info.get("sha256"):
            raise DetectorFormatError(fpath, f"has sha256 {digest[:16]}... (corrupt or modified)",
                                      f"sha256 {str(info.get('sha256'))[:16]}... as recorded in {MANIFEST}")
    return manifest


def _json(path: Path) -> Any:
    """Parse a verified JSON file, turning parse errors into DetectorFormatError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DetectorFormatError(path, f"is not valid JSON ({e})", "JSON written by Detector.save") from e


def _loadable(path: Path) -> bool:
    """Whether a directory passes :func:`verify_directory` (used to pick a version to restore)."""
    try:
        verify_directory(path)
    except DetectorFormatError:
        return False
    return True


@dataclass(frozen=True)
class DetectorParts:
    """What a detector directory holds, read and verified: ``Detector.load`` builds the detector from it."""

    store: ForgetStore
    config: DetectorConfig
    models: dict[str, ChannelModel]
    meta: dict[str, Any]


def read_detector(path: str | Path, encoder: Encoder | None = None) -> DetectorParts:
    """Read a detector directory (verified first); ``encoder`` defaults to the one named in the config."""
    path = Path(path)
    recover_dir(path, _loadable)
    manifest_files = set(verify_directory(path)["files"])
    try:
        cfg = DetectorConfig.model_validate(_json(path / "config.json"))
    except ValueError as e:
        if isinstance(e, DetectorFormatError):
            raise
        raise DetectorFormatError(path / "config.json", f"is not a valid DetectorConfig ({e})",
                                  "the config written by Detector.save") from e
    meta = _json(path / "meta.json")
    enc = encoder or Encoder.from_config(cfg)
    if enc.dim != meta.get("dim"):
        raise DetectorFormatError(path / "meta.json", f"records embedding dimension {meta.get('dim')} but encoder "
                                  f"{enc.name!r} gives {enc.dim}", f"the encoder the detector was built with ({meta.get('encoder')})")
    try:
        arrays = st_load((path / "arrays.safetensors").read_bytes())
        clf_arrays = st_load((path / "classifier.safetensors").read_bytes())
    except Exception as e:  # safetensors raises its own error types
        raise DetectorFormatError(path / "arrays.safetensors", f"cannot be read ({e})", "safetensors data") from e
    store_json = _json(path / "store.json")
    banks: dict[str, Bank] = {}
    for b in BANKS:
        fpath = path / f"index_{b}.faiss"
        epath = path / f"index_{b}{EXACT_SUFFIX}"
        try:
            exact = faiss.read_index(str(epath)) if epath.name in manifest_files else None
            index = VectorIndex.from_faiss(faiss.read_index(str(fpath)), **index_options(cfg), exact=exact)
        except (RuntimeError, VectorIndexError) as e:
            raise DetectorFormatError(fpath, f"is not a usable faiss index ({e})", "an index written by faiss.write_index") from e
        try:
            fields = {f: arrays[f"{b}.{f}"].astype(_DTYPES[f]) for f in _BANK_FIELDS}
        except KeyError as e:
            raise DetectorFormatError(path / "arrays.safetensors", f"lacks array {e.args[0]!r}", "bank metadata arrays") from e
        if index.kind == "hnsw":  # a graph cannot delete: entries removed before the save are tombstoned again
            index.retain_only(fields["ids"])
        texts = tuple(store_json["banks"][b]["texts"])
        caps = tuple(tuple(c) for c in store_json["banks"][b]["caps"])
        if not (index.ntotal == len(fields["ids"]) == len(texts) == len(caps)):
            raise DetectorFormatError(fpath, f"holds {index.ntotal} vectors but metadata has {len(fields['ids'])} rows",
                                      "index and metadata of the same size")
        banks[b] = Bank(index=index, texts=texts, caps=caps, **fields)
    calib = {c: CalibrationSet(arrays[f"calib.{c}.vectors"].astype(np.float32), tuple(v["texts"]), tuple(v["groups"]),
                               tuple(v.get("clusters", ())))
             for c, v in store_json["calib"].items()}
    targets = {int(t["num"]): TargetRecord(num=int(t["num"]), id=t["id"], kind=t["kind"], names=tuple(t["names"]),
                                           phrase_hashes=frozenset(t["phrase_hashes"]), policy=t.get("policy"),
                                           phrase_starts=frozenset(t.get("phrase_starts", ())),
                                           vocab={h: frozenset(g) for h, g in t["vocab"].items()},
                                           question_keys=frozenset(t.get("question_keys", ())),
                                           value_hashes=frozenset((int(n), h) for n, h in t.get("value_hashes", ())),
                                           fact_hashes=frozenset((int(n), h) for n, h in t.get("fact_hashes", ())),
                                           birth_hashes=frozenset(t.get("birth_hashes", ())))
               for t in _json(path / "targets.json")}
    neg_names = tuple(store_json.get("neg_names", ()))
    snap = StoreSnapshot(dim=int(meta["dim"]), salt=meta["salt"], targets=targets,
                         num_of={r.id: n for n, r in targets.items()}, banks=banks, calib=calib,
                         matcher=_matcher(targets.values(), meta["salt"]), next_id=int(meta["next_id"]),
                         next_group=int(meta["next_group"]), next_num=int(meta["next_num"]),
                         keep_raw_text=bool(meta["keep_raw_text"]), neg_names=neg_names,
                         neg_matcher=neg_name_matcher(neg_names, meta["salt"]))
    clf_json = _json(path / "classifier.json")
    if tuple(clf_json.get("features", ())) != FEATURES:
        raise DetectorFormatError(path / "classifier.json", f"uses features {clf_json.get('features')}",
                                  f"features {list(FEATURES)} of this code version")
    models = {}
    for ch in CHANNELS:
        info = clf_json["channels"][ch]
        try:
            scorer = LogisticScorer.from_arrays(clf_arrays, ch, tuple(info["features"]))
        except ClassifierError as e:
            raise DetectorFormatError(path / "classifier.safetensors", str(e), "parameters for every feature") from e
        models[ch] = ChannelModel(scorer, CalibrationReport.model_validate(info["calibration"]))
    det_meta = dict(meta.get("detector", {}))
    if meta.get("task") is not None:
        det_meta["task"] = meta["task"]
    det_meta.update(generation=int(meta.get("generation", 0)), content_digest=meta.get("content_digest"))
    log.info("detector read from %s: %d targets, generation %d", path, len(targets), det_meta["generation"])
    return DetectorParts(ForgetStore(snap, enc, cfg), cfg, models, det_meta)
