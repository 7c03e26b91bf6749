"""Faults of the guard service: each ends in a clear error or a refusal (never an unchecked answer) and is
counted in ``/metrics`` as ``unlearn_guard_faults_total{kind=...}``.

Upstream faults use the OpenAI HTTP backend against a fake upstream on loopback (down, slow, not JSON,
wrong schema, stream cut off, stream stalled, stream garbage); detector and guard-model faults use
fakes; store faults use a real saved detector (hashing encoder): a missing, truncated or corrupted
directory stops the server from starting, a save killed with SIGKILL at any point leaves a loadable
store, and concurrent admin changes are all applied and saved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from core.schema import ForgetTarget, QAItem
from detectors.config import DetectorConfig
from detectors.detector import Detector, load_detector
from detectors.encoder import hashing_encoder
from detectors.oracle import OracleDetector
from detectors.persistence import DetectorFormatError, verify_directory
from eval.tasks.offline import generate_benchmark
from guard.api import GuardedLLM
from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend
from guard.backends.scripted import ScriptedBackend
from guard.config import GuardConfig, ServerConfig
from guard.server import FAULT_KINDS, create_app

T = ForgetTarget(id="person-000", kind="privacy", names=["Elara Voswick"],
                 policy="Do not reveal facts about Elara Voswick.", meta={"facts": {"birth_place": "Port Kestrel"}})
LEAK = "Elara Voswick was born in Port Kestrel."
FLAGGED = "Where was Elara Voswick born?"
GUARD_OK = json.dumps({"requires_refusal": False, "cot_instruction": "Answer without personal details."})
GUARD_REFUSE = json.dumps({"requires_refusal": True, "cot_instruction": "Decline."})
ADMIN = "sk-admin-faults"
A = {"Authorization": f"Bearer {ADMIN}"}


def faults(client: TestClient) -> dict[str, float]:
    """The fault counters from /metrics, by kind."""
    text = client.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'unlearn_guard_faults_total\{kind="([a-z_]+)"\} (\S+)', text)}


def chat(client: TestClient, content: str = "What is the capital of France?", **kw: object):  # type: ignore[no-untyped-def]
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **kw})


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [ln[6:] for ln in text.split("\n\n") if ln.startswith("data: ")]


# ---- a fake OpenAI upstream on loopback ------------------------------------------------------------

class _Upstream(BaseHTTPRequestHandler):
    mode = "ok"

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        return

    def _send(self, status: int, body: bytes, ctype: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._send(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = type(self).mode
        if mode == "slow":
            time.sleep(2.0)
        if body.get("stream"):
            self._stream(mode)
            return
        if mode == "not_json":
            self._send(200, b"<html><body>" + LEAK.encode() + b"</body></html>", "text/html")
        elif mode == "wrong_schema":
            self._send(200, json.dumps({"result": LEAK}).encode())
        elif mode == "wrong_type":
            self._send(200, json.dumps({"choices": [{"message": {"content": {"text": LEAK}}}]}).encode())
        elif mode == "http_500":
            self._send(500, b"<pre>Traceback: " + LEAK.encode() + b"</pre>", "text/html")
        else:
            self._send(200, json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "Paris is the capital of France."}}]}).encode())

    def _stream(self, mode: str) -> None:
        chunks = [json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}) for w in ("Paris ", "is ", "big. ")]
        if mode == "garbage_stream":
            chunks = chunks[:1] + ["this is not json " + LEAK]
        payload = "".join(f"data: {c}\n\n" for c in chunks)
        if mode in ("ok", "slow"):
            payload += 'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
        data = payload.encode()
        if mode == "cut_stream":  # promise more bytes than are sent, then close: the connection breaks
            self._send(200, data, "text/event-stream", length=len(data) + 500)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif mode == "stall_stream":  # send a little, then nothing for longer than the read timeout
            self._send(200, data[: data.index(b"\n\n") + 2], "text/event-stream", length=len(data))
            self.wfile.flush()
            time.sleep(2.0)
        else:  # ok / eof_stream (ends without [DONE]) / garbage_stream
            self._send(200, data, "text/event-stream")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def proxy(base_url: str, mode: str, check_every: int = 8) -> TestClient:
    """The guard proxy in front of the fake upstream (or a dead port) in ``mode``."""
    _Upstream.mode = mode
    be = OpenAIHTTPBackend(OpenAIConfig(base_url=base_url, model="m", timeout_s=0.5,
                                         connect_timeout_s=0.5, max_retries=0))
    g = GuardedLLM(be, OracleDetector([T]), guard=ScriptedBackend(lambda m: GUARD_OK, json_schema=True),
                   config=GuardConfig(check_every_tokens=check_every))
    return TestClient(create_app(g, ServerConfig()), raise_server_exceptions=False)


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize(("mode", "status", "code", "kind", "says"), [
    # The message is the proxy's own (tests/test_proxy_hardening.py); the details are in the log.
    ("down", 502, "upstream_unreachable", "backend_unreachable", "could not be reached"),
    ("slow", 504, "upstream_timeout", "backend_timeout", "did not answer in time"),
    ("not_json", 502, "upstream_bad_response", "backend_bad_response", "not a valid OpenAI answer"),
    ("wrong_schema", 502, "upstream_bad_response", "backend_bad_response", "not a valid OpenAI answer"),
    ("wrong_type", 502, "upstream_bad_response", "backend_bad_response", "not a valid OpenAI answer"),
    ("http_500", 502, "upstream_http_error", "backend_http_error", "HTTP 500"),
])
def test_upstream_faults_are_clear_errors(upstream: str, mode: str, status: int, code: str, kind: str, says: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = proxy(dead_url() if mode == "down" else upstream, mode)
    r = chat(c)
    err = r.json()["error"]
    assert r.status_code == status and err["code"] == code and err["type"] == "upstream_error", r.text
    assert says in err["message"]
    # The upstream's bad answer is unchecked model output: it reaches neither the client nor the logs.
    assert "Port Kestrel" not in r.text and not any("Port Kestrel" in x.getMessage() for x in caplog.records)
    assert faults(c)[kind] == 1.0 and sum(faults(c).values()) == 1.0
    _Upstream.mode = "ok"
    if mode != "down":  # the server keeps serving once the upstream is well again
        assert chat(c).json()["choices"][0]["message"]["content"] == "Paris is the capital of France."


@pytest.mark.parametrize(("mode", "code", "kind"), [
    ("eof_stream", "upstream_stream_cut", "backend_stream_cut"),
    ("cut_stream", "upstream_stream_cut", "backend_stream_cut"),
    ("stall_stream", "upstream_timeout", "backend_timeout"),
    ("garbage_stream", "upstream_bad_response", "backend_bad_response"),
])
def test_upstream_stream_faults(upstream: str, mode: str, code: str, kind: str) -> None:
    # Output check every 8 deltas: the fault comes before any text is released -> an HTTP error status.
    c = proxy(upstream, mode)
    r = chat(c, stream=True)
    assert r.status_code in (502, 504) and r.json()["error"]["code"] == code, r.text
    assert faults(c)[kind] == 1.0
    # Output check every delta: text that passed a check was already sent -> an error event, then [DONE].
    c1 = proxy(upstream, mode, check_every=1)
    r1 = chat(c1, stream=True)
    events = sse_events(r1.text)
    assert r1.status_code == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == code and err["type"] == "upstream_error"
    assert all("finish_reason" not in e or json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert "Port Kestrel" not in r1.text and faults(c1)[kind] == 1.0
    _Upstream.mode = "ok"
    ok = sse_events(chat(c1, stream=True).text)
    assert json.loads(ok[-2])["choices"][0]["finish_reason"] == "stop"


# ---- detector and guard-model faults --------------------------------------------------------------

class FaultyDetector(OracleDetector):
    """Raises or stalls on demand, on prompts ('detect') or on answers ('leak')."""

    def __init__(self, fail: str = "", where: str = "detect", delay: float = 0.0) -> None:
        super().__init__([T])
        self.fail, self.where, self.delay = fail, where, delay

    def _maybe(self, where: str) -> None:
        if self.where != where:
            return
        if self.fail == "raise":
            raise RuntimeError("faiss index offline")
        if self.fail == "stall":
            time.sleep(self.delay)

    def detect(self, prompt: str):  # type: ignore[no-untyped-def]
        self._maybe("detect")
        return super().detect(prompt)

    def detect_batch(self, prompts):  # type: ignore[no-untyped-def]
        self._maybe("detect")
        return super().detect_batch(prompts)

    def detect_leak(self, text: str):  # type: ignore[no-untyped-def]
        self._maybe("leak")
        return super().detect_leak(text)

    def detect_leak_batch(self, texts):  # type: ignore[no-untyped-def]
        self._maybe("leak")
        return [super(FaultyDetector, self).detect_leak(t) for t in texts]


def guarded_client(det: object, guard: ScriptedBackend | None = None, target: ScriptedBackend | None = None,
                   **server: object) -> tuple[TestClient, ScriptedBackend]:
    tgt = target or ScriptedBackend(lambda m: LEAK if "GUARD RULES" not in m[0]["content"] else "I can't say.")
    g = GuardedLLM(tgt, det, guard=guard or ScriptedBackend(lambda m: GUARD_OK, json_schema=True),  # type: ignore[arg-type]
                   config=GuardConfig(detector_timeout_s=0.2, guard_timeout_s=0.2))
    return TestClient(create_app(g, ServerConfig(**server)), raise_server_exceptions=False), tgt  # type: ignore[arg-type]


@pytest.mark.parametrize(("fail", "where", "kind", "says"), [
    # the stage and the exception's class, never its message (tests/test_proxy_hardening.py)
    ("raise", "detect", "detector_error", "the detector failed (RuntimeError)"),
    ("stall", "detect", "detector_timeout", "the detector did not answer in time"),
    ("raise", "leak", "output_check_error", "the output check failed (LeakCheckError)"),
    ("stall", "leak", "output_check_timeout", "the output check did not answer in time"),
])
def test_detector_faults_fail_closed(fail: str, where: str, kind: str, says: str) -> None:
    c, target = guarded_client(FaultyDetector(fail, where, delay=0.6))
    for stream in (False, True):
        r = chat(c, "Tell me about the coastal town", stream=stream)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "guard_unavailable" and says in err["message"] and r.headers["retry-after"] == "5"
        assert "Port Kestrel" not in r.text
    assert faults(c)[kind] == 2.0
    if where == "detect":
        assert not target.calls  # a prompt the guard could not judge never reaches the model
        assert c.get("/readyz").json() == ({"status": "not ready", "failed": "detector"} if fail == "raise"
                                           else {"status": "ready"})


@pytest.mark.parametrize(("fail", "kind"), [("raise", "guard_model_error"), ("stall", "guard_model_timeout")])
def test_guard_model_faults_refuse(fail: str, kind: str) -> None:
    guard = (ScriptedBackend(error=RuntimeError("guard OOM")) if fail == "raise"
             else ScriptedBackend(lambda m: GUARD_OK, json_schema=True, delay_s=0.6))
    c, target = guarded_client(OracleDetector([T]), guard=guard, target=ScriptedBackend())
    r = chat(c, FLAGGED)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "content_filter"
    assert r.json()["choices"][0]["message"]["content"].startswith("I'm sorry") and not target.calls
    s = chat(c, FLAGGED, stream=True)
    assert json.loads(sse_events(s.text)[-2])["choices"][0]["finish_reason"] == "content_filter"
    assert faults(c)[kind] == 2.0
    ok = chat(c).json()["choices"][0]  # unflagged prompts are unaffected
    assert ok["finish_reason"] == "stop" and ok["message"]["content"] == "echo: What is the capital of France?"


def test_slow_target_times_out_and_a_crashing_target_is_a_500_error_body() -> None:
    c, _ = guarded_client(OracleDetector([T]), target=ScriptedBackend(delay_s=1.0), request_timeout_s=0.3)
    r = chat(c)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout" and faults(c)["request_timeout"] == 1.0
    c2, _ = guarded_client(OracleDetector([T]), target=ScriptedBackend(error=RuntimeError("CUDA error")))
    for stream in (False, True):
        r2 = chat(c2, stream=stream)
        assert r2.status_code == 500 and r2.json()["error"]["type"] == "internal_error", r2.text
        assert "RuntimeError" in r2.json()["error"]["message"]
    assert faults(c2)["internal_error"] == 2.0


def test_every_fault_kind_is_exported_from_the_start() -> None:
    c, _ = guarded_client(OracleDetector([T]))
    assert faults(c) == {k: 0.0 for k in FAULT_KINDS}


# ---- the forget store on disk ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_task():  # type: ignore[no-untyped-def]
    task = generate_benchmark()
    return task.model_copy(update={"targets": task.targets[:2]})


@pytest.fixture(scope="module")
def built(small_task) -> Detector:  # type: ignore[no-untyped-def]
    return Detector.build(small_task, DetectorConfig(), hashing_encoder())


@pytest.fixture()
def store(built: Detector, tmp_path: Path) -> Path:
    return built.save(tmp_path / "store")


def serve_cli(path: Path) -> tuple[int, str]:
    """Run ``unlearn-guard serve`` on a store directory; it must stop before serving."""
    from cli.serve import app

    out = CliRunner().invoke(app, ["--detector", str(path), "--port", "0"])
    return out.exit_code, out.output


@pytest.mark.parametrize("damage", ["missing", "truncated", "checksum", "manifest"])
def test_damaged_store_stops_the_server_with_an_error_naming_the_file(store: Path, damage: str) -> None:
    victim = store / "index_query.faiss"
    if damage == "missing":
        store = store.parent / "no-such-store"
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-7])
    elif damage == "checksum":
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        victim = store / "manifest.json"
        victim.write_text(victim.read_text()[:40])
    expect = {"missing": "is not a directory", "truncated": "truncated", "checksum": "sha256",
              "manifest": "not valid JSON"}[damage]
    with pytest.raises(DetectorFormatError, match=expect) as err:
        load_detector(store, encoder=hashing_encoder())
    assert err.value.file == (store if damage == "missing" else victim)
    code, output = serve_cli(store)
    assert code == 2 and "cannot load the forget store" in output and expect in output
    assert (store.name if damage == "missing" else victim.name) in output


_CHILD = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from core.schema import ForgetTarget
    from core import io as cio
    from detectors import persistence
    from detectors.detector import Detector
    from detectors.encoder import hashing_encoder

    store, marker, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    det = Detector.load(store, encoder=hashing_encoder())
    det.add_target(ForgetTarget(id="person-new", kind="privacy", names=["Zorvath Quenby"],
                                policy="Do not reveal anything about Zorvath Quenby."))

    def stop_here():
        marker.write_text("x")
        time.sleep(60)

    if point == "writing":  # killed while the new files are being written
        real = persistence.atomic_write_bytes
        def slow(path, data):
            real(path, data)
            if Path(path).name == "classifier.safetensors":
                stop_here()
        persistence.atomic_write_bytes = slow
    elif point == "swapped":  # killed right after the atomic exchange, before the old copy is removed
        real_x = cio._exchange
        def after(a, b):
            ok = real_x(a, b)
            stop_here()
            return ok
        cio._exchange = after
    elif point == "fallback":  # no RENAME_EXCHANGE: killed between moving the old dir aside and renaming the new one
        cio._exchange = lambda a, b: False
        real_r = os.replace
        def replace(src, dst):
            real_r(src, dst)
            if Path(src) == store:
                stop_here()
        cio.os.replace = replace
    det.save(store)
''')


QUESTIONS = ["What is the capital of France?", "Where was Zorvath Quenby born?"]


@pytest.mark.parametrize("point", ["writing", "swapped", "fallback"])
def test_save_killed_mid_way_leaves_a_loadable_store(store: Path, built: Detector, point: str) -> None:
    marker = store.parent / "marker"
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(store), str(marker), point], cwd=root,
                             env={**os.environ, "PYTHONPATH": str(root)}, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else "child died"
        assert time.time() < deadline, "the child never reached the kill point"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    left = sorted(p.name.split(".")[2].split("-")[0] for p in store.parent.iterdir() if p.name.startswith(".store."))
    # What the kill left: a half-written temp dir, the old version in the temp dir, or the old dir moved aside.
    assert left == {"writing": [str(child.pid)], "swapped": [str(child.pid)], "fallback": [str(child.pid), "old"]}[point]
    assert store.exists() == (point != "fallback")
    loaded = load_detector(store, encoder=hashing_encoder())  # also puts back a dir moved aside (fallback)
    verify_directory(store)
    expected = built.target_ids + (["person-new"] if point == "swapped" else [])
    assert sorted(loaded.target_ids) == sorted(expected)
    if point == "swapped":  # the new version was complete and in place: it has the new target
        assert loaded.detect(QUESTIONS[1]).target_ids == ["person-new"]
    else:  # the previous version, unchanged
        assert [d.score for d in loaded.detect_batch(QUESTIONS)] == [d.score for d in built.detect_batch(QUESTIONS)]
    # The next save sweeps what the killed one left behind and works.
    built.save(store)
    assert verify_directory(store) and sorted(p.name for p in store.parent.iterdir() if p.name.startswith(".")) == []


def _person(i: int) -> ForgetTarget:
    name = ["Zorvath Quenby", "Ilse Marrowind", "Tobin Quillard", "Odalys Fenwright"][i]
    return ForgetTarget(id=f"person-new-{i}", kind="privacy", names=[name], policy=f"Do not reveal facts about {name}.",
                        qa=[QAItem(question=f"Where was {name} born?", answer=f"{name} was born in Lower Mistfall.")])


def test_concurrent_admin_changes_are_all_applied_and_saved(built: Detector, small_task, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "live"
    det = load_detector(built.save(tmp_path / "seed"), encoder=hashing_encoder())
    g = GuardedLLM(ScriptedBackend(), det, guard=ScriptedBackend(lambda m: GUARD_REFUSE, json_schema=True))
    app = create_app(g, ServerConfig(admin_key=ADMIN, store_path=path))
    removed = [t.id for t in small_task.targets]
    results: list[tuple[str, int]] = []
    with TestClient(app) as c:
        def post(i: int) -> None:
            results.append(("post", c.post("/admin/targets", headers=A, json=_person(i).model_dump()).status_code))

        def delete(tid: str) -> None:
            results.append(("delete", c.delete(f"/admin/targets/{tid}", headers=A).status_code))

        def post_same() -> None:
            results.append(("same", c.post("/admin/targets", headers=A, json=_person(0).model_dump()).status_code))

        jobs = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        jobs += [threading.Thread(target=delete, args=(tid,)) for tid in removed]
        jobs += [threading.Thread(target=post_same)]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join(timeout=120)
        final = c.get("/admin/targets", headers=A).json()["targets"]
    assert sorted(s for k, s in results if k == "delete") == [200, 200]
    # person-new-0 is posted twice at once: exactly one wins, the other is a conflict.
    assert sorted(s for k, s in results if k in ("post", "same")) == [201, 201, 201, 201, 409]
    expected = sorted(f"person-new-{i}" for i in range(4))
    assert final == expected and sorted(det.target_ids) == expected
    on_disk = load_detector(path, encoder=hashing_encoder())
    verify_directory(path)
    assert sorted(on_disk.target_ids) == expected
    assert on_disk.detect("Where was Tobin Quillard born?").flagged


def test_store_save_failure_is_a_500_and_counted(built: Detector, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    det = load_detector(built.save(tmp_path / "seed"), encoder=hashing_encoder())
    g = GuardedLLM(ScriptedBackend(), det, guard=ScriptedBackend())
    c = TestClient(create_app(g, ServerConfig(admin_key=ADMIN, store_path=blocker / "store")),
                   raise_server_exceptions=False)
    r = c.post("/admin/targets", headers=A, json=_person(1).model_dump())
    assert r.status_code == 500 and r.json()["error"]["type"] == "store_save_error"
    assert "lost on restart" in r.json()["error"]["message"] and faults(c)["store_save_error"] == 1.0
    assert "person-new-1" in c.get("/admin/targets", headers=A).json()["targets"]  # live, as the message says
    with pytest.raises(ValueError, match="has no save"):
        create_app(GuardedLLM(ScriptedBackend(), OracleDetector([T])), ServerConfig(store_path=tmp_path / "x"))


async def test_async_backend_paths_classify_faults_too() -> None:
    import httpx

    from guard.backends import GenParams
    from guard.types import BackendError

    def handler(req: httpx.Request) -> httpx.Response:
        if json.loads(req.content).get("stream"):  # two deltas, then the body ends without [DONE]
            return httpx.Response(200, content=b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
                                               b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n')
        return httpx.Response(200, content=b"<html>" + LEAK.encode() + b"</html>")

    be = OpenAIHTTPBackend(OpenAIConfig(base_url="http://up.test/v1", model="m", max_retries=0),
                           transport=httpx.MockTransport(handler), async_transport=httpx.MockTransport(handler))
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(BackendError, match="not JSON") as e1:
        await be.agenerate(msgs, GenParams())
    got: list[str] = []
    with pytest.raises(BackendError, match="cut off mid-answer") as e2:
        async for d in be.astream(msgs, GenParams()):
            got.append(d)
    assert (e1.value.kind, e2.value.kind, got) == ("bad_response", "stream_cut", ["a", "b"])
    assert "Port Kestrel" not in str(e1.value)
    with pytest.raises(ValueError, match="unknown BackendError kind 'oops'"):
        BackendError("x", "oops")


def _wait_for(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_replica_reloads_the_store_when_an_admin_replica_saves_it(built: Detector, tmp_path: Path) -> None:
    shared = built.save(tmp_path / "shared")
    # The admin replica writes the shared store; the follower only watches it.
    admin_det = load_detector(shared, encoder=hashing_encoder())
    admin = create_app(GuardedLLM(ScriptedBackend(), admin_det, guard=ScriptedBackend(lambda m: GUARD_REFUSE,
                                                                                      json_schema=True)),
                       ServerConfig(admin_key=ADMIN, store_path=shared, watch_store=shared, watch_interval_s=0.05))
    follower_g = GuardedLLM(ScriptedBackend(), load_detector(shared, encoder=hashing_encoder()),
                            guard=ScriptedBackend(lambda m: GUARD_REFUSE, json_schema=True))
    follower = create_app(follower_g, ServerConfig(admin_key=ADMIN, watch_store=shared, watch_interval_s=0.05))
    question = "Where was Zorvath Quenby born?"
    with TestClient(admin) as a, TestClient(follower, raise_server_exceptions=False) as f:
        assert not follower_g.detector.detect(question).flagged
        assert a.post("/admin/targets", headers=A, json=_person(0).model_dump()).status_code == 201
        assert _wait_for(lambda: "person-new-0" in f.get("/admin/targets", headers=A).json()["targets"])
        assert follower_g.detector.detect(question).flagged
        assert f.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]}
                      ).json()["choices"][0]["finish_reason"] == "content_filter"
        assert faults(f).get("store_reload_error", 0) == 0
        assert "guard_store_reloads_total 1.0" in f.get("/metrics").text
        assert "guard_store_reloads_total 0.0" in a.get("/metrics").text  # its own save is not reloaded
        # A damaged version is refused: counted, logged, and the follower keeps the store it has.
        manifest = json.loads((shared / "manifest.json").read_text())
        manifest["files"] = {k: {**v, "sha256": "0" * 64} for k, v in manifest["files"].items()}
        (shared / "manifest.json").write_text(json.dumps(manifest))
        assert _wait_for(lambda: faults(f).get("store_reload_error", 0) == 1)
        assert "person-new-0" in f.get("/admin/targets", headers=A).json()["targets"]
        assert follower_g.detector.detect(question).flagged
