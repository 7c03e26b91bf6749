"""One interface for every model backend: sync and async generation, batches, and streaming."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.generation import Message, has_non_text
from core.models import DEFAULT_LLM
from core.registry import Registry, import_submodules

Messages = Sequence[Message]
BACKENDS: Registry[type[Backend]] = Registry("guard backend")
_CLOSE_WAIT_S = 2.0


class BackendConfig(BaseModel):
    """What every backend's config has; each backend subclasses it with ``kind`` and its own validated options.

    Build one with the backend's class (``OpenAIConfig(base_url=...)``) or, from a YAML section or CLI flags,
    with ``guard.backends.backend_config(kind=..., ...)``, which picks the class its ``kind`` names.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str
    model: str = Field(DEFAULT_LLM, description="Embedded name, local HF directory or hub id; for 'openai' the "
                                                 "model name sent upstream.")
    timeout_s: float = Field(60.0, gt=0, description="Per HTTP request (openai) or per generation call.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation call (HTTP: requests in flight).")


class GenParams(BaseModel):
    """Sampling parameters (greedy by default) and the chat API's optional features; a backend implements the
    features its ``features`` names, and :meth:`Backend.unsupported` names any other a request uses."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    json_schema: dict[str, Any] | None = Field(None, description="Constrain the output (backends that support it).")
    assistant_prefix: str | None = Field(None, description="Force the answer to start with this text (not returned).")
    # Optional features of the chat API (OpenAI's names): what a client asked the target model for.
    n: int = Field(1, ge=1, description="Choices per prompt.")
    logprobs: bool = Field(False, description="Log probabilities of the chosen tokens.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Most likely alternatives per position (needs logprobs).")
    tools: list[dict[str, Any]] | None = Field(None, description="Tool (function) definitions, OpenAI's shape.")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(None, description="The client's output format: json_object or "
                                                   "json_schema (type 'text' is the default and is not kept).")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream_usage: bool = Field(False, description="A stream ends with a StreamUsage item (its token counts) after "
                               "its last text delta, where the backend knows them.")
    passthrough: dict[str, Any] = Field(default_factory=dict, description="Further fields sent as they are to an "
                                        "OpenAI-compatible upstream (vendor sampling options, e.g. vLLM's top_k).")
    hints: dict[str, Any] = Field(default_factory=dict, description="Bookkeeping fields (metadata, store...): sent "
                                  "to an OpenAI-compatible upstream, ignored by local backends.")

    def features_used(self) -> list[str]:
        """The optional features this request uses (the names in ``Backend.features``), in field order; ``user`` and
        ``parallel_tool_calls`` are hints any backend may ignore, ``tool_choice`` 'none'/'auto' asks for nothing."""
        used = [f for f, on in (
            ("n", self.n > 1), ("logprobs", self.logprobs), ("top_logprobs", self.top_logprobs > 0),
            ("tools", bool(self.tools)), ("tool_choice", self.tool_choice not in (None, "none", "auto")),
            ("response_format", bool(self.response_format)), ("frequency_penalty", bool(self.frequency_penalty)),
            ("presence_penalty", bool(self.presence_penalty)), ("logit_bias", bool(self.logit_bias))) if on]
        return used + [f"passthrough.{k}" for k in self.passthrough]

    @property
    def needs_whole_answer(self) -> bool:
        """Whether a stream of this request is released choice by choice once each is complete and checked (several
        choices, log probabilities, JSON output) instead of delta by delta (text is, tool calls whole at the end)."""
        return bool(self.n > 1 or self.logprobs or self.response_format)


OPTIONAL_FEATURES: tuple[str, ...] = (
    "n", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "frequency_penalty", "presence_penalty", "logit_bias", "user", "passthrough", "non_text_content")
"""The chat API's optional features a backend may implement (``Backend.features``); ``non_text_content`` is image,
audio or file parts in messages."""


@dataclasses.dataclass(frozen=True)
class StreamUsage:
    """The token counts of a stream, yielded after its last text delta by a backend that knows them (an upstream's
    usage chunk); consumers of ``stream``/``astream`` skip it where they only want text."""

    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class StreamToolCalls:
    """The tool calls of a streamed answer, whole (their deltas assembled), yielded by a backend after the answer's
    last text delta: a tool call's arguments can only be judged complete."""

    calls: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class StreamReasoning:
    """The reasoning of a streamed answer, whole, yielded by a backend when it ends (before the first text delta, or
    after the stream when no text follows): the guard checks it before any of it or of the answer is released."""

    text: str


MIN_LOGPROB = -9999.0
"""What vLLM's OpenAI server reports for a log probability of -inf (JSON has no infinity)."""


def logprob_entry(token: str, logprob: float, top: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One OpenAI log-probability entry of a local backend (``top`` is left out for an alternative)."""
    e: dict[str, Any] = {"token": token, "logprob": max(MIN_LOGPROB, float(logprob)),
                         "bytes": list(token.encode("utf-8", errors="replace"))}
    if top is not None:
        e["top_logprobs"] = top
    return e


class GenOutput(BaseModel):
    """One generated answer (the first choice); ``others`` holds choices 1..n-1 when several were asked for."""

    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] = Field(default_factory=list, description="OpenAI tool calls: id, type "
                                             "'function', function {name, arguments (a JSON string)}.")
    logprobs: dict[str, Any] | None = Field(None, description="OpenAI's choice logprobs object ({'content': [...]}).")
    reasoning: str | None = Field(None, description="The reasoning a reasoning model wrote before its answer, where the "
                                  "server returns it apart (vLLM's and DeepSeek's `reasoning_content`, `reasoning`).")
    others: list[GenOutput] = Field(default_factory=list)

    def choices(self) -> list[GenOutput]:
        """Every choice, the first one included, in order."""
        return [self, *self.others]


class Backend(ABC):
    """A model behind the guard. Subclasses implement the batch and stream methods; the rest derive."""

    name: str = "backend"
    config_class: type[BackendConfig] = BackendConfig
    supports_json_schema: bool = False
    supports_prefix: bool = False
    features: frozenset[str] = frozenset()
    """The optional chat features (``OPTIONAL_FEATURES``) this backend implements; a request using another one is
    refused by :meth:`unsupported` before anything runs."""
    model_id: str = ""
    tokenizer: Any = None

    def unsupported(self, params: GenParams, messages: Messages | None = None) -> tuple[str, str] | None:
        """The first feature a request uses that this backend does not implement, as (field, message naming the
        backends that do), or None when it can serve the request."""
        used = params.features_used()
        if messages is not None and any(has_non_text(m) for m in messages):
            used.append("non_text_content")
        for field in used:
            key = field.split(".")[0]
            if key in self.features:
                continue
            import_submodules(__package__ or "guard.backends", [os.path.dirname(__file__)], skip={"base"})  # all kinds
            others = [k for k in BACKENDS.names() if key in getattr(BACKENDS.get(k), "features", ())]
            where = f"backends that implement it: {', '.join(others)}" if others else "no backend implements it"
            if key == "non_text_content":
                return "messages", (f"non-text content (image, audio or file parts) is not implemented by the "
                                    f"{self.name} backend ({where}, forwarding it to an upstream that accepts it)")
            what = "vendor field" if key == "passthrough" else "field"
            return field, (f"{what} {field!r} is not implemented by the {self.name} backend ({where}; the openai "
                           "backend forwards it to an upstream such as vLLM)")
        return None

    @abstractmethod
    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer many chat prompts, in order."""

    @abstractmethod
    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Continue many raw text prompts (no chat template), in order."""

    @abstractmethod
    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Yield an answer's text deltas; closing the iterator stops generation."""

    def stream_complete(self, text: str, params: GenParams) -> Iterator[str]:
        """Yield a raw completion's deltas (default: one delta with the whole completion)."""
        yield self.complete_batch([text], params)[0].text

    def generate(self, messages: Messages, params: GenParams) -> GenOutput:
        """Answer one chat prompt."""
        return self.generate_batch([messages], params)[0]

    async def agenerate(self, messages: Messages, params: GenParams) -> GenOutput:
        """Answer one chat prompt without blocking the event loop."""
        return await asyncio.to_thread(self.generate, messages, params)

    async def agenerate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer many chat prompts without blocking the event loop."""
        return await asyncio.to_thread(self.generate_batch, batch, params)

    async def acomplete(self, text: str, params: GenParams) -> GenOutput:
        """Continue one raw text prompt without blocking the event loop."""
        return (await asyncio.to_thread(self.complete_batch, [text], params))[0]

    async def acomplete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Continue many raw text prompts without blocking the event loop."""
        return await asyncio.to_thread(self.complete_batch, texts, params)

    async def astream(self, messages: Messages, params: GenParams) -> AsyncIterator[str]:
        """Async view of ``stream``: the blocking iterator runs in a thread."""
        async with contextlib.aclosing(aiter_thread(lambda: self.stream(messages, params))) as it:
            async for d in it:  # closing this stream closes the thread's iterator now, not at garbage collection
                yield d

    async def astream_complete(self, text: str, params: GenParams) -> AsyncIterator[str]:
        """Async view of ``stream_complete``: the blocking iterator runs in a thread."""
        async with contextlib.aclosing(aiter_thread(lambda: self.stream_complete(text, params))) as it:
            async for d in it:
                yield d

    def ready(self) -> bool:
        """Whether the backend can take requests now (HTTP backends ping upstream)."""
        return True

    def close(self) -> None:
        """Release resources (threads, connections, engines)."""
        return None


_END = object()


async def aiter_thread(make_iter: Any, maxsize: int = 64) -> AsyncIterator[Any]:
    """Run a blocking iterator in a thread and yield its items asynchronously; closing stops the thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
        except Exception:  # noqa: BLE001 - loop closed: nothing left to deliver to
            stop.set()

    def worker() -> None:
        it = make_iter()
        try:
            for item in it:
                if stop.is_set():
                    break
                put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised on the async side
            put(e)
        finally:
            close = getattr(it, "close", None)
            if callable(close):
                close()
            put(_END)

    thread = threading.Thread(target=worker, daemon=True, name="aiter-thread")
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not queue.empty():  # unblock a worker waiting on a full queue
            queue.get_nowait()
        if thread.is_alive():  # closed early: wait (briefly) until the worker has closed the blocking iterator,
            # so "closed" means generation stopped; a worker inside a slow step finishes it on its own
            await asyncio.to_thread(thread.join, _CLOSE_WAIT_S)
