"""LangChain ``Runnable`` over a GuardedLLM: str -> str, messages/prompt values -> AIMessage.

It composes with ``|`` (``ChatPromptTemplate | GuardRunnable(g) | StrOutputParser()``), forwards the
``RunnableConfig`` (callbacks, tags, run names) through LangChain's own config helpers, and supports
invoke/ainvoke/batch/abatch/stream/astream; batches go to the guard's batched path in one call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config, get_config_list

from core.generation import Message
from guard.api import GuardedLLM, GuardResult
from guard.backends import GenParams

GuardInput = str | Sequence[BaseMessage] | PromptValue | Sequence[dict[str, str]]
GuardOutput = str | AIMessage

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system",
          "developer": "system", "tool": "tool"}


def to_messages(value: Any) -> tuple[str | list[Message], bool]:
    """Convert a LangChain input to the guard's prompt; the flag says whether the output is a message."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, PromptValue):
        msgs = value.to_messages()
        from langchain_core.prompt_values import StringPromptValue

        if isinstance(value, StringPromptValue):
            return value.to_string(), False
        return to_messages(msgs)[0], True
    if isinstance(value, BaseMessage):
        value = [value]
    if isinstance(value, Sequence):
        out: list[Message] = []
        for m in value:
            if isinstance(m, BaseMessage):
                role = _ROLES.get(m.type)
                if role is None:
                    raise ValueError(f"message type {m.type!r} is not supported by the guard (human, ai, system, tool)")
                content = m.content if isinstance(m.content, str) else m.text()
                out.append({"role": role, "content": content})
            elif isinstance(m, dict) and "role" in m and "content" in m:
                out.append({"role": str(m["role"]), "content": str(m["content"])})
            elif isinstance(m, tuple | list) and len(m) == 2:
                out.append({"role": _ROLES.get(str(m[0]), str(m[0])), "content": str(m[1])})
            else:
                raise TypeError(f"cannot read a chat message from {type(m).__name__}")
        return out, True
    raise TypeError(f"GuardRunnable takes a str, chat messages or a PromptValue, not {type(value).__name__}")


class GuardRunnable(Runnable[Any, Any]):
    """A guarded LLM as a LangChain Runnable."""

    def __init__(self, guarded: GuardedLLM, params: GenParams | None = None, **overrides: Any) -> None:
        """Wrap a GuardedLLM; ``params``/overrides (e.g. max_new_tokens=64) apply to every call."""
        self.guarded = guarded
        self.params = params
        self.overrides = overrides

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        """Accepted input types."""
        return GuardInput

    @property
    def OutputType(self) -> Any:  # noqa: N802 - LangChain's name
        """Produced output types."""
        return GuardOutput

    def _wrap(self, res: GuardResult, as_message: bool) -> Any:
        if not as_message:
            return res.text
        return AIMessage(content=res.text, response_metadata={"finish_reason": res.finish_reason,
                                                              "guard": res.trace.model_dump(mode="json")})

    def _invoke(self, value: Any) -> Any:
        prompt, as_msg = to_messages(value)
        return self._wrap(self.guarded.generate(prompt, self.params, **self.overrides), as_msg)

    async def _ainvoke(self, value: Any) -> Any:
        prompt, as_msg = to_messages(value)
        return self._wrap(await self.guarded.agenerate(prompt, self.params, **self.overrides), as_msg)

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:  # noqa: A002
        """Guard and answer one input (callbacks and tags of ``config`` are honoured)."""
        return self._call_with_config(self._invoke, input, config, run_type="llm")

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:  # noqa: A002
        """Async ``invoke``."""
        return await self._acall_with_config(self._ainvoke, input, config, run_type="llm")

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Answer many inputs through the guard's batched path (one detector/guard/target batch)."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))

        def run(values: list[Any]) -> list[Any]:
            converted = [to_messages(v) for v in values]
            results = self.guarded.generate_batch([c[0] for c in converted], self.params, **self.overrides)
            return [self._wrap(r, c[1]) for r, c in zip(results, converted, strict=True)]

        return self._batch_with_config(run, inputs, configs, return_exceptions=return_exceptions, run_type="llm")

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Async ``batch`` (the batch runs in a worker thread)."""
        import asyncio

        return await asyncio.to_thread(self.batch, inputs, config, return_exceptions=return_exceptions)

    def _transform(self, inputs: Iterator[Any]) -> Iterator[Any]:
        value: Any = None
        for chunk in inputs:  # an upstream stream is one input arriving in pieces: add them up
            value = chunk if value is None else value + chunk
        if value is not None:
            prompt, as_msg = to_messages(value)
            s = self.guarded.stream(prompt, self.params, **self.overrides)
            for delta in s:
                yield AIMessageChunk(content=delta) if as_msg else delta
            if as_msg:
                yield AIMessageChunk(content="", response_metadata={"finish_reason": s.finish_reason,
                                                                    "guard": s.trace.model_dump(mode="json")})

    async def _atransform(self, inputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
        value: Any = None
        async for chunk in inputs:
            value = chunk if value is None else value + chunk
        if value is not None:
            prompt, as_msg = to_messages(value)
            s = self.guarded.astream(prompt, self.params, **self.overrides)
            async for delta in s:
                yield AIMessageChunk(content=delta) if as_msg else delta
            if as_msg:
                yield AIMessageChunk(content="", response_metadata={"finish_reason": s.finish_reason,
                                                                    "guard": s.trace.model_dump(mode="json")})

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:  # noqa: A002
        """Stream deltas (str, or AIMessageChunk for message input) as the output check releases them."""
        yield from self._transform_stream_with_config(iter([input]), self._transform, ensure_config(config),
                                                      run_type="llm")

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:  # noqa: A002
        """Stream for each input of an upstream stream (keeps streaming through ``|`` chains)."""
        yield from self._transform_stream_with_config(input, self._transform, ensure_config(config), run_type="llm")

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:  # noqa: A002
        """Async ``stream``."""
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self._atransform_stream_with_config(one(), self._atransform, ensure_config(config),
                                                               run_type="llm"):
            yield chunk

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,  # noqa: A002
                         **kwargs: Any) -> AsyncIterator[Any]:
        """Async ``transform``."""
        async for chunk in self._atransform_stream_with_config(input, self._atransform, ensure_config(config),
                                                               run_type="llm"):
            yield chunk
