"""Any OpenAI-compatible HTTP server as a backend (vLLM serve, llama.cpp server, our own proxy...).

httpx with separate connect/read timeouts; connect errors, 429 and 5xx are retried with backoff
(never after a stream has started). ``response_format`` json_schema is sent for structured output;
an upstream that rejects it (HTTP 400) is remembered and asked without it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from guard.backends.base import BACKENDS, Backend, GenOutput, GenParams, Messages
from guard.config import BackendConfig
from guard.types import BackendError

log = logging.getLogger(__name__)
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def _error_text(resp: httpx.Response) -> str:
    """A short description of an upstream error response (its JSON error message where there is one)."""
    try:
        body = resp.json()
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("detail")
        return f"HTTP {resp.status_code}: {msg or str(body)[:300]}"
    except (ValueError, AttributeError):
        return f"HTTP {resp.status_code}: {resp.text[:300]}"


@BACKENDS.register("openai")
class OpenAIHTTPBackend(Backend):
    """Talks to ``{base_url}/chat/completions`` and ``{base_url}/completions``."""

    name = "openai"
    supports_prefix = False

    def __init__(self, cfg: BackendConfig, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Create sync and async clients; transports are injectable for tests."""
        if not cfg.base_url:
            raise ValueError("OpenAIHTTPBackend needs base_url")
        self.cfg = cfg
        self.model_id = cfg.model
        self.base_url = cfg.base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        timeout = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self._aclient = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                          transport=async_transport)
        self.supports_json_schema = True
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.batch_size), thread_name_prefix="openai-http")

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> OpenAIHTTPBackend:
        """Build from a BackendConfig."""
        return cls(cfg)

    # -- request bodies -------------------------------------------------------------------------------
    def _body(self, params: GenParams, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_id, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "stream": stream}
        if params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.json_schema is not None and self.supports_json_schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "guard_output", "schema": params.json_schema, "strict": True}}
        return body

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on transient failures; a 400 caused by response_format drops it once."""
        last: str = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                resp = self._client.post(path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadTimeout) as e:
                last = f"{e.__class__.__name__}: {e}"
            else:
                if resp.status_code == 200:
                    return resp.json()
                if resp.status_code == 400 and "response_format" in body:
                    log.warning("upstream rejected response_format (%s); retrying without structured output",
                                _error_text(resp))
                    self.supports_json_schema = False
                    body = {k: v for k, v in body.items() if k != "response_format"}
                    continue
                last = _error_text(resp)
                if resp.status_code not in _RETRY_STATUS:
                    break
            if attempt < self.cfg.max_retries:
                time.sleep(self.cfg.retry_backoff_s * (2 ** attempt))
        raise BackendError(f"upstream {self.base_url}{path} failed: {last}")

    @staticmethod
    def _out(choice: dict[str, Any], usage: dict[str, Any] | None, chat: bool) -> GenOutput:
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        return GenOutput(text=text or "", finish_reason=choice.get("finish_reason") or "stop",
                         prompt_tokens=int((usage or {}).get("prompt_tokens") or 0),
                         completion_tokens=int((usage or {}).get("completion_tokens") or 0))

    def _chat_one(self, messages: Messages, params: GenParams) -> GenOutput:
        body = {**self._body(params, stream=False), "messages": [dict(m) for m in messages]}
        data = self._post("/chat/completions", body)
        try:
            return self._out(data["choices"][0], data.get("usage"), chat=True)
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(f"upstream answer has no choices[0].message: {str(data)[:200]}") from e

    def _complete_one(self, text: str, params: GenParams) -> GenOutput:
        body = {**self._body(params, stream=False), "prompt": text}
        body.pop("response_format", None)
        data = self._post("/completions", body)
        try:
            return self._out(data["choices"][0], data.get("usage"), chat=False)
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(f"upstream answer has no choices[0].text: {str(data)[:200]}") from e

    # -- interface ------------------------------------------------------------------------------------
    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Send the prompts concurrently (the upstream batches them)."""
        return list(self._pool.map(lambda m: self._chat_one(m, params), batch))

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Send raw completions concurrently."""
        return list(self._pool.map(lambda t: self._complete_one(t, params), texts))

    def _sse(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[str]:
        """Stream an SSE response and yield content deltas; retried only before the first byte."""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                with self._client.stream("POST", path, json=body) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        err = _error_text(resp)
                        if resp.status_code in _RETRY_STATUS and attempt < self.cfg.max_retries:
                            time.sleep(self.cfg.retry_backoff_s * (2 ** attempt))
                            continue
                        raise BackendError(f"upstream {self.base_url}{path} failed: {err}")
                    for line in resp.iter_lines():
                        delta = _sse_delta(line, chat)
                        if delta is None:
                            return
                        if delta:
                            yield delta
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                if attempt >= self.cfg.max_retries:
                    raise BackendError(f"upstream {self.base_url}{path} unreachable: {e}") from e
                time.sleep(self.cfg.retry_backoff_s * (2 ** attempt))
            except httpx.HTTPError as e:
                raise BackendError(f"upstream stream {self.base_url}{path} broke: {e.__class__.__name__}: {e}") from e

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Stream a chat answer from upstream."""
        body = {**self._body(params, stream=True), "messages": [dict(m) for m in messages]}
        body.pop("response_format", None)
        return self._sse("/chat/completions", body, chat=True)

    def stream_complete(self, text: str, params: GenParams) -> Iterator[str]:
        """Stream a raw completion from upstream."""
        body = {**self._body(params, stream=True), "prompt": text}
        body.pop("response_format", None)
        return self._sse("/completions", body, chat=False)

    async def agenerate(self, messages: Messages, params: GenParams) -> GenOutput:
        """Native async chat request (no thread)."""
        body = {**self._body(params, stream=False), "messages": [dict(m) for m in messages]}
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                resp = await self._aclient.post("/chat/completions", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout) as e:
                last = f"{e.__class__.__name__}: {e}"
            else:
                if resp.status_code == 200:
                    data = resp.json()
                    return self._out(data["choices"][0], data.get("usage"), chat=True)
                last = _error_text(resp)
                if resp.status_code not in _RETRY_STATUS:
                    break
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(self.cfg.retry_backoff_s * (2 ** attempt))
        raise BackendError(f"upstream {self.base_url}/chat/completions failed: {last}")

    async def astream(self, messages: Messages, params: GenParams) -> AsyncIterator[str]:
        """Native async streaming of a chat answer."""
        body = {**self._body(params, stream=True), "messages": [dict(m) for m in messages]}
        body.pop("response_format", None)
        try:
            async with self._aclient.stream("POST", "/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise BackendError(f"upstream stream failed: {_error_text(resp)}")
                async for line in resp.aiter_lines():
                    delta = _sse_delta(line, chat=True)
                    if delta is None:
                        return
                    if delta:
                        yield delta
        except httpx.HTTPError as e:
            raise BackendError(f"upstream stream broke: {e.__class__.__name__}: {e}") from e

    def ready(self) -> bool:
        """Ping ``/models`` with a short timeout."""
        try:
            return self._client.get("/models", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Close the HTTP clients and the worker pool."""
        self._client.close()
        self._pool.shutdown(wait=False)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self._aclient.aclose())
        else:
            loop.create_task(self._aclient.aclose())


def _sse_delta(line: str, chat: bool) -> str | None:
    """The content delta of one SSE line: '' for non-content lines, None at ``[DONE]``."""
    if not line.startswith("data:"):
        return ""
    payload = line[5:].strip()
    if payload == "[DONE]":
        return None
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return ""
    if isinstance(data, dict) and data.get("error"):
        raise BackendError(f"upstream stream error: {data['error']}")
    choices = data.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
