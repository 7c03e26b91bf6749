"""Load benchmark of the guard proxy: throughput, latency added over the bare upstream, errors, dropped
checks and memory, with the real detector on the offline benchmark.

Three processes on loopback, so that the proxy's memory is its own and the load generator does not
share its event loop: a fake OpenAI-compatible upstream (raw ASGI under uvicorn, answers
``/v1/chat/completions`` and ``/v1/completions`` at once with a fixed answer, streamed or not), the
guard proxy (``guard.server.create_app`` around a ``GuardedLLM`` whose target is the openai backend
pointed at that upstream, the real detector built from the offline benchmark with the embedded MiniLM
encoder, ``guard_mode=template`` so no guard LLM runs, output check on), and this driver
(``httpx.AsyncClient``). The detector is built once and cached (``core.models.run_dir``).

At each concurrency level the same requests (a fixed mix of unflagged retain/benign/neighbour
prompts and flagged forget prompts, chat and text completions, streamed and not) go to the upstream
directly and through the proxy, alternating in ``--rounds`` blocks so that load on the machine hits
both alike. Added latency is the proxy's percentile minus the direct percentile. A dropped check is a
successful proxy answer for which the detector or the output check did not run (or failed open):
read from each non-streamed answer's guard trace (``expose_trace``) and from the proxy's
``/metrics`` stage counters, which also cover streamed answers.

    python -m eval.bench.load                                 # 2000 requests at each of 1, 8, 32, 64
    python -m eval.bench.load --requests 200                  # quick
    python -m eval.bench.load --soak 10000                    # memory soak: RSS every 1000 requests
    python -m eval.bench.load --soak 10000 --proxy-env MALLOC_ARENA_MAX=2
    python -m eval.bench.load --saturation                    # overload: 64 clients, 4 slots, 16 queued, 2 s

Results: ``runs/bench/load/load.{json,md}`` (``soak.{json,md}`` for the soak, ``saturation.{json,md}`` for
the saturation run), and the table on stdout.
Targets (PASS/FAIL per row): no 5xx, no dropped checks, added p50 <= 15 ms and p99 <= 40 ms at
concurrency 32; soak: RSS growth over the second half of the soak (the first half is warm-up: the
encoder's allocations grow while it meets new batch sizes, then level off) under 20 MB; a leak shows
as growth that goes on, so the slope after warm-up (KB per request) is reported too.

Saturation (``--saturation``): proxy only, far more clients (``--saturation-clients``, default 64) than
upstream slots (``--proxy-max-concurrency 4``, ``--proxy-max-queue 16``) in front of an upstream that takes
``--upstream-delay-ms`` (default 200) per answer, with the proxy's request deadline
``--proxy-request-timeout-s`` (default 2). Each client sends its next request when the last one is answered,
after the 429's ``Retry-After`` when it was shed (as the OpenAI SDK does). It reports p50/p99 latency over every
answer and over the 200s, and the shares answered 200, shed with 429, timed out with 504, other 5xx and other
errors. Target: p99 over every answer <= the deadline + ``saturation_slack_ms`` (100 ms of response overhead),
no 5xx other than 504, no dropped checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.encoder_export import DEFAULT_ENCODER_BACKEND, ENCODER_BACKENDS, EncoderBackend

log = logging.getLogger("load_bench")

FIXED_ANSWER = "This is the fixed answer of the fake upstream server."
_MODEL = "fake-upstream"


class LoadConfig(BaseModel):
    """Everything a load run needs; the command-line options map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    levels: list[int] = Field(default_factory=lambda: [1, 8, 32, 64], description="Concurrency levels.")
    requests: int = Field(2000, ge=1, description="Requests per level, to each of direct and proxy.")
    rounds: int = Field(2, ge=1, description="Each level alternates direct/proxy in this many blocks.")
    warmup: int = Field(100, ge=0, description="Unmeasured requests to each server before measuring.")
    soak: int = Field(0, ge=0, description="Soak mode: this many proxy requests, RSS sampled as it goes.")
    soak_concurrency: int = Field(32, ge=1)
    soak_sample_every: int = Field(1000, ge=1)
    soak_warmup_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="Share of the soak counted as warm-up; "
                                                                        "growth is measured from its end.")
    proxy_env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the proxy process, "
                                                                         "e.g. MALLOC_ARENA_MAX=2.")
    flagged_fraction: float = Field(0.3, ge=0.0, le=1.0, description="Share of forget (flagged) prompts.")
    stream_fraction: float = Field(0.2, ge=0.0, le=1.0, description="Share of streamed requests.")
    completions_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of /v1/completions requests.")
    max_tokens: int = Field(16, ge=1)
    output_check: Literal["off", "log", "block"] = "block"
    refuse_flagged: bool = Field(False, description="Template decision refuses flagged prompts (then they never "
                                                    "reach the upstream); default: they get the template instruction.")
    batch_window_ms: float | None = Field(None, ge=0.0, description="GuardConfig.detector_batch_window_ms of the "
                                                                  "proxy (None: GuardConfig's default).")
    max_batch: int | None = Field(None, ge=1, description="GuardConfig.detector_max_batch (None: its default).")
    max_inflight: int | None = Field(None, ge=1, description="GuardConfig.detector_max_inflight (None: its default).")
    proxy_max_concurrency: int = Field(64, ge=1, description="ServerConfig.max_concurrency of the proxy.")
    malloc_mmap_threshold_kb: int | None = Field(128, ge=1, description="ServerConfig.malloc_mmap_threshold_kb of the "
                                                 "proxy, set at its start as `unlearn-guard serve` does (None: glibc's "
                                                 "default).")
    timeout_s: float = Field(60.0, gt=0, description="Client and proxy upstream timeout.")
    startup_timeout_s: float = Field(600.0, gt=0)
    seed: int = 0
    encoder: str = "minilm-l6"
    encoder_backend: EncoderBackend = Field(DEFAULT_ENCODER_BACKEND, description="DetectorConfig.encoder_backend of the "
                                 "proxy's detector (torch, onnx, onnx-int8, openvino).")
    detector_dir: Path | None = Field(None, description="Saved detector; default: a cached build under run_dir.")
    rebuild_detector: bool = False
    out_dir: Path = Path("runs/bench/load")
    target_concurrency: int = Field(32, description="The level the latency targets apply to.")
    max_added_p50_ms: float = 15.0
    max_added_p99_ms: float = 40.0
    max_rss_growth_mb: float = 20.0
    saturation: bool = Field(False, description="Saturation mode: proxy only, saturation_clients clients against "
                                                "few upstream slots and a bounded queue.")
    saturation_clients: int = Field(64, ge=1, description="Concurrent clients of the saturation run.")
    saturation_slack_ms: float = Field(100.0, ge=0, description="Response overhead allowed over the proxy's deadline "
                                                                "in the saturation target (p99 <= deadline + this).")
    honour_retry_after: bool = Field(True, description="Saturation: a shed client waits the 429's Retry-After "
                                                       "before its next request.")
    upstream_delay_ms: float | None = Field(None, ge=0, description="The fake upstream's time per answer (before its "
                                            "first byte); None: 0, or 200 in saturation mode.")
    proxy_max_queue: int | None = Field(None, ge=0, description="ServerConfig.max_queue of the proxy (None: its "
                                        "default, or 16 in saturation mode).")
    proxy_request_timeout_s: float | None = Field(None, gt=0, description="ServerConfig.request_timeout_s of the "
                                                  "proxy (None: timeout_s, or 2 in saturation mode).")
    retry_after_s: int = Field(1, ge=0, description="ServerConfig.retry_after_s of the proxy.")

    def effective(self) -> LoadConfig:
        """This config with the saturation defaults filled in (4 slots, 16 queued, 2 s deadline, 200 ms upstream)
        where saturation mode is on and the option was not given."""
        if not self.saturation:
            return self
        given = self.model_fields_set
        return self.model_copy(update={
            "upstream_delay_ms": 200.0 if self.upstream_delay_ms is None else self.upstream_delay_ms,
            "proxy_max_queue": 16 if self.proxy_max_queue is None else self.proxy_max_queue,
            "proxy_request_timeout_s": 2.0 if self.proxy_request_timeout_s is None else self.proxy_request_timeout_s,
            "proxy_max_concurrency": self.proxy_max_concurrency if "proxy_max_concurrency" in given else 4})


# ---- the fake upstream ------------------------------------------------------------------------------

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


def _chunks(text: str, n: int = 4) -> list[str]:
    """Split the answer into about ``n`` streamed deltas."""
    words = re.findall(r"\s*\S+", text)
    k = max(1, -(-len(words) // n))
    return ["".join(words[i:i + k]) for i in range(0, len(words), k)]


def make_fake_upstream(delay_s: float = 0.0) -> Callable[[dict[str, Any], ASGIReceive, ASGISend], Awaitable[None]]:
    """The fake upstream, taking ``delay_s`` per completion before its first byte (a model's time per answer)."""

    async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """The fake upstream ASGI app (see ``fake_upstream``), after its delay."""
        if delay_s and scope["type"] == "http" and scope.get("method") == "POST":
            await asyncio.sleep(delay_s)
        await fake_upstream(scope, receive, send)

    return app


async def fake_upstream(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    """A raw-ASGI OpenAI-compatible server that answers every request at once with FIXED_ANSWER."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    path, method = scope["path"], scope["method"]

    async def reply(status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    if method == "GET" and path in {"/v1/models", "/healthz"}:
        await reply(200, {"object": "list", "data": [{"id": _MODEL, "object": "model", "owned_by": "bench"}]})
        return
    if method != "POST" or path not in {"/v1/chat/completions", "/v1/completions"}:
        await reply(404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}})
        return
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        await reply(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
        return
    chat = path == "/v1/chat/completions"
    created = int(time.time())
    if not req.get("stream"):
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": FIXED_ANSWER},
                                   "finish_reason": "stop"} if chat else
                                  {"index": 0, "text": FIXED_ANSWER, "logprobs": None, "finish_reason": "stop"})
        await reply(200, {"id": "fake-1", "object": "chat.completion" if chat else "text_completion",
                          "created": created, "model": _MODEL, "choices": [choice],
                          "usage": {"prompt_tokens": 8, "completion_tokens": 10, "total_tokens": 18}})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: str | None, finish: str | None) -> bytes:
        if chat:
            d = {"content": delta} if delta is not None else {}
            c: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({'id': 'fake-1', 'object': obj, 'created': created, 'model': _MODEL, 'choices': [c]})}\n\n".encode()

    for part in _chunks(FIXED_ANSWER):
        await send({"type": "http.response.body", "body": event(part, None), "more_body": True})
    await send({"type": "http.response.body", "body": event(None, "stop"), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


# ---- child processes: upstream, proxy, detector build -----------------------------------------------

def _serve(app: Any) -> None:
    """Serve an ASGI app with uvicorn on 127.0.0.1 and a free port; the port is printed first on stdout."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                                           backlog=2048))
    server.run(sockets=[sock])


def benchmark_task(cfg: LoadConfig) -> Any:
    """The offline benchmark task the detector is built from and the prompts are drawn from."""
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark

    return generate_benchmark(BenchmarkConfig(seed=cfg.seed))


def detector_path(cfg: LoadConfig) -> Path:
    """Where the detector of this run is (or will be) saved."""
    if cfg.detector_dir is not None:
        return cfg.detector_dir
    from core.models import run_dir

    return run_dir(benchmark_task(cfg).name, f"load-bench-detector-{cfg.encoder}-{cfg.encoder_backend}")


def build_detector(cfg: LoadConfig) -> Path:
    """Build the real detector on the offline benchmark with the embedded encoder and save it (cache)."""
    from detectors.config import DetectorConfig
    from detectors.detector import Detector

    path = detector_path(cfg)
    t0 = time.perf_counter()
    det = Detector.build(benchmark_task(cfg), DetectorConfig(encoder=cfg.encoder, encoder_backend=cfg.encoder_backend))
    det.save(path)
    log.info("detector built in %.1fs and saved to %s", time.perf_counter() - t0, path)
    return path


def proxy_app(cfg: LoadConfig, upstream: str, det_dir: Path) -> Any:
    """The guard proxy under test: real detector, template guard, openai backend to the fake upstream."""
    from detectors.detector import Detector
    from guard.api import GuardedLLM
    from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend
    from guard.config import GuardConfig, ServerConfig
    from guard.server import create_app, set_malloc_mmap_threshold

    set_malloc_mmap_threshold(cfg.malloc_mmap_threshold_kb)
    det = Detector.load(det_dir)
    det.detect_batch(["warm-up prompt"])
    det.detect_leak_batch(["warm-up answer"])
    target = OpenAIHTTPBackend(OpenAIConfig(base_url=upstream, model=_MODEL, timeout_s=cfg.timeout_s))
    batching = {"detector_batch_window_ms": cfg.batch_window_ms, "detector_max_batch": cfg.max_batch,
                "detector_max_inflight": cfg.max_inflight}
    gcfg = GuardConfig(guard_mode="refuse" if cfg.refuse_flagged else "template", output_check=cfg.output_check,
                       **{k: v for k, v in batching.items() if v is not None})
    guarded = GuardedLLM(target, det, config=gcfg, targets=benchmark_task(cfg))
    limits: dict[str, Any] = {"max_queue": cfg.proxy_max_queue} if cfg.proxy_max_queue is not None else {}
    app = create_app(guarded, ServerConfig(max_concurrency=cfg.proxy_max_concurrency, expose_trace=True,
                                           model_name="guarded", retry_after_s=cfg.retry_after_s,
                                           request_timeout_s=cfg.proxy_request_timeout_s or cfg.timeout_s, **limits))

    @app.get("/bench/batch-stats")
    async def batch_stats() -> dict[str, Any]:
        return guarded.batch_stats()

    return app


@dataclass
class Child:
    """A child server process started by this run."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path


@contextlib.contextmanager
def start_child(name: str, args: list[str], out_dir: Path, health: str, timeout_s: float,
                env: dict[str, str] | None = None) -> Iterator[Child]:
    """Start ``python -m eval.bench.load --role ...``, wait for its port and health URL; stop it on exit."""
    import httpx

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "eval.bench.load", *args], stdout=subprocess.PIPE,
                                stderr=logf, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout_s
            if proc.stdout is None:
                raise RuntimeError(f"{name}: no stdout pipe")
            line = b""
            while not line.endswith(b"\n"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start (exit {proc.poll()}); see {log_path}")
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if ready:
                    line += os.read(proc.stdout.fileno(), 1)
            m = re.match(rb"LISTENING (\d+)", line)
            if not m:
                raise RuntimeError(f"{name} printed {line!r} instead of its port; see {log_path}")
            url = f"http://127.0.0.1:{int(m.group(1))}"
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not healthy (exit {proc.poll()}); see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + health, timeout=2.0).status_code == 200:
                        break
                time.sleep(0.2)
            log.info("%s up at %s (pid %d)", name, url, proc.pid)
            yield Child(name, proc, url, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ---- the load ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One request of the mix."""

    prompt: str
    flagged: bool
    endpoint: Literal["chat", "completions"]
    stream: bool

    def path_and_body(self, max_tokens: int) -> tuple[str, dict[str, Any]]:
        """URL path and JSON body (the same for the upstream and the proxy)."""
        if self.endpoint == "chat":
            return "/v1/chat/completions", {"model": _MODEL, "messages": [{"role": "user", "content": self.prompt}],
                                            "max_tokens": max_tokens, "temperature": 0, "stream": self.stream}
        return "/v1/completions", {"model": _MODEL, "prompt": self.prompt, "max_tokens": max_tokens,
                                   "temperature": 0, "stream": self.stream}


def request_mix(cfg: LoadConfig, n: int, salt: int = 0) -> list[Spec]:
    """``n`` requests drawn with the run's seed: forget prompts flagged_fraction of the time, else retain/benign."""
    task = benchmark_task(cfg)
    forget = [x for t in task.targets for qa in t.qa for x in (qa.question, qa.paraphrased_question) if x]
    other = ([q.question for q in task.retain_qa] + [q.question for q in task.neighbour_qa]
             + list(task.benign_questions))
    rng = random.Random(f"{cfg.seed}-{salt}")
    out = []
    for _ in range(n):
        flagged = rng.random() < cfg.flagged_fraction
        endpoint: Literal["chat", "completions"] = "completions" if rng.random() < cfg.completions_fraction else "chat"
        out.append(Spec(prompt=rng.choice(forget if flagged else other), flagged=flagged, endpoint=endpoint,
                        stream=rng.random() < cfg.stream_fraction))
    return out


@dataclass
class Outcome:
    """What one request got."""

    latency_s: float
    status: int  # HTTP status, 0 when the client failed before a status arrived
    ok: bool
    error: str | None = None
    dropped: bool = False
    flagged_header: str | None = None
    retry_after_s: float | None = None  # a 429's Retry-After


def _sse_text(raw: str, chat: bool) -> tuple[str, str | None]:
    """Join an SSE body's deltas; also return the error message of an error event, if any."""
    parts, err = [], None
    for line in raw.splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        data = json.loads(line[5:])
        if data.get("error"):
            err = str(data["error"].get("message", data["error"]))[:200]
            continue
        c = (data.get("choices") or [{}])[0]
        parts.append(((c.get("delta") or {}).get("content") if chat else c.get("text")) or "")
    return "".join(parts), err


def _trace_dropped(trace: dict[str, Any] | None, output_check: str) -> bool:
    """Whether a guard trace shows a skipped or failed-open check."""
    if not trace:
        return True
    t = trace.get("timings_ms", {})
    if "detect" not in t or trace.get("fail_open_used") or trace.get("errors"):
        return True
    return output_check != "off" and trace.get("output_checks", 0) < 1 and not trace.get("requires_refusal")


def read_answer(raw: str, spec: Spec) -> tuple[str, str | None, dict[str, Any] | None]:
    """(text, stream error, guard trace) of a 200 answer to ``spec``; a body that is not an OpenAI answer raises
    ValueError, KeyError, IndexError or TypeError. Streamed answers carry no trace."""
    chat = spec.endpoint == "chat"
    if spec.stream:
        text, err = _sse_text(raw, chat)
        return text, err, None
    data = json.loads(raw)
    c = data["choices"][0]
    return (c["message"]["content"] if chat else c["text"]), None, data.get("guard")


async def one_request(client: Any, spec: Spec, cfg: LoadConfig, proxy: bool) -> Outcome:
    """Send one request, read the whole answer, and judge it."""
    path, body = spec.path_and_body(cfg.max_tokens)
    t0 = time.perf_counter()
    try:
        resp = await client.post(path, json=body)
        raw = resp.text
    except Exception as e:  # noqa: BLE001 - every client-side failure is an error of this request
        return Outcome(time.perf_counter() - t0, 0, False, f"{e.__class__.__name__}: {e}"[:200])
    dt = time.perf_counter() - t0
    if resp.status_code != 200:
        retry = resp.headers.get("retry-after", "") if resp.status_code == 429 else ""
        return Outcome(dt, resp.status_code, False, raw[:200],
                       retry_after_s=float(retry) if retry.replace(".", "", 1).isdigit() else None)
    try:
        text, err, trace = read_answer(raw, spec)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Outcome(dt, 200, False, f"bad body: {e.__class__.__name__}: {e}"[:200])
    if err is not None:
        return Outcome(dt, 200, False, f"stream error: {err}")
    if text != FIXED_ANSWER:
        return Outcome(dt, 200, False, f"answer differs from the upstream's: {text[:80]!r}")
    dropped = proxy and not spec.stream and _trace_dropped(trace, cfg.output_check)
    return Outcome(dt, 200, True, dropped=dropped, flagged_header=resp.headers.get("x-guard-flagged"))


async def drive(base_url: str, specs: list[Spec], concurrency: int, cfg: LoadConfig, proxy: bool,
                pbar: Any = None, honour_retry_after: bool = False) -> tuple[list[Outcome], float]:
    """Closed loop: ``concurrency`` workers send the specs in order (a shed worker first waits the 429's
    Retry-After when ``honour_retry_after``); returns outcomes (in spec order) and wall time."""
    import httpx

    # One client (one keep-alive connection) per worker: a shared pool of many connections costs the
    # load generator more CPU per request as concurrency grows, which would slow both sides alike.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    out: list[Outcome | None] = [None] * len(specs)
    nxt = 0
    n_workers = min(concurrency, len(specs))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=base_url, limits=limits,
                                                                     timeout=cfg.timeout_s))
                   for _ in range(n_workers)]

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal nxt
            while nxt < len(specs):
                i = nxt
                nxt += 1
                o = out[i] = await one_request(client, specs[i], cfg, proxy)
                if pbar is not None:
                    pbar.update(1)
                if honour_retry_after and o.status == 429 and o.retry_after_s and nxt < len(specs):
                    await asyncio.sleep(min(o.retry_after_s, 30.0))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        wall = time.perf_counter() - t0
    return [o for o in out if o is not None], wall


# ---- proxy-side observations -----------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB."""
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


async def proxy_counters(base_url: str) -> dict[str, float]:
    """The proxy's /metrics counters this benchmark reads (stage observation counts, fail-open, requests)."""
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
        text = (await c.get("/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'guard_stage_seconds_count\{stage="(\w+)"\} (\S+)', line)
        if m:
            out[f"stage:{m.group(1)}"] = float(m.group(2))
        m = re.match(r"guard_fail_open_total (\S+)", line)
        if m:
            out["fail_open"] = float(m.group(1))
        m = re.match(r"guard_shed_total (\S+)", line)
        if m:
            out["shed"] = float(m.group(1))
        m = re.match(r'guard_errors_total\{stage="(\w+)"\} (\S+)', line)
        if m:
            out[f"error:{m.group(1)}"] = float(m.group(2))
    return out


async def batch_stats(base_url: str) -> dict[str, Any]:
    """The proxy's micro-batching counters."""
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
        return (await c.get("/bench/batch-stats")).json()


def _pct(xs: list[float], q: float) -> float:
    """The q-th percentile of latencies (seconds) in milliseconds."""
    import numpy as np

    return round(float(np.percentile(np.asarray(xs) * 1000.0, q)), 2) if xs else float("nan")


def summarise(outs: list[Outcome], wall: float) -> dict[str, Any]:
    """Throughput, latency percentiles and error counts of one side (direct or proxy)."""
    lat = [o.latency_s for o in outs if o.ok]
    errors: dict[str, int] = {}
    for o in outs:
        if not o.ok:
            key = f"{o.status}: {(o.error or '')[:60]}"
            errors[key] = errors.get(key, 0) + 1
    return {"requests": len(outs), "ok": sum(o.ok for o in outs), "wall_s": round(wall, 3),
            "throughput_rps": round(len(outs) / wall, 1) if wall > 0 else 0.0,
            "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90), "p99_ms": _pct(lat, 99),
            "status_5xx": sum(500 <= o.status < 600 for o in outs),
            "other_errors": sum((not o.ok) and not (500 <= o.status < 600) for o in outs),
            "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8])}


def dropped_checks(outs: list[Outcome], before: dict[str, float], after: dict[str, float],
                   cfg: LoadConfig) -> dict[str, int]:
    """Dropped checks of the proxy side: per-answer traces, and /metrics stage counts against answers served."""
    served = sum(o.ok for o in outs)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
    gap_detect = int(served - delta.get("stage:detect", 0.0))
    gap_output = int(served - delta.get("stage:output_check", 0.0)) if cfg.output_check != "off" and not cfg.refuse_flagged else 0
    per_answer = sum(o.dropped for o in outs)
    fail_open = int(delta.get("fail_open", 0.0))
    return {"per_answer_trace": per_answer, "metrics_detect_gap": max(0, gap_detect),
            "metrics_output_check_gap": max(0, gap_output), "fail_open": fail_open,
            "total": max(per_answer, max(0, gap_detect) + max(0, gap_output)) + fail_open}


def flag_rates(outs: list[Outcome], specs: list[Spec]) -> dict[str, float | None]:
    """Share of forget / other prompts the proxy flagged (answers that carry x-guard-flagged)."""
    def rate(flagged: bool) -> float | None:
        hs = [o.flagged_header == "true" for o, s in zip(outs, specs, strict=True)
              if s.flagged == flagged and o.flagged_header is not None]
        return round(sum(hs) / len(hs), 3) if hs else None

    return {"forget_flagged": rate(True), "other_flagged": rate(False)}


# ---- runs ------------------------------------------------------------------------------------------------

async def _warm(up: Child, px: Child, cfg: LoadConfig) -> None:
    """Unmeasured requests to both servers (connections, caches, the encoder's first batches)."""
    if cfg.warmup:
        specs = request_mix(cfg, cfg.warmup, salt=-1)
        await drive(up.url, specs, 8, cfg, proxy=False)
        await drive(px.url, specs, 8, cfg, proxy=True)


async def run_levels(cfg: LoadConfig, up: Child, px: Child) -> dict[str, Any]:
    """Every concurrency level: direct and proxy, alternating in rounds, with errors, drops and RSS."""
    from tqdm import tqdm

    await _warm(up, px, cfg)
    rows = []
    for level in cfg.levels:
        specs = request_mix(cfg, cfg.requests, salt=level)
        blocks = [specs[i::cfg.rounds] for i in range(cfg.rounds)]
        d_out: list[Outcome] = []
        p_out: list[Outcome] = []
        p_specs: list[Spec] = []
        d_wall = p_wall = 0.0
        rss0 = rss_mb(px.proc.pid)
        m0 = await proxy_counters(px.url)
        b0 = await batch_stats(px.url)
        with tqdm(total=2 * len(specs), desc=f"concurrency {level}", unit="req", leave=False) as bar:
            for blk in blocks:
                o, w = await drive(up.url, blk, level, cfg, proxy=False, pbar=bar)
                d_out += o
                d_wall += w
                o, w = await drive(px.url, blk, level, cfg, proxy=True, pbar=bar)
                p_out += o
                p_specs += blk
                p_wall += w
        m1 = await proxy_counters(px.url)
        b1 = await batch_stats(px.url)
        rss1 = rss_mb(px.proc.pid)
        direct, proxy = summarise(d_out, d_wall), summarise(p_out, p_wall)
        drops = dropped_checks(p_out, m0, m1, cfg)
        batching = {k: {"batches": b1[k]["batches"] - b0[k]["batches"], "items": b1[k]["items"] - b0[k]["items"]}
                    for k in b1}
        for v in batching.values():
            v["mean_batch"] = round(v["items"] / v["batches"], 2) if v["batches"] else 0.0
        row = {"concurrency": level, "requests": len(specs), "direct": direct, "proxy": proxy,
               "throughput_ratio": round(proxy["throughput_rps"] / direct["throughput_rps"], 3)
               if direct["throughput_rps"] else None,
               "added_p50_ms": round(proxy["p50_ms"] - direct["p50_ms"], 2),
               "added_p99_ms": round(proxy["p99_ms"] - direct["p99_ms"], 2),
               "dropped_checks": drops, "rss_before_mb": rss0, "rss_after_mb": rss1,
               "flag_rates": flag_rates(p_out, p_specs), "batching": batching}
        row["verdict"], row["failures"] = verdict(row, cfg)
        rows.append(row)
        log.info("concurrency %d: proxy %.0f req/s vs direct %.0f, added p50 %.1f ms p99 %.1f ms, %s", level,
                 proxy["throughput_rps"], direct["throughput_rps"], row["added_p50_ms"], row["added_p99_ms"],
                 row["verdict"])
    return {"rows": rows}


def verdict(row: dict[str, Any], cfg: LoadConfig) -> tuple[str, list[str]]:
    """PASS or FAIL of one level against the targets, with the reasons."""
    fails = []
    if row["proxy"]["status_5xx"]:
        fails.append(f"{row['proxy']['status_5xx']} 5xx")
    if row["dropped_checks"]["total"]:
        fails.append(f"{row['dropped_checks']['total']} dropped checks")
    if row["concurrency"] == cfg.target_concurrency:
        if not row["added_p50_ms"] <= cfg.max_added_p50_ms:
            fails.append(f"added p50 {row['added_p50_ms']} ms > {cfg.max_added_p50_ms}")
        if not row["added_p99_ms"] <= cfg.max_added_p99_ms:
            fails.append(f"added p99 {row['added_p99_ms']} ms > {cfg.max_added_p99_ms}")
    return ("FAIL" if fails else "PASS"), fails


async def run_soak(cfg: LoadConfig, up: Child, px: Child) -> dict[str, Any]:
    """Proxy only: ``soak`` requests at ``soak_concurrency``, RSS sampled every ``soak_sample_every``."""
    from tqdm import tqdm

    await _warm(up, px, cfg)
    specs = request_mix(cfg, cfg.soak, salt=10_000)
    samples = [{"after_requests": 0, "rss_mb": rss_mb(px.proc.pid)}]
    outs: list[Outcome] = []
    wall = 0.0
    m0 = await proxy_counters(px.url)
    with tqdm(total=len(specs), desc="soak", unit="req", leave=False) as bar:
        for i in range(0, len(specs), cfg.soak_sample_every):
            o, w = await drive(px.url, specs[i:i + cfg.soak_sample_every], cfg.soak_concurrency, cfg, proxy=True, pbar=bar)
            outs += o
            wall += w
            samples.append({"after_requests": len(outs), "rss_mb": rss_mb(px.proc.pid)})
    m1 = await proxy_counters(px.url)
    s = summarise(outs, wall)
    warm_end = cfg.soak_warmup_fraction * len(specs)
    base = next(x for x in samples if x["after_requests"] >= warm_end)
    after = [x for x in samples if x["after_requests"] >= base["after_requests"]]
    growth = round(samples[-1]["rss_mb"] - base["rss_mb"], 1)
    slope = None
    if len(after) >= 2:
        import numpy as np

        slope = round(float(np.polyfit([x["after_requests"] for x in after], [x["rss_mb"] for x in after], 1)[0])
                      * 1024, 3)
    drops = dropped_checks(outs, m0, m1, cfg)
    fails = []
    if s["status_5xx"]:
        fails.append(f"{s['status_5xx']} 5xx")
    if drops["total"]:
        fails.append(f"{drops['total']} dropped checks")
    if growth >= cfg.max_rss_growth_mb:
        fails.append(f"RSS grew {growth} MB after warm-up >= {cfg.max_rss_growth_mb}")
    return {"soak": {"requests": len(specs), "concurrency": cfg.soak_concurrency, "proxy": s, "samples": samples,
                     "warmup_requests": base["after_requests"], "rss_growth_after_warmup_mb": growth,
                     "rss_slope_after_warmup_kb_per_request": slope,
                     "rss_growth_after_first_sample_mb": round(samples[-1]["rss_mb"] - samples[min(1, len(samples) - 1)]["rss_mb"], 1),
                     "rss_max_mb": max(x["rss_mb"] for x in samples), "dropped_checks": drops,
                     "verdict": "FAIL" if fails else "PASS", "failures": fails}}


def classify(outs: list[Outcome]) -> dict[str, int]:
    """How many answers were 200 (valid), shed (429), timed out (504), another 5xx, or another error."""
    return {"ok_200": sum(o.ok for o in outs), "shed_429": sum(o.status == 429 for o in outs),
            "timeout_504": sum(o.status == 504 for o in outs),
            "other_5xx": sum(500 <= o.status < 600 and o.status != 504 for o in outs),
            "other_errors": sum((not o.ok) and not (500 <= o.status < 600) and o.status != 429 for o in outs)}


def saturation_summary(outs: list[Outcome], wall: float, cfg: LoadConfig) -> dict[str, Any]:
    """Latency over every answer and over the 200s, the share of each outcome, and the PASS/FAIL verdict
    (p99 over every answer within the proxy's deadline + slack, no 5xx but 504)."""
    n = max(1, len(outs))
    counts = classify(outs)
    deadline_ms = 1000.0 * (cfg.proxy_request_timeout_s or cfg.timeout_s)
    every = [o.latency_s for o in outs]
    ok = [o.latency_s for o in outs if o.ok]
    row: dict[str, Any] = {
        "clients": min(cfg.saturation_clients, len(outs)), "requests": len(outs), "max_concurrency": cfg.proxy_max_concurrency,
        "max_queue": cfg.proxy_max_queue, "deadline_ms": deadline_ms, "upstream_delay_ms": cfg.upstream_delay_ms,
        "wall_s": round(wall, 3), "throughput_rps": round(len(outs) / wall, 1) if wall > 0 else 0.0,
        "answered_200_rps": round(counts["ok_200"] / wall, 1) if wall > 0 else 0.0,
        "p50_ms": _pct(every, 50), "p99_ms": _pct(every, 99), "max_ms": _pct(every, 100),
        "p50_ms_200": _pct(ok, 50), "p99_ms_200": _pct(ok, 99), **counts,
        "share": {k: round(v / n, 4) for k, v in counts.items()}}
    fails = []
    if not row["p99_ms"] <= deadline_ms + cfg.saturation_slack_ms:
        fails.append(f"p99 {row['p99_ms']} ms > deadline {deadline_ms:g} ms + {cfg.saturation_slack_ms:g} ms")
    if counts["other_5xx"]:
        fails.append(f"{counts['other_5xx']} 5xx other than 504")
    row["verdict"], row["failures"] = ("FAIL" if fails else "PASS"), fails
    return row


async def run_saturation(cfg: LoadConfig, up: Child, px: Child) -> dict[str, Any]:
    """Proxy only: ``requests`` requests from ``saturation_clients`` clients against few upstream slots."""
    from tqdm import tqdm

    await _warm(up, px, cfg)
    specs = request_mix(cfg, cfg.requests, salt=20_000)
    m0 = await proxy_counters(px.url)
    with tqdm(total=len(specs), desc=f"saturation, {cfg.saturation_clients} clients", unit="req", leave=False) as bar:
        outs, wall = await drive(px.url, specs, cfg.saturation_clients, cfg, proxy=True, pbar=bar,
                                 honour_retry_after=cfg.honour_retry_after)
    m1 = await proxy_counters(px.url)
    row = saturation_summary(outs, wall, cfg)
    row["proxy_shed_counter"] = int(m1.get("shed", 0.0) - m0.get("shed", 0.0))
    row["dropped_checks"] = dropped_checks(outs, m0, m1, cfg)
    if row["dropped_checks"]["total"]:
        row["failures"].append(f"{row['dropped_checks']['total']} dropped checks")
        row["verdict"] = "FAIL"
    row["error_kinds"] = summarise(outs, wall)["error_kinds"]
    log.info("saturation: p99 %.0f ms (deadline %.0f ms), 200 %.1f%%, 429 %.1f%%, 504 %.1f%% -> %s", row["p99_ms"],
             row["deadline_ms"], 100 * row["share"]["ok_200"], 100 * row["share"]["shed_429"],
             100 * row["share"]["timeout_504"], row["verdict"])
    return {"saturation": row}


def saturation_table(rep: dict[str, Any]) -> str:
    """The markdown table of a saturation run."""
    r = rep["saturation"]
    sh = {k: f"{100 * v:.1f}%" for k, v in r["share"].items()}
    head = ("| clients | requests | slots | queue | deadline ms | upstream ms | req/s | 200/s | p50 ms | p99 ms | "
            "p50 ms (200) | p99 ms (200) | 200 | 429 shed | 504 timeout | other 5xx | other | verdict |")
    row = (f"| {r['clients']} | {r['requests']} | {r['max_concurrency']} | {r['max_queue']} | {r['deadline_ms']:g} | "
           f"{r['upstream_delay_ms']:g} | {r['throughput_rps']} | {r['answered_200_rps']} | {r['p50_ms']} | "
           f"{r['p99_ms']} | {r['p50_ms_200']} | {r['p99_ms_200']} | {sh['ok_200']} | {sh['shed_429']} | "
           f"{sh['timeout_504']} | {sh['other_5xx']} | {sh['other_errors']} | "
           f"{r['verdict']}{' (' + '; '.join(r['failures']) + ')' if r['failures'] else ''} |")
    return "\n".join([head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|", row, "",
                      f"429s counted by the proxy (guard_shed_total): {r['proxy_shed_counter']}; dropped checks: "
                      f"{r['dropped_checks']['total']}; latency over every answer, 429s and 504s included."])


def levels_table(rep: dict[str, Any]) -> str:
    """The markdown table of a levels run."""
    head = ("| concurrency | requests | direct req/s | proxy req/s | ratio | direct p50 ms | direct p99 ms | "
            "proxy p50 ms | proxy p99 ms | added p50 ms | added p99 ms | 5xx | other errors | dropped checks | "
            "proxy RSS before/after MB | verdict |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rep["rows"]:
        d, p = r["direct"], r["proxy"]
        lines.append(f"| {r['concurrency']} | {r['requests']} | {d['throughput_rps']} | {p['throughput_rps']} | "
                     f"{r['throughput_ratio']} | {d['p50_ms']} | {d['p99_ms']} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{r['added_p50_ms']} | {r['added_p99_ms']} | {p['status_5xx']} | {p['other_errors']} | "
                     f"{r['dropped_checks']['total']} | {r['rss_before_mb']} / {r['rss_after_mb']} | "
                     f"{r['verdict']}{' (' + '; '.join(r['failures']) + ')' if r['failures'] else ''} |")
    return "\n".join(lines)


def soak_table(rep: dict[str, Any]) -> str:
    """The markdown table of a soak run."""
    s = rep["soak"]
    lines = ["| after requests | proxy RSS MB |", "|---|---|"]
    lines += [f"| {x['after_requests']} | {x['rss_mb']} |" for x in s["samples"]]
    p = s["proxy"]
    lines.append("")
    lines.append(f"soak: {s['requests']} requests at concurrency {s['concurrency']}: {p['throughput_rps']} req/s, "
                 f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, 5xx {p['status_5xx']}, other errors "
                 f"{p['other_errors']}, dropped checks {s['dropped_checks']['total']}; RSS growth after the "
                 f"warm-up ({s['warmup_requests']} requests) {s['rss_growth_after_warmup_mb']} MB, slope "
                 f"{s['rss_slope_after_warmup_kb_per_request']} KB/request (after the first sample: "
                 f"{s['rss_growth_after_first_sample_mb']} MB) -> {s['verdict']}"
                 f"{' (' + '; '.join(s['failures']) + ')' if s['failures'] else ''}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Where the figures were taken (they depend on it)."""
    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "niceness": os.nice(0), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "git_commit": commit}


def run(cfg: LoadConfig) -> dict[str, Any]:
    """Build or load the detector, start the upstream and the proxy, run the load, write JSON and markdown."""
    cfg = cfg.effective()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    det_dir = detector_path(cfg)
    cfg_json = cfg.model_dump_json()
    if cfg.rebuild_detector or not (det_dir / "meta.json").exists():
        log.info("building the detector (cached afterwards) in %s", det_dir)
        res = subprocess.run([sys.executable, "-m", "eval.bench.load", "--role", "build-detector",
                              "--config-json", cfg_json], check=False)
        if res.returncode != 0:
            raise RuntimeError("detector build failed")
    env = environment()
    t0 = time.perf_counter()
    with start_child("upstream", ["--role", "upstream", "--config-json", cfg_json], cfg.out_dir, "/v1/models",
                     cfg.startup_timeout_s) as up, \
            start_child("proxy", ["--role", "proxy", "--config-json", cfg_json, "--upstream", up.url + "/v1",
                                  "--detector-path", str(det_dir)], cfg.out_dir, "/readyz", cfg.startup_timeout_s,
                        env=cfg.proxy_env) as px:
        rep = _run_async(run_soak(cfg, up, px) if cfg.soak else
                         run_saturation(cfg, up, px) if cfg.saturation else run_levels(cfg, up, px))
    rep = {"config": json.loads(cfg_json), "environment": env, "detector_dir": str(det_dir),
           "seconds": round(time.perf_counter() - t0, 1), **rep}
    name = "soak" if cfg.soak else "saturation" if cfg.saturation else "load"
    table = soak_table(rep) if cfg.soak else saturation_table(rep) if cfg.saturation else levels_table(rep)
    from core.io import atomic_write_json, atomic_write_text

    atomic_write_json(cfg.out_dir / f"{name}.json", rep)
    note = (f"Guard proxy load benchmark ({name}); machine: {env['cpus']} CPUs, nice {env['niceness']}, "
            f"OMP_NUM_THREADS={env['omp_num_threads']}, load average at start {env['load_avg_at_start']}, "
            f"commit {env['git_commit']}; proxy: encoder {cfg.encoder} ({cfg.encoder_backend}), malloc_mmap_threshold_kb "
            f"{cfg.malloc_mmap_threshold_kb}, env {cfg.proxy_env or '{}'}.\n"
            "Added latency = proxy percentile - direct percentile, same requests, same concurrency, same run.\n\n")
    atomic_write_text(cfg.out_dir / f"{name}.md", note + table + "\n")
    rep["table"] = table
    return rep


def _run_async(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run the load on uvloop where it is installed (less client overhead), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(coro)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Load benchmark of the guard proxy against the bare upstream: throughput, "
                                            "added latency, errors, dropped checks and memory (see the module docstring).")
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   help="Comma-separated concurrency levels (default 1,8,32,64).")
    p.add_argument("--requests", type=int, help="Requests per level to each side (default 2000).")
    p.add_argument("--rounds", type=int, help="Direct/proxy alternations per level (default 2).")
    p.add_argument("--warmup", type=int, help="Unmeasured requests first (default 100).")
    p.add_argument("--soak", type=int, help="Soak mode: this many proxy requests (e.g. 10000).")
    p.add_argument("--soak-concurrency", type=int)
    p.add_argument("--soak-sample-every", type=int)
    p.add_argument("--soak-warmup-fraction", type=float, help="Share of the soak counted as warm-up (default 0.5).")
    p.add_argument("--proxy-env", action="append", type=lambda s: tuple(s.split("=", 1)),
                   help="KEY=VALUE added to the proxy's environment (repeatable), e.g. MALLOC_ARENA_MAX=2.")
    p.add_argument("--flagged-fraction", type=float)
    p.add_argument("--stream-fraction", type=float)
    p.add_argument("--completions-fraction", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--output-check", choices=["off", "log", "block"])
    p.add_argument("--refuse-flagged", action="store_true", default=None)
    p.add_argument("--batch-window-ms", type=float)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-inflight", type=int)
    p.add_argument("--proxy-max-concurrency", type=int, help="The proxy's max_concurrency (default 64; 4 with "
                                                              "--saturation).")
    p.add_argument("--saturation", action="store_true", default=None,
                   help="Saturation run: proxy only, --saturation-clients clients against few upstream slots.")
    p.add_argument("--saturation-clients", type=int, help="Clients of the saturation run (default 64).")
    p.add_argument("--saturation-slack-ms", type=float, help="Allowed over the deadline at p99 (default 100).")
    p.add_argument("--no-retry-after", dest="honour_retry_after", action="store_false", default=None,
                   help="Saturation: a shed client sends its next request at once instead of after Retry-After.")
    p.add_argument("--upstream-delay-ms", type=float, help="The fake upstream's time per answer (default 0; 200 "
                                                           "with --saturation).")
    p.add_argument("--proxy-max-queue", type=int, help="The proxy's max_queue (default: its own; 16 with "
                                                       "--saturation).")
    p.add_argument("--proxy-request-timeout-s", type=float, help="The proxy's request_timeout_s (default --timeout-s; "
                                                                 "2 with --saturation).")
    p.add_argument("--retry-after-s", type=int, help="The proxy's retry_after_s (default 1).")
    p.add_argument("--malloc-mmap-threshold-kb", type=lambda v: "none" if v.lower() == "none" else int(v),
                   help="The proxy's ServerConfig.malloc_mmap_threshold_kb (default 128; 'none': glibc's default).")
    p.add_argument("--timeout-s", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--encoder")
    p.add_argument("--encoder-backend", choices=ENCODER_BACKENDS)
    p.add_argument("--detector-dir", type=Path)
    p.add_argument("--rebuild-detector", action="store_true", default=None)
    p.add_argument("--out-dir", type=Path, help="Results directory (default runs/bench/load).")
    p.add_argument("--role", choices=["driver", "upstream", "proxy", "build-detector"], default="driver",
                   help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    p.add_argument("--detector-path", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the benchmark (or, internally, one of its server processes)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.role == "upstream":
        delay_ms = LoadConfig.model_validate_json(args.config_json).upstream_delay_ms if args.config_json else None
        _serve(make_fake_upstream((delay_ms or 0.0) / 1000.0))
        return 0
    internal = {"role", "config_json", "upstream", "detector_path"}
    if args.config_json:
        cfg = LoadConfig.model_validate_json(args.config_json)
    else:
        opts = {k: v for k, v in vars(args).items() if v is not None and k not in internal}
        if "proxy_env" in opts:
            opts["proxy_env"] = dict(opts["proxy_env"])
        if opts.get("malloc_mmap_threshold_kb") == "none":
            opts["malloc_mmap_threshold_kb"] = None
        cfg = LoadConfig(**opts)
    if args.role == "build-detector":
        build_detector(cfg)
        return 0
    if args.role == "proxy":
        _serve(proxy_app(cfg, args.upstream, args.detector_path))
        return 0
    rep = run(cfg)
    print(rep["table"])
    name = "soak" if cfg.soak else "saturation" if cfg.saturation else "load"
    print(f"\nJSON and markdown written to {cfg.out_dir}/{name}.{{json,md}}")
    if not cfg.soak and not cfg.saturation:
        for r in rep["rows"]:
            print(f"concurrency {r['concurrency']}: flag rate forget {r['flag_rates']['forget_flagged']}, other "
                  f"{r['flag_rates']['other_flagged']}; batching {r['batching']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
