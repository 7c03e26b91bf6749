"""One interface for every model backend: sync and async generation, batches, and streaming."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.generation import Message
from core.models import DEFAULT_LLM
from core.registry import Registry

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
    """Sampling parameters common to all backends (greedy by default)."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    json_schema: dict[str, Any] | None = Field(None, description="Constrain the output (backends that support it).")
    assistant_prefix: str | None = Field(None, description="Force the answer to start with this text (not returned).")


class GenOutput(BaseModel):
    """One generated answer."""

    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Backend(ABC):
    """A model behind the guard. Subclasses implement the batch and stream methods; the rest derive."""

    name: str = "backend"
    config_class: type[BackendConfig] = BackendConfig
    supports_json_schema: bool = False
    supports_prefix: bool = False
    model_id: str = ""
    tokenizer: Any = None

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
