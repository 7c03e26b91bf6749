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
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

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


def refusal_text(targets: Sequence[ForgetTarget], config: GuardConfig, message: str | None = None) -> str:
    """The refusal that replaces a refused or blocked answer (names no target, so it cannot leak); ``message``
    replaces ``config.refusal_message`` (the partial refusal of a split prompt)."""
    reasons: list[str] = []
    for t in targets:
        r = config.refusal_reasons.get(t.kind)
        if r and r not in reasons:
            reasons.append(r)
    return " ".join([config.refusal_message if message is None else message, *reasons]).strip()


# Stop strings that end the guard's generation at a refusal decision: with the whole JSON generated (constrained
# decoding) the key and the value, compact or spaced; after the forced prefix the value alone, with its comma.
REFUSAL_STOPS_SCHEMA = ('"requires_refusal": true', '"requires_refusal":true')
REFUSAL_STOPS_PREFIX = ("true,", "true ,")
EARLY_REFUSAL_NOTE = "(none: the guard decided to refuse and its generation stopped there)"


def early_refusal(raw: str, finish_reason: str | None) -> bool:
    """Whether a guard output was cut at a refusal stop string: stopped with nothing but the JSON's opening before
    the cut (an instruction that merely contains the words is cut later, and is read as the truncated decision)."""
    return finish_reason == "stop" and raw.strip() in ("{", JSON_PREFIX.strip())


def decision_schema(max_new_tokens: int, overhead: int = 20) -> dict[str, Any]:
    """The decision schema for constrained decoding within a token budget: the instruction is capped at one character
    per token left after the JSON around it (``overhead`` tokens), so the grammar closes the string and the object
    before the budget runs out whatever the tokenizer (every token writes at least one character); an untuned model
    otherwise repeats itself until the budget cuts the JSON open. Generation stops at the closing brace, so a short
    instruction costs no more than its own tokens."""
    cap = max(8, min(MAX_INSTRUCTION_CHARS, max_new_tokens - overhead))
    props = {**GUARD_JSON_SCHEMA["properties"], "cot_instruction": {**GUARD_JSON_SCHEMA["properties"]["cot_instruction"],
                                                                    "maxLength": cap}}
    return {**GUARD_JSON_SCHEMA, "properties": props}


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
            p.json_schema = decision_schema(self.config.guard_max_new_tokens, self._overhead())
            p.stop = list(REFUSAL_STOPS_SCHEMA) if self.config.guard_stop_at_refusal else []
        elif self.backend is not None and self.backend.supports_prefix:
            p.assistant_prefix = JSON_PREFIX
            p.stop = list(REFUSAL_STOPS_PREFIX) if self.config.guard_stop_at_refusal else []
        return p

    def _overhead(self) -> int:
        """Tokens of the decision's JSON around the instruction, by the guard model's tokenizer where there is one."""
        tok = getattr(self.backend, "tokenizer", None)
        skeleton = '{"requires_refusal": false, "cot_instruction": ""}'
        try:
            return len(tok(skeleton, add_special_tokens=False)["input_ids"]) + 4 if tok is not None else 20
        except Exception:  # noqa: BLE001 - an unusual tokenizer: the default allowance
            return 20

    def raw_batch(self, user_texts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]]) -> list[str]:
        """The guard LLM's raw outputs for a batch (the forced prefix put back in front), before any parsing; an
        output cut at the refusal stop ends in the value it stopped at, so it reads as the decision it is."""
        if self.backend is None:
            raise RuntimeError("no guard backend")
        p = self.params()
        outs = self.backend.generate_batch([self.prompt_fn(u, t) for u, t in zip(user_texts, targets, strict=True)], p)
        raws = []
        for o in outs:
            raw = (p.assistant_prefix or "") + o.text
            if p.stop and early_refusal(raw, o.finish_reason):
                raw = json.dumps({"requires_refusal": True, "cot_instruction": EARLY_REFUSAL_NOTE})
            raws.append(raw)
        return raws

    def decide_batch(self, user_texts: Sequence[str], targets: Sequence[Sequence[ForgetTarget]]
                     ) -> list[tuple[GuardDecision, str, str | None]]:
        """Decide for each flagged prompt: (decision, source 'llm'|'template', fallback reason or None).

        ``guard_mode='template'`` sends the per-target template instruction and lets the target answer;
        ``'refuse'`` refuses; ``'llm'`` asks the guard model. Raises the backend's exception (or TimeoutError) when
        the guard model itself fails, so that the caller applies the failure policy; invalid output is a fallback
        (refusing or not as ``fallback_requires_refusal`` says), not a failure.
        """
        n = len(user_texts)
        if n == 0:
            return []
        mode = self.config.guard_mode
        if mode in ("template", "refuse"):
            return [(self.fallback(t, mode == "refuse"), "template", f"guard_mode={mode}") for t in targets]
        if self.backend is None:
            return [(self._fallback(t), "template", "no guard model") for t in targets]
        fut = self._pool.submit(self.raw_batch, list(user_texts), [list(t) for t in targets])
        t0 = time.perf_counter()
        try:
            raws = fut.result(timeout=self.config.guard_timeout_s)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise TimeoutError(f"guard model gave no answer within {self.config.guard_timeout_s:.1f}s") from e
        log.debug("guard decided %d prompts in %.3fs", n, time.perf_counter() - t0)
        return self.parse_batch(raws, targets)

    def parse_batch(self, raws: Sequence[str], targets: Sequence[Sequence[ForgetTarget]]
                    ) -> list[tuple[GuardDecision, str, str | None]]:
        """Read the guard model's raw outputs as decisions (repairing what ``parse_decision`` can); the template
        fallback where an output is hopeless."""
        out: list[tuple[GuardDecision, str, str | None]] = []
        for raw, tg in zip(raws, targets, strict=True):
            try:
                out.append((parse_decision(raw), "llm", None))
            except ValueError as e:
                log.info("guard output invalid (%s; %d chars); using the template instruction for %s",
                         e, len(raw), [t.id for t in tg])
                out.append((self._fallback(tg), "template", f"invalid guard output: {e}"))
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
