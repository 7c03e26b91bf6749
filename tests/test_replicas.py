"""Several proxy replicas, one forget store: a forget request reaches every replica within 2 s, two writers never
lose a change, and killing a replica under load leaves the others serving, every answer checked.

The replicas are real processes: ``python -m cli.serve`` (the ``unlearn-guard serve`` command line) on loopback,
all watching one store directory built with the model-free ``hashing`` encoder, in front of the fake upstream of
``eval/bench/load.py``; replicas 1 and 2 save admin changes to the store (``server.store_path``), replica 3 only
reloads it. The cluster, the timed add and the kill are ``eval/bench/replicas.py``'s, which reports the same
figures with the MiniLM detector.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from detectors.config import DetectorConfig
from detectors.detector import Detector, load_detector
from detectors.encoder import hashing_encoder
from eval.bench.replicas import (
    ADMIN_KEY,
    Cluster,
    add_to_flag,
    kill_under_load,
    load_prompts,
    new_person,
    start_cluster,
)
from eval.tasks.offline import generate_benchmark
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.server.metrics import Metrics
from guard.server.watch import StoreWatcher

A = {"Authorization": f"Bearer {ADMIN_KEY}"}

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def built() -> Detector:
    return Detector.build(generate_benchmark(), DetectorConfig(encoder="hashing"), hashing_encoder())


@pytest.fixture(scope="module")
def cluster(built: Detector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    store = built.save(root / "shared" / "store")
    with start_cluster(store, 3, root / "logs", writers=2, timeout_s=120.0) as c:
        yield c


def state(c: Cluster) -> list[tuple[int, list[str]]]:
    """Each live replica's served generation and targets."""
    out = []
    for r in c.replicas:
        if r.proc.poll() is None:
            gen = httpx.get(r.url + "/readyz", timeout=10).json()["store"]["generation"]
            out.append((gen, sorted(httpx.get(r.url + "/admin/targets", headers=A, timeout=10).json()["targets"])))
    return out


async def test_the_watcher_sees_a_saved_store_within_its_poll_not_its_interval(built: Detector, tmp_path: Path) -> None:
    """A 60 s check interval still picks a new version up within a poll (0.25 s); idle, it only stats the manifest."""
    store = built.save(tmp_path / "store")
    g = GuardedLLM(ScriptedBackend(), load_detector(store, encoder=hashing_encoder()))
    w = StoreWatcher(g, store, 60.0, Metrics(), threading.Lock())
    checks = 0
    check = w.check

    def counted() -> bool:
        nonlocal checks
        checks += 1
        return check()

    w.check = counted  # type: ignore[method-assign]
    task = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.8)
        assert checks == 0  # idle: no manifest read, no load
        writer = load_detector(store, encoder=hashing_encoder())
        target, probe = new_person(0)
        writer.add_target(target)
        t0 = time.perf_counter()
        writer.save(store)
        while target.id not in g.target_ids() and time.perf_counter() - t0 < 5.0:
            await asyncio.sleep(0.01)
        took = time.perf_counter() - t0
        assert target.id in g.target_ids() and g.detector.detect(probe).flagged
        assert took < 1.0, f"reloaded {took:.2f} s after the save"
        assert checks == 1
    finally:
        task.cancel()


async def test_an_admin_add_on_one_replica_is_enforced_by_every_replica_within_2_s(cluster: Cluster) -> None:
    target, probe = new_person(1)
    r = await add_to_flag(cluster, target, probe, poll_s=0.01, timeout_s=10.0)
    print(f"\nadd -> first flagged: admin 201 after {r['admin_s']:.3f} s; {r['first_flagged_s']} (s after the POST)")
    assert r["admin_status"] == 201
    assert not any(r["flagged_before"].values()), r["flagged_before"]
    first = r["first_flagged_s"]
    assert first["replica-1"] is not None and first["replica-1"] <= 1.0, first
    assert all(s is not None and s <= 2.0 for s in first.values()), first
    assert len(set(map(json.dumps, state(cluster)))) == 1  # one generation, one target list


async def test_two_writers_never_lose_a_change(cluster: Cluster) -> None:
    """Adds sent to two writers at once: each is saved, or answered 409 (then repeated); none is dropped."""
    people = [new_person(2)[0], new_person(3)[0]]
    statuses: list[list[int]] = [[], []]

    async def add(i: int) -> None:
        async with httpx.AsyncClient(base_url=cluster.replicas[i].url, timeout=30.0) as c:
            for _ in range(50):
                s = (await c.post("/admin/targets", headers=A, json=people[i].model_dump(mode="json"))).status_code
                statuses[i].append(s)
                if s != 409:
                    return
                await asyncio.sleep(0.1)  # the watcher loads the other writer's version, then the change is repeated

    await asyncio.gather(add(0), add(1))
    assert [s[-1] for s in statuses] == [201, 201], statuses
    assert all(x in (201, 409) for s in statuses for x in s), statuses
    ids = {p.id for p in people}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not all(ids <= set(t) for _, t in state(cluster)):
        await asyncio.sleep(0.05)
    final = state(cluster)
    assert all(ids <= set(t) for _, t in final) and len(set(map(json.dumps, final))) == 1, final
    on_disk = {t["id"] for t in json.loads((cluster.store / "targets.json").read_text())}
    assert ids <= on_disk


async def test_killing_a_replica_under_load_leaves_the_others_serving_every_answer_checked(cluster: Cluster) -> None:
    passing, flagged = load_prompts(cluster.store)
    assert passing and flagged
    k = await kill_under_load(cluster, passing, flagged, seconds=6.0, concurrency=6)
    sv = k["survivors"]
    print(f"\nkill under load: {json.dumps(k['replicas'])}; failed over {k['failed_over']}")
    assert cluster.replicas[-1].proc.poll() is not None  # it is dead
    assert sv["status_5xx"] == 0 and sv["other_errors"] == 0, k["replicas"]
    assert sv["unchecked"] == 0, k["replicas"]
    assert sv["after_kill"] >= 50 and sv["passed"] > 0 and sv["blocked"] > 0, sv
    for r in cluster.replicas[:-1]:
        row = k["replicas"][r.name]
        assert row["after_kill"] > 0 and row["metrics_output_check"] >= row["passed"], row
        assert httpx.get(r.url + "/readyz", timeout=10).status_code == 200
