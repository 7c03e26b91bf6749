"""HTTP layer: OpenAI schema, SSE, auth, admin, limits, metrics and the fail-closed 503."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.schema import ForgetTarget
from detectors.oracle import OracleDetector
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.config import GuardConfig, ServerConfig
from guard.server import create_app

T = ForgetTarget(id="person-000", kind="privacy", names=["Elara Voswick"],
                 policy="Do not reveal facts about Elara Voswick.", meta={"facts": {"birth_place": "Port Kestrel"}})
REFUSE = json.dumps({"requires_refusal": True, "cot_instruction": "Decline: personal details."})
KEY, ADMIN = "sk-client-123", "sk-admin-456"
H, A = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}


class Flaky(OracleDetector):
    broken = False

    def detect(self, prompt: str):  # type: ignore[no-untyped-def]
        if self.broken:
            raise RuntimeError("index offline")
        return super().detect(prompt)


def client(**server: object) -> tuple[TestClient, Flaky]:
    det = Flaky([T])
    g = GuardedLLM(ScriptedBackend(lambda m: "echo: " + m[-1]["content"]), det,
                   guard=ScriptedBackend(lambda m: REFUSE, json_schema=True), config=GuardConfig())
    cfg = ServerConfig(api_keys=[KEY], admin_key=ADMIN, **server)  # type: ignore[arg-type]
    return TestClient(create_app(g, cfg)), det


def chat(c: TestClient, content: str, **kw: object):  # type: ignore[no-untyped-def]
    return c.post("/v1/chat/completions", headers=H, json={"model": "m", "messages": [{"role": "user", "content": content}], **kw})


def test_chat_completion_schema() -> None:
    c, _ = client()
    r = chat(c, "hello")
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello"}
    assert body["choices"][0]["finish_reason"] == "stop" and "usage" in body and "guard" not in body
    assert r.headers["x-guard-flagged"] == "false"
    r2 = chat(c, "Where was Elara Voswick born?")
    assert r2.json()["choices"][0]["finish_reason"] == "content_filter" and r2.headers["x-guard-flagged"] == "true"


def test_chat_stream_is_sse_with_done() -> None:
    c, _ = client()
    r = chat(c, "one two three", stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "echo: one two three"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_completions_and_models() -> None:
    c, _ = client()
    r = c.post("/v1/completions", headers=H, json={"prompt": "The sky is", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "echo: The sky is"
    s = c.post("/v1/completions", headers=H, json={"prompt": "The sky is", "stream": True})
    assert s.text.endswith("data: [DONE]\n\n") and '"text_completion"' in s.text
    assert s.headers["x-guard-flagged"] == "false"  # streamed completions carry the guard's headers, as chat does
    f = c.post("/v1/completions", headers=H, json={"prompt": "Where was Elara Voswick born?", "stream": True})
    assert f.headers["x-guard-flagged"] == "true" and f.headers["x-guard-blocked"] == "true"
    m = c.get("/v1/models", headers=H).json()
    assert m["object"] == "list" and m["data"][0]["id"] == "unlearn-guard"


def test_auth() -> None:
    c, _ = client()
    assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 401
    bad = c.post("/v1/chat/completions", headers={"Authorization": "Bearer nope"},
                 json={"messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/admin/targets", headers=H).status_code == 401  # client key is not an admin key
    assert c.get("/healthz").status_code == 200  # probes need no key


def test_admin_disabled_without_admin_key() -> None:
    det = OracleDetector([T])
    g = GuardedLLM(ScriptedBackend(), det, guard=ScriptedBackend())
    c = TestClient(create_app(g, ServerConfig()))
    assert c.get("/admin/targets").status_code == 403
    assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 200


def test_admin_add_and_remove_targets() -> None:
    c, _ = client()
    new = {"id": "person-009", "kind": "privacy", "names": ["Tobin Quillard"], "policy": "Do not reveal facts about Tobin."}
    assert chat(c, "Who is Tobin Quillard?").json()["choices"][0]["finish_reason"] == "stop"
    r = c.post("/admin/targets", headers=A, json=new)
    assert r.status_code == 201 and r.json() == {"added": ["person-009"]}
    assert "person-009" in c.get("/admin/targets", headers=A).json()["targets"]
    assert chat(c, "Who is Tobin Quillard?").json()["choices"][0]["finish_reason"] == "content_filter"
    assert c.delete("/admin/targets/person-009", headers=A).status_code == 200
    assert c.delete("/admin/targets/person-009", headers=A).status_code == 404
    assert chat(c, "Who is Tobin Quillard?").json()["choices"][0]["finish_reason"] == "stop"
    bad = c.post("/admin/targets", headers=A, json={"id": "x y", "kind": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_limits_and_validation() -> None:
    c, _ = client(max_body_bytes=2048, max_tokens_cap=64)
    big = chat(c, "x" * 5000)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert chat(c, "hi", max_tokens=65).status_code == 400
    r = c.post("/v1/chat/completions", headers=H, json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert chat(c, "hi", n=2).status_code == 400


def test_detector_failure_is_503_openai_error_and_keys_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c, det = client()
    det.broken = True
    r = chat(c, "hello")
    assert r.status_code == 503 and r.json()["error"]["code"] == "guard_unavailable"
    s = chat(c, "hello", stream=True)
    assert s.status_code == 503
    det.broken = False
    assert chat(c, "hello").status_code == 200
    c.get("/admin/targets", headers=A)
    assert not any(KEY in r.getMessage() or ADMIN in r.getMessage() for r in caplog.records)


def test_metrics_and_readiness() -> None:
    c, _ = client()
    chat(c, "hello")
    chat(c, "Where was Elara Voswick born?")
    text = c.get("/metrics", headers=H).text  # with client keys, /metrics needs one
    assert 'guard_requests_total{endpoint="chat",status="200"} 2.0' in text
    assert "guard_flagged_total 1.0" in text and "guard_stage_seconds_bucket" in text
    assert c.get("/readyz").json() == {"status": "ready"}


def test_expose_trace() -> None:
    c, _ = client(expose_trace=True)
    body = chat(c, "Where was Elara Voswick born?").json()
    assert body["guard"]["flagged"] is True and body["guard"]["target_ids"] == ["person-000"]


_MMAP_PROBE = r"""
import ctypes, ctypes.util, sys
from guard.server import set_malloc_mmap_threshold
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = set_malloc_mmap_threshold(int(sys.argv[1])) if sys.argv[1] != "none" else False
big = libc.malloc(4 << 20)  # mapped separately under any threshold; freeing it raises glibc's adaptive one
libc.free(big)
# Many blocks, not one: a single 512 KiB block could be served from free heap space left by the imports above
# (a run of the full suite saw that), whatever the threshold.
blocks = [libc.malloc(512 << 10) for _ in range(64)]
mapped = [bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2) for p in blocks]  # chunk flag
print(applied, sum(mapped) > len(mapped) // 2)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_malloc_mmap_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    """With the threshold set, 512 KiB blocks are mapped on their own (returned to the OS when freed); with
    glibc's default, freeing a 4 MiB block raises the threshold and the same blocks stay in the heap."""
    def probe(arg: str) -> str:
        return subprocess.run([sys.executable, "-c", _MMAP_PROBE, arg], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.split()

    assert probe("128") == ["True", "True"]
    assert probe("none") == ["False", "False"]
    assert ServerConfig().malloc_mmap_threshold_kb == 128
