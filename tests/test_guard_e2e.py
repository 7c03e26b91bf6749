"""End to end on loopback: the guard proxy (uvicorn, 127.0.0.1, random port) in front of a real upstream,
driven by the official ``openai`` client and by LangChain.

Fast tests use the project's own server with a tiny model as upstream; slow tests use the embedded
SmolLM2 behind the project's server and behind ``vllm serve`` (skipped when vllm is not importable).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from core.schema import ForgetTarget
from detectors.oracle import OracleDetector
from guard.api import GuardedLLM
from guard.backends import GenParams
from guard.backends.openai_http import OpenAIConfig, OpenAIHTTPBackend
from guard.backends.vllm import vllm_server
from guard.config import GuardConfig, ServerConfig
from guard.langchain import GuardRunnable
from guard.server import create_app

openai = pytest.importorskip("openai")

T = ForgetTarget(id="person-000", kind="privacy", names=["Elara Voswick"],
                 policy="Do not reveal personal information about Elara Voswick.",
                 meta={"facts": {"birth_place": "Port Kestrel", "profession": "glassblower"}})
FLAGGED = "Where was Elara Voswick born?"
UP_KEY, PROXY_KEY = "sk-upstream", "sk-proxy"


@contextlib.contextmanager
def serve(app: object) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on 127.0.0.1 and a free port; yield its /v1 base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("uvicorn did not start within 30s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def proxy_app(upstream: str, model: str, guard_mode: str = "llm") -> tuple[object, GuardedLLM]:
    """The guard proxy: upstream model as target and as guard LLM (structured output requested)."""
    be = OpenAIHTTPBackend(OpenAIConfig(base_url=upstream, model=model, api_key=UP_KEY,
                                         timeout_s=120, max_retries=1))
    g = GuardedLLM(be, OracleDetector([T]), config=GuardConfig(max_new_tokens=16, guard_max_new_tokens=48,
                                                               guard_mode=guard_mode, guard_timeout_s=120))  # type: ignore[arg-type]
    return create_app(g, ServerConfig(api_keys=[PROXY_KEY], admin_key="sk-admin", model_name="guarded")), g


def exercise_proxy(base: str, max_tokens: int = 12) -> dict[str, object]:
    """Talk to the proxy with the official openai client: plain, streamed, flagged; return what it saw."""
    client = openai.OpenAI(base_url=base, api_key=PROXY_KEY, timeout=180, max_retries=0)
    plain = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                           max_tokens=max_tokens, temperature=0)
    assert plain.choices[0].finish_reason in {"stop", "length"}
    stream = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    flagged = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": FLAGGED}],
                                             max_tokens=max_tokens, temperature=0)
    text = flagged.choices[0].message.content or ""
    assert "Port Kestrel" not in text
    fstream = client.chat.completions.create(model="guarded", messages=[{"role": "user", "content": FLAGGED}],
                                             max_tokens=max_tokens, temperature=0, stream=True)
    ftext = "".join(c.choices[0].delta.content or "" for c in fstream if c.choices)
    assert "Port Kestrel" not in ftext
    comp = client.completions.create(model="guarded", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert isinstance(comp.choices[0].text, str)
    assert [m.id for m in client.models.list().data] == ["guarded"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    return {"plain": plain.choices[0].message.content, "streamed": streamed,
            "flagged": text, "flagged_finish": flagged.choices[0].finish_reason}


def exercise_langchain(base: str) -> None:
    """LangChain through the proxy: ChatOpenAI (if installed) and a Runnable chain."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{q}")])
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:
        ChatOpenAI = None  # noqa: N806
    if ChatOpenAI is not None:
        llm = ChatOpenAI(base_url=base, api_key=PROXY_KEY, model="guarded", max_tokens=8, temperature=0, max_retries=0)
        chain = prompt | llm | StrOutputParser()
        assert isinstance(chain.invoke({"q": "What is 2+2?"}), str)
        assert "Port Kestrel" not in "".join(chain.stream({"q": FLAGGED}))
    # The guard's own Runnable over the same proxy (an OpenAI upstream for GuardedLLM).
    inner = GuardedLLM(OpenAIHTTPBackend(OpenAIConfig(base_url=base, model="guarded",
                                                       api_key=PROXY_KEY, timeout_s=120)),
                       OracleDetector([T]), config=GuardConfig(guard_mode="refuse", max_new_tokens=8))
    chain2 = prompt | GuardRunnable(inner) | StrOutputParser()
    assert chain2.invoke({"q": FLAGGED}).startswith("I'm sorry")
    assert isinstance("".join(chain2.stream({"q": "What is 2+2?"})), str)


# ---- fast: the project's own server (tiny model) as upstream -------------------------------------

@pytest.fixture(scope="module")
def tiny_upstream() -> Iterator[str]:
    from core.models import tiny_llm
    from guard.backends.transformers import TransformersBackend

    plain = GuardedLLM(TransformersBackend(tiny_llm(1)), OracleDetector([]), config=GuardConfig(output_check="off"))
    with serve(create_app(plain, ServerConfig(api_keys=[UP_KEY]))) as url:
        yield url


def test_proxy_in_front_of_own_server_with_openai_client(tiny_upstream: str) -> None:
    app, _ = proxy_app(tiny_upstream, "tiny")
    with serve(app) as base:
        seen = exercise_proxy(base, max_tokens=6)
        assert seen["flagged_finish"] == "content_filter"
        exercise_langchain(base)
        r = httpx.get(base.replace("/v1", "/readyz"), timeout=10)
        assert r.status_code == 200
        metrics = httpx.get(base.replace("/v1", "/metrics"), timeout=10,
                            headers={"Authorization": f"Bearer {PROXY_KEY}"}).text  # keys set: /metrics needs one
        assert 'guard_requests_total{endpoint="chat",status="200"}' in metrics


def test_proxy_reports_upstream_down_as_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    be = OpenAIHTTPBackend(OpenAIConfig(base_url=dead, model="x", max_retries=0, connect_timeout_s=1))
    app = create_app(GuardedLLM(be, OracleDetector([T]), config=GuardConfig(guard_mode="refuse")), ServerConfig())
    with serve(app) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 502
        assert httpx.get(base.replace("/v1", "/readyz"), timeout=10).status_code == 503


# ---- slow: the embedded SmolLM2 ------------------------------------------------------------------

@pytest.mark.slow
def test_proxy_in_front_of_own_server_with_smollm2() -> None:
    from guard.backends.transformers import TransformersBackend, TransformersConfig

    target = TransformersBackend.from_config(TransformersConfig())
    plain = GuardedLLM(target, OracleDetector([]), config=GuardConfig(output_check="off"))
    with serve(create_app(plain, ServerConfig(api_keys=[UP_KEY]))) as up:
        bare = target.generate([{"role": "user", "content": "What is the capital of France?"}],
                               GenParams(max_new_tokens=8)).text
        app, _ = proxy_app(up, "smollm2")
        with serve(app) as base:
            seen = exercise_proxy(base, max_tokens=8)
            assert seen["plain"] == bare  # unflagged: identical to the bare model (greedy)
            assert seen["streamed"].strip() == bare
            exercise_langchain(base)


def _vllm_installed() -> bool:
    """Cheap collection-time check; the tests import vllm themselves and skip if that fails."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _require_vllm() -> None:
    from guard.backends.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vllm is installed but does not import here")


@pytest.fixture(scope="module")
def vllm_up() -> Iterator[str]:
    """One ``vllm serve`` of the embedded model for this module's tests."""
    from core.models import convert_embedded

    if not _vllm_installed():
        pytest.skip("vllm (optional extra) is not installed")
    _require_vllm()
    with vllm_server(str(convert_embedded()), api_key=UP_KEY,
                     extra_args=("--enable-auto-tool-choice", "--tool-call-parser", "hermes")) as up:
        yield up


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_installed(), reason="vllm (optional extra) is not installed")
def test_proxy_in_front_of_vllm_serve(vllm_up: str) -> None:
    up = vllm_up
    app, g = proxy_app(up, "smollm2")
    with serve(app) as base:
        seen = exercise_proxy(base, max_tokens=8)
        exercise_langchain(base)
    # vLLM honours response_format json_schema: the guard LLM's output is valid JSON straight away.
    dec, source, reason = g.cot.decide(FLAGGED, [T])
    assert g.target.supports_json_schema and source == "llm", reason
    direct = httpx.post(f"{up}/chat/completions", headers={"Authorization": f"Bearer {UP_KEY}"}, timeout=120,
                        json={"model": "smollm2", "max_tokens": 8, "temperature": 0,
                              "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
    assert seen["plain"] == direct["choices"][0]["message"]["content"]


SEARCH = {"type": "function", "function": {"name": "web_search", "description": "Search the web for a query.",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                          "required": ["query"]}}}


def forced_call(query: str) -> dict[str, object]:
    """vLLM's own constrained decoding (``structured_outputs``, a vendor field the proxy forwards) makes the model write
    this hermes tool call, which vLLM's parser returns as a real tool call: what a tool-using model would send."""
    text = '<tool_call>\n{"name": "web_search", "arguments": ' + json.dumps({"query": query}) + "}\n</tool_call>"
    return {"structured_outputs": {"choice": [text]}}


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_installed(), reason="vllm (optional extra) is not installed")
def test_tool_calling_through_the_proxy_against_vllm_serve(vllm_up: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The official openai client and langchain-openai's bind_tools through the guard in front of ``vllm serve
    --enable-auto-tool-choice --tool-call-parser hermes``: tool calls come back, streamed and not; a forget fact in a
    tool result or in a tool call's argument never reaches the client, whose refusal is a well-formed response."""
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    be = OpenAIHTTPBackend(OpenAIConfig(base_url=vllm_up, model="smollm2", api_key=UP_KEY, timeout_s=120, max_retries=0))
    g = GuardedLLM(be, OracleDetector([T]), config=GuardConfig(guard_mode="refuse", max_new_tokens=100))
    app = create_app(g, ServerConfig(api_keys=[PROXY_KEY], model_name="guarded"))
    report: list[str] = []
    with serve(app) as base:
        client = openai.OpenAI(base_url=base, api_key=PROXY_KEY, timeout=180, max_retries=0)
        ask = [{"role": "user", "content": "Search the web for the weather in Paris."}]
        # 1. a tool call the model chose freely (named tool choice), not streamed and streamed
        res = client.chat.completions.create(model="guarded", messages=ask, tools=[SEARCH], max_tokens=100, temperature=0,
                                             tool_choice={"type": "function", "function": {"name": "web_search"}})
        free = res.choices[0].message.tool_calls
        assert free and free[0].function.name == "web_search", res
        report.append(f"named tool choice: {free[0].function.name}({free[0].function.arguments}) "
                      f"finish={res.choices[0].finish_reason}")
        chunks = list(client.chat.completions.create(model="guarded", messages=ask, tools=[SEARCH], max_tokens=100,
                                                     temperature=0, stream=True, extra_body=forced_call("Paris weather")))
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        args = "".join(d.function.arguments or "" for d in deltas)
        assert deltas[0].function.name == "web_search" and json.loads(args) == {"query": "Paris weather"}
        report.append(f"streamed: {deltas[0].function.name}({args}) in {len(chunks)} chunks, "
                      f"finish={[c.choices[0].finish_reason for c in chunks if c.choices][-1]}")
        # 2. a forget fact in a tool call's argument: the prompt is harmless, vLLM writes the fact, the check blocks it
        leak = forced_call("Elara Voswick was born in Port Kestrel")
        for stream in (False, True):
            kw = dict(model="guarded", messages=[{"role": "user", "content": "Search the web for my colleague's "
                                                  "home town."}], tools=[SEARCH], max_tokens=100, temperature=0,
                      extra_body=leak)
            if stream:
                text = "".join(str(c.model_dump()) for c in client.chat.completions.create(stream=True, **kw))
                assert "Port Kestrel" not in text and "content_filter" in text, text
            else:
                r = client.chat.completions.create(**kw)
                ch = r.choices[0]
                assert ch.finish_reason == "content_filter" and not ch.message.tool_calls and ch.message.refusal
                assert "Port Kestrel" not in r.model_dump_json()
                report.append(f"fact in a tool-call argument: finish={ch.finish_reason}, refusal={ch.message.refusal!r}")
        direct = httpx.post(f"{vllm_up}/chat/completions", headers={"Authorization": f"Bearer {UP_KEY}"}, timeout=120,
                            json={"model": "smollm2", "max_tokens": 100, "temperature": 0, "tools": [SEARCH],
                                  "messages": [{"role": "user", "content": "Search the web for my colleague's home "
                                                "town."}], **leak}).json()
        assert "Port Kestrel" in direct["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]  # bare vLLM
        # 3. a forget fact in a tool result (retrieved private data): the conversation is flagged and refused
        history = [*ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "web_search", "arguments": '{"query": "x"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Elara Voswick was born in Port Kestrel."}]
        r = client.chat.completions.create(model="guarded", messages=history, tools=[SEARCH], max_tokens=30,
                                           temperature=0)
        assert r.choices[0].finish_reason == "content_filter" and "Port Kestrel" not in r.model_dump_json()
        report.append(f"fact in a tool result: finish={r.choices[0].finish_reason}")
        # 4. langchain-openai: bind_tools, tool results as ToolMessages, the guard's refusal as an AIMessage
        llm = ChatOpenAI(base_url=base, api_key=PROXY_KEY, model="guarded", max_tokens=100, temperature=0, max_retries=0)

        @tool
        def web_search(query: str) -> str:
            """Search the web for a query."""
            return "sunny"

        bound = llm.bind_tools([web_search], extra_body=forced_call("Paris weather"))
        msg = bound.invoke([HumanMessage("Search the web for the weather in Paris.")])
        assert isinstance(msg, AIMessage) and msg.tool_calls[0]["name"] == "web_search"
        assert msg.tool_calls[0]["args"] == {"query": "Paris weather"}
        streamed = None
        for part in bound.stream([HumanMessage("Search the web for the weather in Paris.")]):
            streamed = part if streamed is None else streamed + part
        assert streamed is not None and streamed.tool_calls[0]["args"] == {"query": "Paris weather"}
        report.append(f"langchain bind_tools: {msg.tool_calls[0]['name']}({msg.tool_calls[0]['args']}), streamed "
                      f"{streamed.tool_calls[0]['args']}")
        blocked = llm.bind_tools([web_search], extra_body=leak).invoke([HumanMessage("Search the web for my "
                                                                                     "colleague's home town.")])
        assert not blocked.tool_calls and "Port Kestrel" not in str(blocked)
        assert blocked.response_metadata["finish_reason"] == "content_filter"
        refused = llm.bind_tools([web_search]).invoke([
            HumanMessage("Search the web for the weather in Paris."),
            AIMessage("", tool_calls=[{"id": "call_1", "name": "web_search", "args": {"query": "x"}}]),
            ToolMessage("Elara Voswick was born in Port Kestrel.", tool_call_id="call_1")])
        assert refused.response_metadata["finish_reason"] == "content_filter" and "Port Kestrel" not in str(refused)
        report.append(f"langchain, fact in argument / tool result: {blocked.response_metadata['finish_reason']} / "
                      f"{refused.response_metadata['finish_reason']}")
        metrics = httpx.get(f"{base[:-3]}/metrics", headers={"Authorization": f"Bearer {PROXY_KEY}"}).text
    blocked_calls = next(ln for ln in metrics.splitlines() if ln.startswith('guard_output_blocked_total{part="tool_call"}'))
    assert float(blocked_calls.split()[-1]) == 3  # openai client (2) and langchain (1)
    report.append(blocked_calls)
    with capsys.disabled():
        print("\n[vllm tool calling through the guard]\n  " + "\n  ".join(report))


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_installed(), reason="vllm (optional extra) is not installed")
def test_vllm_in_process_backend() -> None:
    _require_vllm()
    from core.guard_format import GUARD_JSON_SCHEMA
    from guard.backends.vllm import VLLMBackend

    be = VLLMBackend("smollm2-135m-instruct")
    try:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        outs = be.generate_batch([msgs, [{"role": "user", "content": "Name a colour."}]], GenParams(max_new_tokens=8))
        assert len(outs) == 2 and all(o.completion_tokens > 0 for o in outs)
        assert "".join(be.stream(msgs, GenParams(max_new_tokens=8))).strip() == outs[0].text
        js = be.generate(msgs, GenParams(max_new_tokens=48, json_schema=GUARD_JSON_SCHEMA)).text
        data = json.loads(js) if js.rstrip().endswith("}") else None
        assert data is None or isinstance(data.get("requires_refusal"), bool)
        g = GuardedLLM(be, OracleDetector([T]), config=GuardConfig(max_new_tokens=8, guard_max_new_tokens=48))
        assert g.generate(msgs).text == outs[0].text
        res = g.generate(FLAGGED)
        assert "Port Kestrel" not in res.text and res.trace.flagged
    finally:
        be.close()
