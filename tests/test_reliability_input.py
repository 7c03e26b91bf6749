"""Bad input to the guard proxy: every malformed request gets a 4xx whose OpenAI error body names the field,
never a 5xx, and the server keeps serving afterwards.

A table of named cases (each with its exact status, ``param`` and message), property-based tests with
hypothesis over bodies, fields, messages, ``max_tokens`` and Unicode, and a schemathesis fuzz run over
the app's OpenAPI schema (``eval.bench.fuzz``; examples per operation and mode from
``$UNLEARN_GUARD_FUZZ_EXAMPLES``, default 40; the figures are printed). Hypothesis examples per
property: ``$UNLEARN_GUARD_PROPERTY_EXAMPLES`` (default 100).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.schema import ForgetTarget
from detectors.oracle import OracleDetector
from eval.bench.fuzz import FuzzConfig, examples_from_env, run_fuzz
from guard.api import GuardedLLM
from guard.backends.scripted import ScriptedBackend
from guard.config import ServerConfig
from guard.server import create_app

T = ForgetTarget(id="person-000", kind="privacy", names=["Elara Voswick"], policy="Do not reveal facts about Elara.")
KEY = "sk-input"
H = {"Authorization": f"Bearer {KEY}"}
CAP, MAX_BODY, MAX_CHARS, MAX_MSGS = 512, 64_000, 20_000, 8
OK_CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
# Examples per property: $UNLEARN_GUARD_PROPERTY_EXAMPLES (default 100; about 1 s per 100 on a laptop core).
PROPERTY = settings(max_examples=int(os.environ.get("UNLEARN_GUARD_PROPERTY_EXAMPLES", "100")), deadline=None,
                    database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def client() -> TestClient:
    g = GuardedLLM(ScriptedBackend(), OracleDetector([T]), guard=ScriptedBackend())
    cfg = ServerConfig(api_keys=[KEY], admin_key=KEY, max_tokens_cap=CAP, max_body_bytes=MAX_BODY,
                       max_prompt_chars=MAX_CHARS, max_messages=MAX_MSGS)
    return TestClient(create_app(g, cfg), raise_server_exceptions=False)


def post(c: TestClient, body: Any = None, raw: bytes | None = None, path: str = "/v1/chat/completions",
         ctype: str = "application/json"):  # type: ignore[no-untyped-def]
    """POST a JSON body, or raw bytes with a content type."""
    if raw is None:
        raw = json.dumps(body).encode()
    return c.post(path, content=raw, headers={**H, "content-type": ctype})


def assert_error(r: Any, status: int | None = None) -> dict[str, Any]:
    """An OpenAI error body with a message (and, below 413, the field it is about); returns the error."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert isinstance(err["param"], str) and err["param"], err
    return err


def still_serving(c: TestClient) -> None:
    r = post(c, OK_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: What is the capital of France?"


def chat_with(**fields: Any) -> dict[str, Any]:
    return {**OK_CHAT, **fields}


def deep(n: int) -> Any:
    v: Any = "x"
    for _ in range(n):
        v = {"a": [v]}
    return v


# (name, request, status, param, words the message must contain). The table in the report is built from it.
CASES: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("malformed JSON", {"raw": b'{"messages": [{"role": "user"'}, 400, "body", "not valid JSON"),
    ("invalid UTF-8 bytes", {"raw": b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'}, 400, "body",
     "not valid UTF-8"),
    ("lone surrogate escape", {"raw": b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'}, 400,
     "messages.0.content", "surrogate"),
    ("JSON nested 20k deep", {"raw": b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"}, 400, "body",
     "too deeply"),
    ("body not JSON content type", {"raw": json.dumps(OK_CHAT).encode(), "ctype": "text/plain"}, 400, "body",
     "Content-Type: application/json"),
    ("body is a list", {"body": [OK_CHAT]}, 400, "body", "must be a JSON object"),
    ("empty object", {"body": {}}, 400, "messages", "required"),
    ("messages not a list", {"body": chat_with(messages="hi")}, 400, "messages", "valid list"),
    ("empty messages", {"body": chat_with(messages=[])}, 400, "messages", "at least 1"),
    ("empty content", {"body": chat_with(messages=[{"role": "user", "content": ""}])}, 400, "messages",
     "no text"),
    ("whitespace content", {"body": chat_with(messages=[{"role": "user", "content": " \n\t"}])}, 400, "messages",
     "no text"),
    ("content is a number", {"body": chat_with(messages=[{"role": "user", "content": 42}])}, 400,
     "messages.0.content", "must be a string"),
    ("deeply nested content part", {"body": chat_with(messages=[{"role": "user", "content": [
        {"type": "text", "text": deep(50)}]}])}, 400, "messages.0.content", "needs a string 'text'"),
    ("image content part", {"body": chat_with(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}])}, 400, "messages", "non-text content"),
    ("unknown content part", {"body": chat_with(messages=[{"role": "user", "content": [
        {"type": "hologram", "hologram": {}}]}])}, 400, "messages.0.content", "accepted part types"),
    ("unknown role", {"body": chat_with(messages=[{"role": "wizard", "content": "hi"}])}, 400, "messages.0.role",
     "'user'"),
    ("role of wrong type", {"body": chat_with(messages=[{"role": 7, "content": "hi"}])}, 400, "messages.0.role",
     "'system'"),
    ("tool role without its call id", {"body": chat_with(messages=[{"role": "tool", "content": "hi"}])}, 400,
     "messages.0", "needs tool_call_id"),
    ("unknown message field", {"body": chat_with(messages=[{"role": "user", "content": "hi", "x": 1}])}, 400,
     "messages.0.x", "unknown field"),
    ("tool call without a function", {"body": chat_with(messages=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, {"role": "user", "content": "hi"}])},
     400, "messages.0.tool_calls.0.function", "required"),
    ("tool calls on a user turn", {"body": chat_with(messages=[{"role": "user", "content": "hi", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])}, 400, "messages.0",
     "belong on an assistant"),
    ("too many messages", {"body": chat_with(messages=[{"role": "user", "content": "hi"}] * (MAX_MSGS + 1))}, 400,
     "messages", "at most"),
    ("huge message (over the body limit)", {"body": chat_with(messages=[{"role": "user", "content": "x" * MAX_BODY}])},
     413, "body", "limit"),
    ("huge message (over the text limit)", {"body": chat_with(messages=[{"role": "user", "content": "x" * (MAX_CHARS + 1)}])},
     400, "messages", "over this server's limit"),
    ("max_tokens negative", {"body": chat_with(max_tokens=-1)}, 400, "max_tokens", "greater than or equal to 1"),
    ("max_tokens zero", {"body": chat_with(max_tokens=0)}, 400, "max_tokens", "greater than or equal to 1"),
    ("max_tokens 10**12", {"body": chat_with(max_tokens=10**12)}, 400, "max_tokens", "cap"),
    ("max_tokens 10**40", {"body": chat_with(max_tokens=10**40)}, 400, "max_tokens", "cap"),
    ("max_tokens fractional", {"body": chat_with(max_tokens=1.5)}, 400, "max_tokens", "valid integer"),
    ("max_tokens string", {"body": chat_with(max_tokens="5")}, 400, "max_tokens", "valid integer"),
    ("max_tokens true", {"body": chat_with(max_tokens=True)}, 400, "max_tokens", "valid integer"),
    ("max_completion_tokens 10**12", {"body": chat_with(max_completion_tokens=10**12)}, 400,
     "max_completion_tokens", "cap"),
    ("temperature NaN", {"raw": json.dumps(chat_with(temperature=math.nan)).encode()}, 400, "temperature", "finite"),
    ("temperature 3", {"body": chat_with(temperature=3)}, 400, "temperature", "less than or equal to 2"),
    ("stream as string", {"body": chat_with(stream="yes")}, 400, "stream", "valid boolean"),
    ("n over the cap", {"body": chat_with(n=9)}, 400, "n", "cap of 8"),
    ("17 stop strings", {"body": chat_with(stop=["a"] * 17)}, 400, "stop", "at most 16"),
    ("seed 2**70", {"body": chat_with(seed=2**70)}, 400, "seed", "less than or equal to"),
    ("unknown top-level field", {"body": chat_with(foo={"bar": deep(30)})}, 400, "foo", "unknown field"),
    ("a tool without its function", {"body": chat_with(tools=[{"type": "function"}])}, 400, "tools.0.function",
     "required"),
    ("tools on a local backend", {"body": chat_with(tools=[{"type": "function", "function": {"name": "f"}}])}, 400,
     "tools", "backends that implement it: openai"),
    ("top_logprobs without logprobs", {"body": chat_with(top_logprobs=2)}, 400, "top_logprobs", "needs logprobs"),
    ("unknown response format", {"body": chat_with(response_format={"type": "xml"})}, 400, "response_format.type",
     "'json_schema'"),
    ("a vendor field that reaches the model unscored", {"body": chat_with(documents=[{"text": "x"}])}, 400,
     "documents", "cannot score"),
    ("completions: two prompts", {"path": "/v1/completions", "body": {"prompt": ["a", "b"]}}, 400, "prompt",
     "exactly one"),
    ("completions: empty prompt", {"path": "/v1/completions", "body": {"prompt": ""}}, 400, "prompt", "no text"),
    ("completions: prompt a number", {"path": "/v1/completions", "body": {"prompt": 5}}, 400, "prompt",
     "valid string"),
    ("completions: echo", {"path": "/v1/completions", "body": {"prompt": "a", "echo": True}}, 400, "echo",
     "not supported"),
    ("completions: max_tokens 10**12", {"path": "/v1/completions", "body": {"prompt": "a", "max_tokens": 10**12}},
     400, "max_tokens", "cap"),
    ("admin: malformed JSON", {"path": "/admin/targets", "raw": b"{oops"}, 400, "body", "not valid JSON"),
    ("admin: empty list", {"path": "/admin/targets", "body": []}, 400, "targets", "no targets"),
    ("admin: target without names", {"path": "/admin/targets", "body": {"id": "p1", "kind": "privacy", "policy": "x"}},
     400, "names", "required"),
    ("admin: bad id", {"path": "/admin/targets", "body": {"id": "a b", "kind": "privacy", "names": ["A"],
                                                          "policy": "x"}}, 400, "id", "pattern"),
    ("admin: existing id", {"path": "/admin/targets", "body": T.model_dump()}, 409, "id", "already exist"),
    ("admin: duplicate ids", {"path": "/admin/targets", "body": [
        {"id": "p2", "kind": "privacy", "names": ["A B"], "policy": "x"}] * 2}, 400, "id", "duplicate"),
    ("admin: lone surrogate", {"path": "/admin/targets", "raw": b'{"id": "p3", "kind": "privacy", "names": ["\\udc00"],'
                                                           b' "policy": "x"}'}, 400, "0.names.0", "surrogate"),
]


@pytest.mark.parametrize(("name", "req", "status", "param", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_case(client: TestClient, name: str, req: dict[str, Any], status: int, param: str,
                        says: str) -> None:
    path = req.get("path", "/v1/chat/completions")
    r = post(client, req.get("body"), req.get("raw"), path, req.get("ctype", "application/json"))
    err = assert_error(r, status)
    assert err["param"] == param and says in err["message"], err
    still_serving(client)


# ---- properties ------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=20)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stop",
          "seed", "user", "logprobs", "tools", "response_format", "metadata", "frequency_penalty"]


@PROPERTY
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_are_4xx(client: TestClient, raw: bytes) -> None:
    assert_error(post(client, raw=raw))


@PROPERTY
@given(body=JSON)
def test_arbitrary_json_bodies_are_4xx(client: TestClient, body: Any) -> None:
    assert_error(post(client, body))


@PROPERTY
@given(field=st.sampled_from(FIELDS) | st.text(min_size=1, max_size=12), value=JSON)
def test_any_value_in_any_field_is_accepted_or_names_the_field(client: TestClient, field: str, value: Any) -> None:
    r = post(client, {**OK_CHAT, field: value})
    if r.status_code == 200:
        return
    err = assert_error(r)
    assert err["param"] == field or err["param"].startswith(field + "."), (field, err)
    assert err["param"] in err["message"], err


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard", ""]) | JSON},
    optional={"content": st.text(max_size=30) | JSON | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]) | JSON}, optional={"text": st.text(max_size=10) | JSON}),
        max_size=3), "name": JSON, "x": JSON})


@PROPERTY
@given(messages=st.lists(MESSAGE, max_size=MAX_MSGS + 2) | JSON)
def test_malformed_messages_name_the_message_field(client: TestClient, messages: Any) -> None:
    r = post(client, {"messages": messages})
    if r.status_code == 200:
        return
    err = assert_error(r)
    assert err["param"].startswith("messages"), err


@PROPERTY
@given(value=st.integers(min_value=-10**15, max_value=10**15) | st.floats(allow_nan=False, allow_infinity=False))
def test_max_tokens_is_in_range_or_refused(client: TestClient, value: float) -> None:
    r = post(client, {**OK_CHAT, "max_tokens": value})
    integral = isinstance(value, int) or float(value).is_integer()
    if integral and 1 <= value <= CAP:
        assert r.status_code == 200
    else:
        err = assert_error(r, 400)
        assert err["param"] == "max_tokens"


@PROPERTY
@given(text=st.text(st.characters(codec=None, exclude_categories=()), max_size=40))
def test_unicode_text_is_answered_unless_empty_or_not_unicode(client: TestClient, text: str) -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()  # surrogates go as \\udXXX
    r = post(client, raw=raw)
    try:
        text.encode("utf-8")
        valid = True
    except UnicodeEncodeError:
        valid = False
    if valid and text.strip():
        assert r.status_code == 200, r.text
    else:
        err = assert_error(r, 400)
        assert err["param"] == ("messages.0.content" if not valid else "messages")


def test_server_keeps_serving_after_the_properties(client: TestClient) -> None:
    still_serving(client)
    metrics = client.get("/metrics", headers=H).text  # with client keys, /metrics needs one
    assert 'guard_error_responses_total{code="invalid_value",endpoint="chat",status="400"}' in metrics


# ---- schemathesis over the OpenAPI schema ----------------------------------------------------------

def test_schemathesis_fuzz_finds_no_5xx(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_fuzz(FuzzConfig(examples=examples_from_env()))
    with capsys.disabled():
        print(f"\n[fuzz] {report.summary()}")
    assert report.server_errors == 0, report.failures
    assert report.requests >= report.distinct_inputs > 50
    for op in ("POST /v1/chat/completions", "POST /v1/completions", "POST /admin/targets"):
        counts = report.per_operation[op]
        assert sum(counts.values()) > 10 and any(c.startswith("2") for c in counts), (op, counts)
        assert any(c.startswith("4") for c in counts), (op, counts)


def test_fuzz_examples_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNLEARN_GUARD_FUZZ_EXAMPLES", "7")
    assert examples_from_env() == 7
    monkeypatch.setenv("UNLEARN_GUARD_FUZZ_EXAMPLES", "many")
    with pytest.raises(ValueError, match="positive integer, got 'many'"):
        examples_from_env()
    monkeypatch.setenv("UNLEARN_GUARD_FUZZ_EXAMPLES", "0")
    with pytest.raises(ValueError, match="positive integer, got 0"):
        examples_from_env()
    with pytest.raises(ValueError, match="unknown fuzz mode 'wild'"):
        run_fuzz(FuzzConfig(examples=1, modes=["wild"]))
