"""Replica benchmark: how long a forget request takes to be enforced by every replica of the proxy, and what
killing one replica under load does to the others.

N proxy replicas run as separate processes, each started by the real ``unlearn-guard serve`` command line
(``python -m cli.serve``) on loopback, all with ``--detector`` on one shared store directory (watched: the
default ``--watch``) and ``--upstream`` on the fake OpenAI-compatible upstream of :mod:`eval.bench.load`
(started by its ``start_child``), ``--guard-mode refuse`` (a flagged prompt is refused, no guard LLM) and
the output check on. Replica 1 is the writer: its YAML sets ``server.store_path`` to the shared directory, so
an admin change there is saved atomically before the answer and every other replica's watcher reloads it.

Add -> flag (``--repetitions``, default 5): a new person with 10 facts (a seed of the offline benchmark
generator no store holds) is posted to the writer's ``POST /admin/targets`` while every replica is asked a
question about them in a closed loop (one request in flight per replica, ``--poll-ms`` apart); the figure is
the time from sending the admin request to each replica's first flagged answer. The in-process baseline is
``Detector.add_target`` then ``detect`` of the same question, on a loaded copy of the same store, in the same
run (what ``eval/bench/detector_bench.py`` times on its own build). Targets: <= 1 s on the writer, <= 2 s on
every replica.

Kill under load (``--kill-seconds``, default 6; 0 skips it): closed-loop clients spread a mix of unflagged and
flagged prompts (chat and completions, streamed or not) over the replicas; a third of the way in the last
replica gets SIGKILL. A client whose request fails on a connection error takes that replica out of its
rotation and sends the request to the next one (as a load balancer ejects a dead endpoint). For every
survivor it counts answers, 5xx and unchecked answers: an answer that reached the client without the detector
having run, or that passed (the upstream's text) without the output check, from each non-streamed answer's
trace (``--expose-trace``) and from the survivor's ``/metrics`` stage counters, which cover streams too.

    python -m eval.bench.replicas                      # MiniLM detector (built once, cached), 3 replicas
    python -m eval.bench.replicas --encoder hashing    # model-free encoder: seconds, for a smoke run
    python -m eval.bench.replicas --replicas 4 --repetitions 9

Results: ``runs/bench/replicas/replicas.{json,md}`` and the tables on stdout. ``tests/test_replicas.py``
runs the same cluster, add and kill with the hashing encoder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from eval.bench.load import (
    FIXED_ANSWER,
    Child,
    LoadConfig,
    Spec,
    _trace_dropped,
    environment,
    proxy_counters,
    read_answer,
    start_child,
)

log = logging.getLogger("replicas_bench")

ADMIN_KEY = "sk-replicas-bench-admin"  # loopback only; given to the replicas in their environment, never argv
MODEL = "fake-upstream"


class ReplicaBenchConfig(BaseModel):
    """Everything a replica run needs; the command-line options map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(3, ge=2, le=16, description="Proxy replicas sharing the store (replica 1 writes it).")
    repetitions: int = Field(5, ge=1, le=50, description="Admin adds timed (one new person each).")
    facts: int = Field(10, ge=8, le=12, description="Facts of each new person.")
    poll_ms: float = Field(50.0, ge=0, description="Pause between two questions to one replica while waiting for "
                           "its first flagged answer (one in flight per replica; each question costs the replica two "
                           "encoder calls, which on a small machine slow the add being timed).")
    encoder: str = Field("minilm-l6", description="Encoder of the detector (the load benchmark's cached build).")
    detector_dir: Path | None = Field(None, description="Saved detector to start from; default: the load "
                                      "benchmark's cached build for this encoder (built when missing).")
    kill_seconds: float = Field(6.0, ge=0, description="Length of the kill-under-load run; 0 skips it.")
    kill_concurrency: int = Field(6, ge=1, description="Closed-loop clients of the kill run.")
    replica_env: dict[str, str] = Field(default_factory=dict, description="Extra environment of each replica, e.g. "
                                        "OMP_NUM_THREADS=1 (the replicas share this machine's CPUs).")
    malloc_mmap_threshold_kb: int | None = Field(128, ge=1, description="ServerConfig.malloc_mmap_threshold_kb of "
                                                 "every replica (128: serve's default; None: glibc's, which makes "
                                                 "add_target's encoder batch about twice as fast here).")
    timeout_s: float = Field(30.0, gt=0, description="Client timeout of each request.")
    flag_timeout_s: float = Field(30.0, gt=0, description="Give up waiting for a replica's first flagged answer.")
    startup_timeout_s: float = Field(600.0, gt=0)
    target_writer_s: float = Field(1.0, description="Target: admin add -> flagged on the writer.")
    target_all_s: float = Field(2.0, description="Target: admin add -> flagged on every replica.")
    out_dir: Path = Path("runs/bench/replicas")


# ---- the cluster: N replicas of `unlearn-guard serve` on one store, the fake upstream -------------------

@dataclass
class Replica:
    """One proxy replica process."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    writer: bool


@dataclass
class Cluster:
    """The fake upstream and the replicas (replica 0 writes the store)."""

    upstream: Child
    replicas: list[Replica]
    store: Path

    @property
    def writer(self) -> Replica:
        """The replica whose admin changes are saved to the shared store."""
        return self.replicas[0]


def free_port() -> int:
    """A loopback port free right now (the CLI takes a port number, not a socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_replica(name: str, store: Path, upstream_url: str, out_dir: Path, writer: bool,
                   env: dict[str, str] | None = None, server: dict[str, Any] | None = None) -> Replica:
    """Start ``python -m cli.serve`` on the shared store (``server.store_path`` in its YAML when ``writer``;
    ``server``: more ``ServerConfig`` fields)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / f"{name}.yaml"
    server = {"max_concurrency": 64, "request_timeout_s": 30.0, **(server or {})}
    if writer:
        server["store_path"] = str(store)
    cfg_path.write_text(json.dumps({"server": server}), encoding="utf-8")  # JSON is YAML
    port = free_port()
    log_path = out_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "cli.serve", "--detector", str(store), "--upstream", upstream_url + "/v1",
           "--model", MODEL, "--guard-mode", "refuse", "--output-check", "block", "--expose-trace",
           "--port", str(port), "--config", str(cfg_path)]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {}), "UNLEARN_GUARD_ADMIN_KEY": ADMIN_KEY})
    return Replica(name, proc, f"http://127.0.0.1:{port}", log_path, writer)


def wait_ready(r: Replica, timeout_s: float) -> None:
    """Wait until a replica answers ``/readyz`` with 200 (RuntimeError naming its log when it died or is late)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if r.proc.poll() is not None or time.monotonic() > deadline:
            tail = r.log_path.read_text(errors="replace")[-2000:] if r.log_path.exists() else ""
            raise RuntimeError(f"{r.name} did not become ready (exit {r.proc.poll()}); {r.log_path}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(r.url + "/readyz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.1)


def stop_replica(r: Replica) -> None:
    """Stop a replica (SIGTERM, then SIGKILL); nothing when it is gone already."""
    if r.proc.poll() is None:
        r.proc.terminate()
        try:
            r.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            r.proc.kill()
    r.proc.wait(timeout=10)


@contextlib.contextmanager
def start_cluster(store: Path, n: int, out_dir: Path, writers: int = 1, timeout_s: float = 600.0,
                  env: dict[str, str] | None = None, server: dict[str, Any] | None = None) -> Iterator[Cluster]:
    """The fake upstream and ``n`` replicas on ``store`` (the first ``writers`` of them save admin changes to it;
    ``server``: more ``ServerConfig`` fields of every replica)."""
    with start_child("upstream", ["--role", "upstream"], out_dir, "/v1/models", timeout_s) as up, \
            contextlib.ExitStack() as stack:
        replicas = []
        for i in range(n):
            r = launch_replica(f"replica-{i + 1}", store, up.url, out_dir, writer=i < writers, env=env, server=server)
            stack.callback(stop_replica, r)
            replicas.append(r)
        for r in replicas:
            wait_ready(r, timeout_s)
        log.info("%d replicas up on %s: %s", n, store, ", ".join(r.url for r in replicas))
        yield Cluster(up, replicas, store)


# ---- one question ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    """What one request to a replica got."""

    status: int  # 0: no HTTP answer (connection refused or cut)
    flagged: bool = False  # x-guard-flagged
    blocked: bool = False  # refused, or the output check replaced it (x-guard-blocked, or not the upstream's text)
    passed: bool = False  # the upstream's own answer reached the client
    unchecked: bool = False  # a non-streamed answer whose trace shows a skipped or failed-open check
    error: str | None = None
    text: str = ""  # the answer's text (its first 200 characters)


async def ask(client: Any, spec: Spec, max_tokens: int = 16) -> Answer:
    """Send one request of the mix and judge what came back (a client error is status 0, not an exception)."""
    path, body = spec.path_and_body(max_tokens)
    try:
        resp = await client.post(path, json=body)
        raw = resp.text
    except Exception as e:  # noqa: BLE001 - any client-side failure: the replica did not answer
        return Answer(0, error=f"{e.__class__.__name__}: {e}"[:200])
    ans = Answer(resp.status_code, flagged=resp.headers.get("x-guard-flagged") == "true",
                 blocked=resp.headers.get("x-guard-blocked") == "true")
    if resp.status_code != 200:
        ans.error = raw[:200]
        return ans
    try:
        text, err, trace = read_answer(raw, spec)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        ans.error = f"bad body: {e.__class__.__name__}: {e}"[:200]
        return ans
    ans.error, ans.text = err, text[:200]
    ans.passed = err is None and text == FIXED_ANSWER
    # the guard's own answer (a refusal); streamed completions carry no x-guard-* headers, so the text tells
    ans.blocked = ans.blocked or (err is None and not ans.passed)
    ans.unchecked = not spec.stream and _trace_dropped(trace, "block")
    return ans


# ---- add -> first flagged answer on every replica -------------------------------------------------------

def new_person(i: int, facts: int = 10) -> tuple[Any, str]:
    """A new person with ``facts`` facts no store holds (offline generator, seed 123 + i) and a question about them."""
    from core.schema import ForgetTarget
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark

    person = generate_benchmark(BenchmarkConfig(seed=123 + i, min_facts=facts, max_facts=facts)).targets[0]
    qa = [q.model_copy(update={"paraphrased_question": None}) for q in person.qa if q.kind == "fact"]
    target = ForgetTarget(id=f"person-new-{i}", kind="privacy", names=person.names, policy=person.policy, qa=qa)
    return target, person.qa[0].question


async def add_to_flag(cluster: Cluster, target: Any, probe: str, poll_s: float = 0.01,
                      timeout_s: float = 30.0, writer: Replica | None = None) -> dict[str, Any]:
    """Post ``target`` to the writer's admin endpoint and time each replica's first flagged answer to ``probe``."""
    import httpx

    writer = writer or cluster.writer
    spec = Spec(prompt=probe, flagged=True, endpoint="chat", stream=False)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with contextlib.AsyncExitStack() as stack:
        clients = {r.name: await stack.enter_async_context(httpx.AsyncClient(base_url=r.url, timeout=10.0))
                   for r in cluster.replicas if r.proc.poll() is None}
        before = {n: (await ask(c, spec)).flagged for n, c in clients.items()}
        t0 = time.perf_counter()

        async def admin() -> tuple[int, float]:
            resp = await clients[writer.name].post("/admin/targets", headers=auth, json=target.model_dump(mode="json"))
            return resp.status_code, time.perf_counter() - t0

        async def first_flag(name: str) -> tuple[float | None, int]:
            asked = 0
            while time.perf_counter() - t0 < timeout_s:
                asked += 1
                if (await ask(clients[name], spec)).flagged:
                    return time.perf_counter() - t0, asked
                await asyncio.sleep(poll_s)
            return None, asked

        (status, admin_s), *flags = await asyncio.gather(admin(), *(first_flag(n) for n in clients))
    return {"target": target.id, "admin_status": status, "admin_s": round(admin_s, 4), "flagged_before": before,
            "first_flagged_s": {n: None if s is None else round(s, 4) for n, (s, _) in zip(clients, flags, strict=True)},
            "questions_asked": {n: k for n, (_, k) in zip(clients, flags, strict=True)}}


def in_process_baseline(store: Path, persons: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """``add_target`` then ``detect`` of the same question on a loaded copy of the store, in this process."""
    from detectors.detector import Detector

    det = Detector.load(store)
    det.detect("warm-up prompt")
    out = []
    for target, probe in persons:
        before = det.detect(probe).flagged
        t0 = time.perf_counter()
        det.add_target(target)
        added = time.perf_counter() - t0
        flagged = det.detect(probe).flagged
        out.append({"target": target.id, "add_target_s": round(added, 4),
                    "to_first_flagged_s": round(time.perf_counter() - t0, 4), "flagged_before": before,
                    "flagged_after": flagged})
    return out


# ---- kill one replica under load ------------------------------------------------------------------------

@dataclass
class ReplicaTally:
    """What the clients saw from one replica during the kill run."""

    answers: int = 0
    status_5xx: int = 0
    other_errors: int = 0  # 4xx, bad bodies, stream error events
    connection_errors: int = 0  # no HTTP answer: the replica is dead (or dying)
    passed: int = 0
    blocked: int = 0
    unchecked_traces: int = 0
    after_kill: int = 0  # answers that arrived after the kill
    errors: dict[str, int] = field(default_factory=dict)


def kill_mix(passing: list[str], flagged: list[str], n: int, seed: int = 0) -> list[Spec]:
    """``n`` requests: 30% flagged prompts, 20% streamed, 10% text completions (the load benchmark's shares)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        is_flagged = bool(flagged) and rng.random() < 0.3
        endpoint: Literal["chat", "completions"] = "completions" if rng.random() < 0.1 else "chat"
        out.append(Spec(prompt=rng.choice(flagged if is_flagged else passing), flagged=is_flagged, endpoint=endpoint,
                        stream=rng.random() < 0.2))
    return out


async def kill_under_load(cluster: Cluster, passing: list[str], flagged: list[str], seconds: float = 6.0,
                          concurrency: int = 6, victim: int = -1) -> dict[str, Any]:
    """Closed-loop load over every replica for ``seconds``; SIGKILL replica ``victim`` a third of the way in.

    Returns per replica what the clients saw and, for the survivors, the checks their ``/metrics`` counted
    (``unchecked``: answers without a detector run, passed answers without an output check, fail-open).
    """
    import httpx

    victim_r = cluster.replicas[victim]
    alive = [r for r in cluster.replicas if r.proc.poll() is None]
    before = {r.name: await proxy_counters(r.url) for r in alive}
    tally = {r.name: ReplicaTally() for r in alive}
    rotation = list(alive)  # the clients' view: a replica leaves it on its first connection error
    specs = kill_mix(passing, flagged, 100_000)
    nxt = 0
    killed_at: float | None = None
    failed_over = 0
    limits = httpx.Limits(max_connections=len(alive), max_keepalive_connections=len(alive))
    async with contextlib.AsyncExitStack() as stack:
        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(limits=limits, timeout=30.0)

        clients = [await stack.enter_async_context(client()) for _ in range(concurrency)]
        t0 = time.perf_counter()

        async def worker(c: httpx.AsyncClient) -> None:
            nonlocal nxt, failed_over
            while time.perf_counter() - t0 < seconds:
                spec = specs[nxt % len(specs)]
                k = nxt
                nxt += 1
                for attempt in range(len(cluster.replicas)):
                    if not rotation:
                        return
                    r = rotation[(k + attempt) % len(rotation)]
                    t = tally[r.name]
                    ans = await ask(_Bound(c, r.url), spec)
                    if ans.status == 0:
                        t.connection_errors += 1
                        with contextlib.suppress(ValueError):
                            rotation.remove(r)
                        failed_over += 1
                        continue
                    t.answers += 1
                    t.after_kill += killed_at is not None
                    t.status_5xx += 500 <= ans.status < 600
                    t.passed += ans.passed
                    t.blocked += ans.blocked
                    t.unchecked_traces += ans.unchecked
                    if ans.status != 200 or ans.error or not (ans.passed or ans.blocked):
                        t.other_errors += ans.status < 500
                        key = f"{ans.status}: {(ans.error or 'neither passed nor blocked: ' + ans.text)[:80]}"
                        t.errors[key] = t.errors.get(key, 0) + 1
                    break

        async def killer() -> None:
            nonlocal killed_at
            await asyncio.sleep(seconds / 3)
            os.kill(victim_r.proc.pid, signal.SIGKILL)
            killed_at = time.perf_counter() - t0
            log.info("SIGKILL to %s (pid %d) at %.2f s", victim_r.name, victim_r.proc.pid, killed_at)

        await asyncio.gather(killer(), *(worker(c) for c in clients))
        wall = time.perf_counter() - t0
    await asyncio.sleep(0.2)  # a stream's trace is counted just after its last byte
    victim_r.proc.wait(timeout=10)
    rows = {}
    for r in alive:
        t = tally[r.name]
        row: dict[str, Any] = {"answers": t.answers, "after_kill": t.after_kill, "status_5xx": t.status_5xx,
                               "other_errors": t.other_errors, "connection_errors": t.connection_errors,
                               "passed": t.passed, "blocked": t.blocked, "error_kinds": t.errors,
                               "killed": r is victim_r}
        if r is not victim_r:
            m1 = await proxy_counters(r.url)
            d = {k: m1.get(k, 0.0) - before[r.name].get(k, 0.0) for k in set(m1) | set(before[r.name])}
            gap_detect = max(0, int(t.answers - d.get("stage:detect", 0.0)))
            gap_output = max(0, int(t.passed - d.get("stage:output_check", 0.0)))
            fail_open = int(d.get("fail_open", 0.0))
            row.update(metrics_detect=int(d.get("stage:detect", 0.0)), metrics_output_check=int(d.get(
                "stage:output_check", 0.0)), unchecked_traces=t.unchecked_traces, fail_open=fail_open,
                unchecked=max(t.unchecked_traces, gap_detect + gap_output) + fail_open)
        rows[r.name] = row
    survivors = [rows[r.name] for r in alive if r is not victim_r]
    return {"seconds": round(wall, 2), "concurrency": concurrency, "victim": victim_r.name,
            "killed_at_s": None if killed_at is None else round(killed_at, 2), "failed_over": failed_over,
            "replicas": rows, "survivors": {
                "answers": sum(x["answers"] for x in survivors), "after_kill": sum(x["after_kill"] for x in survivors),
                "status_5xx": sum(x["status_5xx"] for x in survivors),
                "other_errors": sum(x["other_errors"] for x in survivors),
                "unchecked": sum(x["unchecked"] for x in survivors),
                "passed": sum(x["passed"] for x in survivors), "blocked": sum(x["blocked"] for x in survivors)}}


class _Bound:
    """An httpx client that sends relative paths to one replica (so the workers' connections are shared)."""

    def __init__(self, client: Any, base_url: str) -> None:
        """Send through ``client`` to ``base_url``."""
        self.client, self.base_url = client, base_url

    async def post(self, path: str, **kw: Any) -> Any:
        """POST ``path`` on this replica."""
        return await self.client.post(self.base_url + path, **kw)


# ---- the run --------------------------------------------------------------------------------------------

def source_store(cfg: ReplicaBenchConfig) -> Path:
    """The saved detector to start from: ``detector_dir``, else the load benchmark's cached build (built if missing)."""
    if cfg.detector_dir is not None:
        return cfg.detector_dir
    from eval.bench.load import detector_path

    lcfg = LoadConfig(encoder=cfg.encoder)
    path = detector_path(lcfg)
    if not (path / "meta.json").exists():
        log.info("building the detector (cached afterwards) in %s", path)
        res = subprocess.run([sys.executable, "-m", "eval.bench.load", "--role", "build-detector", "--config-json",
                              lcfg.model_dump_json()], check=False)
        if res.returncode != 0:
            raise RuntimeError("detector build failed")
    return path


def _stats(xs: list[float | None]) -> dict[str, Any]:
    """Median and max in seconds of the figures that exist, and how many did not (never flagged in time)."""
    ok = [x for x in xs if x is not None]
    return {"median_s": round(statistics.median(ok), 4) if ok else None, "max_s": round(max(ok), 4) if ok else None,
            "n": len(ok), "missing": len(xs) - len(ok)}


def summarise(rep: dict[str, Any], cfg: ReplicaBenchConfig) -> dict[str, Any]:
    """Median and max of every figure over the repetitions, and the verdict against the targets."""
    runs = rep["add_to_flag"]
    names = list(runs[0]["first_flagged_s"])
    rows = {"in_process": _stats([b["to_first_flagged_s"] for b in rep["in_process"]]),
            "admin_201": _stats([r["admin_s"] for r in runs])}
    for n in names:
        rows[n] = _stats([r["first_flagged_s"][n] for r in runs])
    every = [None if any(r["first_flagged_s"][n] is None for n in names) else max(r["first_flagged_s"].values())
             for r in runs]
    rows["all_replicas"] = _stats(every)
    for n in names[1:]:  # what the watcher adds: from the writer's answer (the store is saved) to this replica's flag
        rows[f"lag:{n}"] = _stats([None if r["first_flagged_s"][n] is None else r["first_flagged_s"][n] - r["admin_s"]
                                   for r in runs])
    fails = []
    w = rows[names[0]]
    if w["max_s"] is None or w["missing"] or w["max_s"] > cfg.target_writer_s:
        fails.append(f"writer max {w['max_s']} s > {cfg.target_writer_s:g} s (or never flagged)")
    a = rows["all_replicas"]
    if a["max_s"] is None or a["missing"] or a["max_s"] > cfg.target_all_s:
        fails.append(f"every replica max {a['max_s']} s > {cfg.target_all_s:g} s (or never flagged)")
    if any(v for r in runs for v in r["flagged_before"].values()):
        fails.append("a probe was flagged before its target was added (the figure means nothing)")
    if any(r["admin_status"] != 201 for r in runs):
        fails.append("an admin add was not answered 201")
    return {"rows": rows, "verdict": "FAIL" if fails else "PASS", "failures": fails}


def table(rep: dict[str, Any]) -> str:
    """The markdown tables of a run."""
    s = rep["summary"]
    rows = s["rows"]
    names = [k for k in rows if k.startswith("replica-")]
    cfgd = rep["config"]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [f"| admin add -> first flagged request ({rep['config']['repetitions']} repetitions, "
             f"{rep['config']['facts']} facts each) | median s | max s | target |", "|---|---|---|---|"]
    lines.append(f"| in process: add_target + detect (baseline, same run) | {fmt(rows['in_process']['median_s'])} | "
                 f"{fmt(rows['in_process']['max_s'])} | |")
    lines.append(f"| writer: admin POST answered 201 (added and saved) | {fmt(rows['admin_201']['median_s'])} | "
                 f"{fmt(rows['admin_201']['max_s'])} | |")
    for i, n in enumerate(names):
        who = f"{n} (writer, took the request)" if i == 0 else f"{n} (reloads the shared store)"
        target = rep["config"]["target_writer_s"] if i == 0 else rep["config"]["target_all_s"]
        lines.append(f"| {who} | {fmt(rows[n]['median_s'])} | {fmt(rows[n]['max_s'])} | <= {target:g} s |")
    lines.append(f"| every replica flags it | {fmt(rows['all_replicas']['median_s'])} | "
                 f"{fmt(rows['all_replicas']['max_s'])} | <= {rep['config']['target_all_s']:g} s |")
    for n in names[1:]:
        lines.append(f"| {n}: from the writer's 201 (store saved) to its first flagged answer | "
                     f"{fmt(rows[f'lag:{n}']['median_s'])} | {fmt(rows[f'lag:{n}']['max_s'])} | |")
    lines.append("")
    lines.append(f"Each replica was asked about the new person in a closed loop, {cfgd['poll_ms']:g} ms between "
                 "answers, while the add ran: the figures include that load on the machine's CPUs.")
    lines.append("")
    lines.append(f"verdict: {s['verdict']}{' (' + '; '.join(s['failures']) + ')' if s['failures'] else ''}")
    k = rep.get("kill")
    if k:
        lines += ["", f"Kill under load: {k['concurrency']} closed-loop clients for {k['seconds']} s, SIGKILL to "
                      f"{k['victim']} at {k['killed_at_s']} s; {k['failed_over']} request(s) failed over to another "
                      "replica.", "",
                  "| replica | answers | after the kill | 5xx | other errors | connection errors | passed | "
                  "refused/blocked | unchecked |", "|---|---|---|---|---|---|---|---|---|"]
        for n, r in k["replicas"].items():
            lines.append(f"| {n}{' (killed)' if r['killed'] else ''} | {r['answers']} | {r['after_kill']} | "
                         f"{r['status_5xx']} | {r['other_errors']} | {r['connection_errors']} | {r['passed']} | "
                         f"{r['blocked']} | {r.get('unchecked', '-')} |")
        sv = k["survivors"]
        lines.append(f"| survivors | {sv['answers']} | {sv['after_kill']} | {sv['status_5xx']} | "
                     f"{sv['other_errors']} | | {sv['passed']} | {sv['blocked']} | {sv['unchecked']} |")
    return "\n".join(lines)


async def _measure(cfg: ReplicaBenchConfig, cluster: Cluster, persons: list[tuple[Any, str]],
                   passing: list[str], flagged: list[str]) -> dict[str, Any]:
    """The add -> flag repetitions, then the kill run, on a running cluster."""
    runs = []
    for target, probe in persons:
        r = await add_to_flag(cluster, target, probe, cfg.poll_ms / 1000.0, cfg.flag_timeout_s)
        log.info("%s: admin %.3f s, first flagged %s", target.id, r["admin_s"], r["first_flagged_s"])
        runs.append(r)
    out: dict[str, Any] = {"add_to_flag": runs}
    if cfg.kill_seconds > 0:
        out["kill"] = await kill_under_load(cluster, passing, flagged, cfg.kill_seconds, cfg.kill_concurrency)
    return out


def load_prompts(store: Path) -> tuple[list[str], list[str]]:
    """Questions of the offline benchmark the store does not flag (retain, neighbour, benign) and ones it does."""
    from detectors.detector import Detector
    from eval.tasks.offline import generate_benchmark

    task = generate_benchmark()
    det = Detector.load(store)
    other = [q.question for q in task.retain_qa] + [q.question for q in task.neighbour_qa] + list(task.benign_questions)
    forget = [q.question for q in task.forget_qa]
    passing = [p for p, d in zip(other, det.detect_batch(other), strict=True) if not d.flagged]
    flagged = [p for p, d in zip(forget, det.detect_batch(forget), strict=True) if d.flagged]
    return passing[:200], flagged[:200]


def run(cfg: ReplicaBenchConfig) -> dict[str, Any]:
    """Copy the store to a fresh shared directory, time the in-process baseline, start the cluster, measure."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    src = source_store(cfg)
    shared = cfg.out_dir / "shared" / "store"
    shutil.rmtree(shared.parent, ignore_errors=True)
    shutil.copytree(src, shared)
    env = environment()
    t0 = time.perf_counter()
    persons = [new_person(i, cfg.facts) for i in range(cfg.repetitions)]
    baseline = in_process_baseline(shared, persons)  # on its own copy in memory: the shared store is not changed
    passing, flagged = load_prompts(shared)
    with start_cluster(shared, cfg.replicas, cfg.out_dir, timeout_s=cfg.startup_timeout_s, env=cfg.replica_env,
                       server={"malloc_mmap_threshold_kb": cfg.malloc_mmap_threshold_kb}) as c:
        measured = asyncio.run(_measure(cfg, c, persons, passing, flagged))
    rep: dict[str, Any] = {"config": json.loads(cfg.model_dump_json()), "environment": env, "source_store": str(src),
                           "in_process": baseline, **measured}
    rep["summary"] = summarise(rep, cfg)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    tab = table(rep)
    from core.io import atomic_write_json, atomic_write_text

    atomic_write_json(cfg.out_dir / "replicas.json", rep)
    note = (f"Replica benchmark: {cfg.replicas} replicas of `unlearn-guard serve` on one store directory, encoder "
            f"{cfg.encoder}, malloc_mmap_threshold_kb {cfg.malloc_mmap_threshold_kb}, replica env "
            f"{cfg.replica_env or '{}'}; machine: {env['cpus']} CPUs, load average at start "
            f"{env['load_avg_at_start']}, commit {env['git_commit']}. Times from sending the admin request.\n\n")
    atomic_write_text(cfg.out_dir / "replicas.md", note + tab + "\n")
    rep["table"] = tab
    return rep


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the benchmark, print the tables, write JSON and markdown."""
    p = argparse.ArgumentParser(description="Admin add -> first flagged request on every proxy replica, and a "
                                            "replica killed under load (see the module docstring).")
    p.add_argument("--replicas", type=int)
    p.add_argument("--repetitions", type=int)
    p.add_argument("--facts", type=int)
    p.add_argument("--poll-ms", type=float)
    p.add_argument("--encoder")
    p.add_argument("--detector-dir", type=Path)
    p.add_argument("--kill-seconds", type=float, help="Length of the kill-under-load run (0: skip it).")
    p.add_argument("--kill-concurrency", type=int)
    p.add_argument("--malloc-mmap-threshold-kb", type=lambda v: "none" if v.lower() == "none" else int(v),
                   help="The replicas' ServerConfig.malloc_mmap_threshold_kb (default 128; 'none': glibc's default).")
    p.add_argument("--replica-env", action="append", type=lambda s: tuple(s.split("=", 1)),
                   help="KEY=VALUE added to every replica's environment (repeatable), e.g. OMP_NUM_THREADS=1.")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    opts = {k: v for k, v in vars(args).items() if v is not None}
    if opts.get("malloc_mmap_threshold_kb") == "none":
        opts["malloc_mmap_threshold_kb"] = None
    if "replica_env" in opts:
        opts["replica_env"] = dict(opts["replica_env"])
    cfg = ReplicaBenchConfig(**opts)
    rep = run(cfg)
    print(rep["table"])
    print(f"\nJSON and markdown written to {cfg.out_dir}/replicas.{{json,md}}")
    return 0 if rep["summary"]["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

