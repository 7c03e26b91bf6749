"""The scripted backend: a deterministic model stand-in that answers with a Python function and records every call.

A real backend class for what must not depend on a model: guard and HTTP-layer tests, and load benchmarks of
the proxy (``eval/bench/fuzz.py``), where what is measured is the guard, not generation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence

from core.generation import turn_text
from guard.backends.base import Backend, GenOutput, GenParams, Messages


class ScriptedBackend(Backend):
    """A deterministic fake backend for tests: answers via ``reply(messages) -> str`` and records every call."""

    name = "scripted"

    def __init__(self, reply: Callable[[list[dict[str, str]]], str] | None = None, *, json_schema: bool = False,
                 prefix: bool = False, delay_s: float = 0.0, error: Exception | None = None) -> None:
        """``reply`` maps the messages sent to the answer; ``error`` makes every call raise it."""
        self.reply = reply or (lambda msgs: "echo: " + turn_text(msgs[-1]))
        self.supports_json_schema = json_schema
        self.supports_prefix = prefix
        self.delay_s = delay_s
        self.error = error
        self.calls: list[tuple[list[dict[str, str]], GenParams]] = []
        self.closed_streams = 0
        self.model_id = "scripted"

    def _one(self, messages: Messages, params: GenParams) -> str:
        self.calls.append(([dict(m) for m in messages], params))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.reply([dict(m) for m in messages])

    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer each prompt with ``reply``."""
        return [GenOutput(text=self._one(m, params)) for m in batch]

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Answer raw texts with ``reply`` (the text arrives as a 'raw' message)."""
        return [GenOutput(text=self._one([{"role": "raw", "content": t}], params)) for t in texts]

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Yield ``reply``'s answer word by word; counts closed streams."""
        text = self._one(messages, params)
        try:
            yield from re.findall(r"\s*\S+", text)
        finally:
            self.closed_streams += 1
