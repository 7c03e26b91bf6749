"""A served forget store only moves forward (issue 16, item 4).

Every saved store carries a generation and its task; the store watcher retries a half-copied version
until it verifies, refuses an older or foreign one unless an admin forces it, and reports what it serves
in ``/readyz`` and ``/metrics``; the admin writer never saves over a newer version it has not loaded.
Stores are real detectors on the ``hashing`` encoder; the watcher is driven by calling ``check()`` with
a fake clock, never by waiting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.schema import ForgetTarget, QAItem
from detectors.config import DetectorConfig
from detectors.detector import Detector, load_detector
from detectors.encoder import hashing_encoder
from eval.tasks.offline import generate_benchmark
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.config import ServerConfig
from guard.server import Metrics, create_app
from guard.server.watch import StoreWatcher

ADMIN = "sk-admin-generations"
A = {"Authorization": f"Bearer {ADMIN}"}
NAMES = ["Zorvath Quenby", "Ilse Marrowind", "Tobin Quillard", "Odalys Fenwright"]


def person(i: int) -> ForgetTarget:
    """A new forget target, not in the benchmark task."""
    name = NAMES[i]
    return ForgetTarget(id=f"person-new-{i}", kind="privacy", names=[name], policy=f"Do not reveal facts about {name}.",
                        qa=[QAItem(question=f"Where was {name} born?", answer=f"{name} was born in Lower Mistfall.")])


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def built() -> Detector:
    task = generate_benchmark()
    return Detector.build(task.model_copy(update={"targets": task.targets[:2]}), DetectorConfig(), hashing_encoder())


@pytest.fixture()
def seed(built: Detector, tmp_path: Path) -> Path:
    """Generation 1: the built detector, saved."""
    return built.save(tmp_path / "seed")


def derive(src: Path, dst: Path, *people: int, task: str | None = None) -> Path:
    """Load ``src``, add targets (and relabel its task), save to ``dst``: the next generation."""
    det = load_detector(src, encoder=hashing_encoder())
    if task is not None:
        det.meta["task"] = task
    for i in people:
        det.add_target(person(i))
    return det.save(dst)


def generation(path: Path) -> int:
    """The generation recorded in a directory's meta.json (0 when none)."""
    return int(json.loads((path / "meta.json").read_text()).get("generation", 0))


def digest(path: Path) -> str:
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def swap_in(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src`` (what an operator's copy of a whole directory ends in)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def fault(m: Metrics, kind: str) -> float:
    return m.registry.get_sample_value("unlearn_guard_faults_total", {"kind": kind}) or 0.0


def guarded_from(path: Path) -> GuardedLLM:
    return GuardedLLM(ScriptedBackend(), load_detector(path, encoder=hashing_encoder()), guard=ScriptedBackend())


def follower(path: Path, watched: Path, clock: Clock, **server: Any) -> tuple[GuardedLLM, StoreWatcher, TestClient]:
    """A replica serving ``path`` and watching ``watched`` (its watcher is driven by hand, not by the app)."""
    g = guarded_from(path)
    app = create_app(g, ServerConfig(admin_key=ADMIN, watch_store=watched, watch_interval_s=1.0, **server))
    w = app.state.guard.watcher
    w.clock = clock
    return g, w, TestClient(app, raise_server_exceptions=False)  # no `with`: the background watcher does not run


def watching(path: Path, tmp_path: Path) -> tuple[Path, Clock, GuardedLLM, StoreWatcher, TestClient]:
    """``path`` swapped into a watched directory and a replica serving it, watching it with a hand-driven clock."""
    watched = tmp_path / "watched"
    swap_in(path, watched)
    clock = Clock()
    return (watched, clock, *follower(path, watched, clock))


def served_generation(g: GuardedLLM) -> int:
    return int(g.detector.meta.get("generation", 0))


# ---- generations on disk ------------------------------------------------------------------------------

def test_generation_increments_across_save_load_add_save(built: Detector, tmp_path: Path) -> None:
    from detectors.persistence import read_store_header

    a = built.save(tmp_path / "a")
    h = read_store_header(a)
    assert (h.generation, h.task) == (1, built.meta["task"]) and h.manifest_digest == digest(a)
    built.save(tmp_path / "a")  # unchanged: the same generation, never lower
    assert generation(a) == 1
    det = load_detector(a, encoder=hashing_encoder())
    assert det.meta["generation"] == 1 and det.meta["task"] == built.meta["task"]
    det.save(tmp_path / "copy")
    assert generation(tmp_path / "copy") == 1  # saving what was loaded, unchanged, keeps its number
    det.add_target(person(0))
    det.save(a)
    assert generation(a) == 2 and det.meta["generation"] == 2
    again = load_detector(a, encoder=hashing_encoder())
    assert again.meta["generation"] == 2 and "person-new-0" in again.target_ids
    again.remove_target("person-new-0")
    again.save(a)
    assert generation(a) == 3
    # A save never moves a directory back: an older detector saved over generation 3 is written as 4.
    stale = load_detector(tmp_path / "copy", encoder=hashing_encoder())
    stale.add_target(person(1))
    stale.save(a)
    assert generation(a) == 4 and read_store_header(a).generation == 4
    meta = json.loads((a / "meta.json").read_text())
    assert "generation" not in meta["detector"] and "content_digest" not in meta["detector"]


def test_a_store_saved_before_generations_loads_as_generation_0(seed: Path, tmp_path: Path) -> None:
    from detectors.persistence import read_store_header

    legacy = tmp_path / "legacy"
    shutil.copytree(seed, legacy)
    meta = json.loads((legacy / "meta.json").read_text())
    for k in ("generation", "content_digest", "task"):
        meta.pop(k, None)
    (legacy / "meta.json").write_text(json.dumps(meta))
    manifest = json.loads((legacy / "manifest.json").read_text())
    data = (legacy / "meta.json").read_bytes()
    manifest["files"]["meta.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    h = read_store_header(legacy)
    assert (h.generation, h.content_digest) == (0, None) and h.task == meta["detector"]["task"]
    det = load_detector(legacy, encoder=hashing_encoder())
    assert det.meta["generation"] == 0
    det.save(tmp_path / "resaved")
    assert generation(tmp_path / "resaved") == 1
    (legacy / "meta.json").write_text("{}")  # meta.json no longer matches the manifest: refused, named
    with pytest.raises(ValueError, match="meta.json"):
        read_store_header(legacy)


# ---- the watcher ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest_first", [True, False])
def test_half_copied_store_is_picked_up_once_complete(seed: Path, tmp_path: Path, manifest_first: bool) -> None:
    newer = derive(seed, tmp_path / "newer", 0)
    watched, clock, g, w, c = watching(seed, tmp_path)
    m = c.app.state.guard.metrics  # type: ignore[attr-defined]
    names = sorted(p.name for p in newer.iterdir())
    names.remove("manifest.json")
    order = ["manifest.json", *names] if manifest_first else [*names, "manifest.json"]
    half = len(order) // 2
    for name in order[:half]:  # cp -r / rsync into the live directory, file by file
        shutil.copy2(newer / name, watched / name)
    assert not w.check()
    assert "person-new-0" not in g.target_ids()
    for name in order[half:]:
        shutil.copy2(newer / name, watched / name)
    for _ in range(6):  # the version is retried (after its back-off) until it verifies
        if w.check():
            break
        clock.t += 60.0
    assert "person-new-0" in g.target_ids() and g.detector.detect("Where was Zorvath Quenby born?").flagged
    assert served_generation(g) == 2
    assert fault(m, "store_reload_error") == (1.0 if manifest_first else 0.0)
    body = c.get("/readyz").json()
    assert body["status"] == "ready"
    assert body["store"]["generation"] == 2 and body["store"]["pending_reload"] is False
    assert body["store"]["last_reload_error"] is None


def test_a_failing_version_is_retried_with_back_off_and_counted_once(seed: Path, tmp_path: Path) -> None:
    newer = derive(seed, tmp_path / "newer", 0)
    watched, clock, g, w, c = watching(seed, tmp_path)
    m = c.app.state.guard.metrics  # type: ignore[attr-defined]
    shutil.copy2(newer / "manifest.json", watched / "manifest.json")  # the rest has not arrived
    assert not w.check() and w.pending
    delays = [w.delay]
    for _ in range(5):
        assert not w.check()  # within the back-off: not even tried
        clock.t = w.retry_at
        assert not w.check()
        delays.append(w.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # interval, doubling, capped at 8 intervals
    assert fault(m, "store_reload_error") == 1.0 and served_generation(g) == 1
    body = c.get("/readyz")
    assert body.status_code == 200  # still enforcing its previous store: ready, and says what is pending
    store = body.json()["store"]
    assert store["pending_reload"] is True and "meta.json" in store["last_reload_error"]
    assert "guard_store_reload_pending 1.0" in c.get("/metrics").text
    swap_in(newer, watched)  # the copy completes (same manifest): picked up at the next retry
    assert not w.check()
    clock.t = w.retry_at
    assert w.check() and served_generation(g) == 2 and not w.pending
    text = c.get("/metrics").text
    assert "guard_store_reload_pending 0.0" in text and "guard_store_generation 2.0" in text


def test_a_vanished_store_is_pending_and_a_new_version_is_tried_at_once(seed: Path, tmp_path: Path) -> None:
    watched, clock, g, w, c = watching(seed, tmp_path)
    shutil.rmtree(watched)  # `rm -rf` before a copy
    assert not w.check() and w.pending and "missing" in str(w.last_error)
    assert not w.check()  # backing off
    swap_in(derive(seed, tmp_path / "v2", 0), watched)  # a new manifest: no back-off wait
    assert w.check() and "person-new-0" in g.target_ids() and not w.pending
    assert fault(c.app.state.guard.metrics, "store_reload_error") == 1.0  # type: ignore[attr-defined]


def test_an_older_generation_is_refused_and_reported(seed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v2 = derive(seed, tmp_path / "v2", 0)
    v3 = derive(v2, tmp_path / "v3", 1)
    watched, clock, g, w, c = watching(v3, tmp_path)
    m = c.app.state.guard.metrics  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO)
    swap_in(seed, watched)  # an operator copies an old backup (2 targets fewer) over the live store
    w.check()
    assert {"person-new-0", "person-new-1"} <= set(g.target_ids())  # forgotten people stay forgotten
    assert g.detector.detect("Where was Ilse Marrowind born?").flagged
    assert served_generation(g) == 3
    assert fault(m, "store_rollback_refused") == 1.0 and fault(m, "store_reload_error") == 0.0
    assert any(r.levelno == logging.ERROR and "generation 1" in r.getMessage() and "generation 3" in r.getMessage()
               for r in caplog.records)
    clock.t += 3600
    assert not w.check() and fault(m, "store_rollback_refused") == 1.0  # refused on purpose: not retried
    r = c.get("/readyz")
    assert r.status_code == 200
    store = r.json()["store"]
    assert store["generation"] == 3 and store["pending_reload"] is False
    assert store["refused"]["generation"] == 1 and store["refused"]["fault"] == "store_rollback_refused"
    assert "guard_store_generation 3.0" in c.get("/metrics").text


def test_same_generation_with_other_content_is_refused(seed: Path, tmp_path: Path) -> None:
    mine, theirs = derive(seed, tmp_path / "mine", 0), derive(seed, tmp_path / "theirs", 1)
    watched = tmp_path / "watched"
    swap_in(mine, watched)
    g, w, c = follower(mine, watched, Clock())
    swap_in(theirs, watched)
    w.check()
    assert "person-new-0" in g.target_ids() and "person-new-1" not in g.target_ids()
    assert generation(mine) == generation(theirs) == 2
    assert fault(c.app.state.guard.metrics, "store_rollback_refused") == 1.0  # type: ignore[attr-defined]
    swap_in(mine, watched)  # the same version, saved again elsewhere: nothing to load, nothing refused
    assert not w.check() and c.get("/readyz").json()["store"]["refused"] is None


def test_a_store_of_another_task_is_refused(seed: Path, tmp_path: Path) -> None:
    foreign = derive(seed, tmp_path / "foreign", 0, 1, task="another-task")
    watched = tmp_path / "watched"
    swap_in(seed, watched)
    g, w, c = follower(seed, watched, Clock())
    task = g.detector.meta["task"]
    swap_in(foreign, watched)
    w.check()
    assert g.detector.meta["task"] == task and "person-new-0" not in g.target_ids()
    assert generation(foreign) == 2 and served_generation(g) == 1  # newer, but for another task
    m = c.app.state.guard.metrics  # type: ignore[attr-defined]
    assert fault(m, "store_foreign_task_refused") == 1.0 and fault(m, "store_rollback_refused") == 0.0
    refused = c.get("/readyz").json()["store"]["refused"]
    assert refused["task"] == "another-task" and refused["fault"] == "store_foreign_task_refused"


def test_forced_admin_reload_accepts_an_older_store(seed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v2 = derive(seed, tmp_path / "v2", 0)
    watched = tmp_path / "watched"
    swap_in(v2, watched)
    g, w, c = follower(v2, watched, Clock())
    m = c.app.state.guard.metrics  # type: ignore[attr-defined]
    swap_in(seed, watched)
    assert not w.check() and served_generation(g) == 2
    assert c.post("/admin/store/reload", json={"force": True}).status_code == 401  # admin key required
    r = c.post("/admin/store/reload", headers=A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "store_rollback_refused"
    assert "force" in r.json()["error"]["message"] and served_generation(g) == 2
    assert fault(m, "store_rollback_refused") == 1.0  # the same version refused again is not counted again
    assert c.post("/admin/store/reload", headers=A, json={"force": "yes"}).status_code == 400
    caplog.set_level(logging.WARNING)
    r = c.post("/admin/store/reload", headers=A, json={"force": True})
    assert r.status_code == 200 and r.json()["outcome"] == "reloaded" and r.json()["generation"] == 1
    assert served_generation(g) == 1 and "person-new-0" not in g.target_ids()
    assert "guard_store_forced_reloads_total 1.0" in c.get("/metrics").text
    assert any(r.levelno == logging.WARNING and "FORCED" in r.getMessage() for r in caplog.records)
    store = c.get("/readyz").json()["store"]
    assert store["generation"] == 1 and store["refused"] is None


# ---- the admin writer -----------------------------------------------------------------------------------

def admin_replica(store: Path, **server: Any) -> tuple[GuardedLLM, TestClient]:
    g = guarded_from(store)
    app = create_app(g, ServerConfig(admin_key=ADMIN, store_path=store, **server))
    return g, TestClient(app, raise_server_exceptions=False)


def test_admin_save_over_a_newer_generation_is_409_and_leaves_the_disk(seed: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    swap_in(seed, store)
    g, c = admin_replica(store)
    derive(store, store, 0)  # another replica (or an operator) saves generation 2 there
    before = digest(store)
    r = c.post("/admin/targets", headers=A, json=person(1).model_dump())
    assert r.status_code == 409 and r.json()["error"]["code"] == "store_newer_on_disk"
    assert "generation 2" in r.json()["error"]["message"] and "reload" in r.json()["error"]["message"]
    assert digest(store) == before and generation(store) == 2  # the disk is as the other writer left it
    assert "person-new-1" not in g.target_ids()  # and memory did not change either
    victim = sorted(g.target_ids())[0]
    assert c.delete(f"/admin/targets/{victim}", headers=A).status_code == 409 and victim in g.target_ids()
    assert fault(c.app.state.guard.metrics, "store_save_conflict") == 2.0  # type: ignore[attr-defined]
    store_view = c.get("/readyz").json()["store"]
    assert store_view["generation"] == 1
    # Reload first, then the change is saved on top of the newer version.
    r = c.post("/admin/store/reload", headers=A)
    assert r.status_code == 200 and r.json()["generation"] == 2
    assert c.post("/admin/targets", headers=A, json=person(1).model_dump()).status_code == 201
    on_disk = load_detector(store, encoder=hashing_encoder())
    assert generation(store) == 3 and {"person-new-0", "person-new-1"} <= set(on_disk.target_ids)


def test_admin_save_over_a_half_copied_store_is_refused(seed: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    swap_in(seed, store)
    newer = derive(seed, tmp_path / "newer", 0)
    g, c = admin_replica(store, watch_store=store, watch_interval_s=1.0)
    shutil.copy2(newer / "manifest.json", store / "manifest.json")  # a copy in progress
    before = digest(store)
    assert c.post("/admin/targets", headers=A, json=person(1).model_dump()).status_code == 409
    assert digest(store) == before and "person-new-1" not in g.target_ids()
    for p in newer.iterdir():  # the copy completes; the watcher then serves it, and admin saves go on top
        shutil.copy2(p, store / p.name)
    assert c.app.state.guard.watcher.check() and served_generation(g) == 2  # type: ignore[attr-defined]
    assert c.post("/admin/targets", headers=A, json=person(1).model_dump()).status_code == 201
    assert generation(store) == 3


def test_a_newer_store_saved_during_an_admin_change_undoes_it(seed: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    swap_in(seed, store)
    g, c = admin_replica(store)
    det = g.detector
    add = det.add_target

    def add_while_another_writer_saves(target: ForgetTarget, refit: bool = False) -> None:
        add(target, refit)
        derive(store, store, 2)  # lands between the pre-check and the save

    det.add_target = add_while_another_writer_saves  # type: ignore[method-assign]
    r = c.post("/admin/targets", headers=A, json=person(1).model_dump())
    assert r.status_code == 409
    assert "person-new-1" not in g.target_ids() and "person-new-1" not in det.target_ids  # undone in memory
    on_disk = load_detector(store, encoder=hashing_encoder())
    assert generation(store) == 2 and "person-new-2" in on_disk.target_ids and "person-new-1" not in on_disk.target_ids
    # The same for a removal: the target comes back (names and policy) so memory keeps forgetting it.
    assert c.post("/admin/store/reload", headers=A).json()["generation"] == 2
    det = g.detector
    remove = det.remove_target

    def remove_while_another_writer_saves(target_id: str, refit: bool = False) -> None:
        remove(target_id, refit)
        derive(store, store, 3)

    det.remove_target = remove_while_another_writer_saves  # type: ignore[method-assign]
    assert c.delete("/admin/targets/person-new-2", headers=A).status_code == 409
    assert "person-new-2" in g.target_ids() and g.detector.detect("Where was Tobin Quillard born?").flagged
    assert generation(store) == 3


def test_watcher_alone_works_with_a_plain_lock(seed: Path, tmp_path: Path) -> None:
    """The watcher is usable outside the app (as the CLI and benches build it)."""
    watched = tmp_path / "watched"
    swap_in(seed, watched)
    g = guarded_from(seed)
    w = StoreWatcher(g, watched, 0.5, Metrics(), threading.Lock())
    assert not w.check()
    swap_in(derive(seed, tmp_path / "v2", 0), watched)
    assert w.check() and "person-new-0" in g.target_ids()
