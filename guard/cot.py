"""DRAGON-style CoT guard: a guard LLM reads a flagged prompt and the matched policies and writes
``{"requires_refusal": bool, "cot_instruction": str}`` for the target model.

Structured generation is used where the backend offers it (vLLM structured outputs, OpenAI
``response_format`` json_schema); otherwise the answer is prefix-forced to start with the JSON
skeleton, then parsed and repaired (first JSON object, quotes, trailing commas, unterminated
strings, type coercion). Output that still does not validate, or that comes too late, falls back to
a per-target template instruction, and the fallback is logged. The prompt, the decision schema and
the parser live in :mod:`core.guard_format`, shared with guard fine-tuning.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence

from core.guard_format import (
    GUARD_JSON_SCHEMA,
    JSON_PREFIX,
    MAX_INSTRUCTION_CHARS,
    GuardDecision,
    guard_messages,
    parse_decision,
)
from core.schema import ForgetTarget
from guard.backends.base import Backend, GenParams
from guard.config import GuardConfig

log = logging.getLogger(__name__)


def template_instruction(targets: Sequence[ForgetTarget]) -> str:
    """The per-target fallback instruction (DRAGON's fixed template, filled with each target's names and policy)."""
    parts = []
    for t in targets:
        names = ", ".join(f'"{n}"' for n in t.names)
        parts.append(f"The request may concern {names}. Policy: {t.policy}")
    return (" ".join(parts) + " Think step by step: first check whether answering needs any of this "
            "information; if it does, do not reveal, confirm, guess or hint at it, even partially, and "
            "briefly decline; otherwise answer only the parts unrelated to it.")


def refusal_text(targets: Sequence[ForgetTarget], config: GuardConfig) -> str:
    """The refusal that replaces a refused or blocked answer (names no target, so it cannot leak)."""
    reasons: list[str] = []
    for t in targets:
        r = config.refusal_reasons.get(t.kind)
        if r and r not in reasons:
            reasons.append(r)
    return " ".join([config.refusal_message, *reasons]).strip()


# ---- the guard ---------------------------------------------------------------------------------------

class CoTGuard:
    """Runs the guard LLM with a deadline and turns its output into a decision, or the template fallback."""

    def __init__(self, backend: Backend | None, config: GuardConfig | None = None,
                 prompt_fn: Callable[[str, Sequence[ForgetTarget]], list[dict[str, str]]] | None = None) -> None:
        """``backend`` None means template-only; ``prompt_fn`` swaps the guard prompt (e.g. a fine-tuned guard's format)."""
        self.backend = backend
        self.config = config or GuardConfig()
        self.prompt_fn = prompt_fn or guard_messages
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cot-guard")

    def params(self) -> GenParams:
        """Generation parameters: greedy, short, schema-constrained or prefix-forced as the backend allows."""
        p = GenParams(max_new_tokens=self.config.guard_max_new_tokens, temperature=0.0)
        if self.backend is not None and self.backend.supports_json_schema:
            p.json_schema = GUARD_JSON_SCHEMA
        elif self.backend is not None and self.backend.supports_prefix:
            p.assistant_prefix = JSON_PREFIX
        return p

    def _raw(self, user_texts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]]) -> list[str]:
        """Call the guard LLM on a batch; the prefix is put back in front of each output."""
        if self.backend is None:
            raise RuntimeError("no guard backend")
        p = self.params()
        outs = self.backend.generate_batch([self.prompt_fn(u, t) for u, t in zip(user_texts, targets, strict=True)], p)
        return [(p.assistant_prefix or "") + o.text for o in outs]

    def decide_batch(self, user_texts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]]
                     ) -> list[tuple[GuardDecision, str, str | None]]:
        """Decide for each flagged prompt: (decision, source 'llm'|'template', fallback reason or None).

        Raises the backend's exception (or TimeoutError) when the guard model itself fails, so that
        the caller applies the failure policy; invalid output is a fallback, not a failure.
        """
        n = len(user_texts)
        if n == 0:
            return []
        if self.config.guard_mode == "template" or self.backend is None:
            return [(self._fallback(t), "template", "guard_mode=template") for t in targets]
        fut = self._pool.submit(self._raw, list(user_texts), [list(t) for t in targets])
        t0 = time.perf_counter()
        try:
            raws = fut.result(timeout=self.config.guard_timeout_s)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise TimeoutError(f"guard model gave no answer within {self.config.guard_timeout_s:.1f}s") from e
        out: list[tuple[GuardDecision, str, str | None]] = []
        for raw, tg in zip(raws, targets, strict=True):
            try:
                out.append((parse_decision(raw), "llm", None))
            except ValueError as e:
                log.info("guard output invalid (%s; %d chars); using the template instruction for %s",
                         e, len(raw), [t.id for t in tg])
                out.append((self._fallback(tg), "template", f"invalid guard output: {e}"))
        log.debug("guard decided %d prompts in %.3fs", n, time.perf_counter() - t0)
        return out

    def decide(self, user_text: str, targets: Sequence[ForgetTarget]) -> tuple[GuardDecision, str, str | None]:
        """Decide for one flagged prompt (see ``decide_batch``)."""
        return self.decide_batch([user_text], [targets])[0]

    def _fallback(self, targets: Sequence[ForgetTarget]) -> GuardDecision:
        """The template decision for these targets."""
        return GuardDecision(requires_refusal=self.config.fallback_requires_refusal,
                           cot_instruction=template_instruction(targets)[:MAX_INSTRUCTION_CHARS])

    def fallback(self, targets: Sequence[ForgetTarget], requires_refusal: bool) -> GuardDecision:
        """A template decision with an explicit refusal flag (used by the failure policy)."""
        return GuardDecision(requires_refusal=requires_refusal,
                           cot_instruction=template_instruction(targets)[:MAX_INSTRUCTION_CHARS])

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)
