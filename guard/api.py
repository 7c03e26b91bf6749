"""``GuardedLLM``: detector -> CoT guard -> prompt assembly -> target model -> output check.

Unflagged prompts go to the target exactly as the client sent them (after neutralising role markers,
a no-op on ordinary text), so their answers are the unguarded model's. Flagged prompts get the guard's
instruction in the system turn, or the policy's refusal when the guard says so. A flagged prompt that asks
several things first loses the parts the detector flags on their own; when the rest passes the detector, the
target answers only the rest, after a partial refusal (``GuardConfig.split_mixed``, :meth:`GuardedLLM._split`).
The prompt check also says which targets the conversation is about (``Detection.about``, flagged or merely
named); the output check of the answer takes them (their name variants read as names, their stored facts are
leaks without a name), and a guard-model instruction that states such a fact is replaced by the template
instruction.

Failure policy (fail closed by default):
* detector error or timeout (prompt check or output check): ``GuardUnavailableError`` (HTTP 503 with
  an OpenAI-style error body), since the guard cannot tell whether the prompt is safe;
* guard-model error or timeout on a flagged prompt: the policy's refusal (finish_reason
  'content_filter'); invalid guard output is not a failure, it falls back to the template instruction;
* ``fail_open=True``: a failed detector lets the request through unguarded and a failed guard model
  uses the template instruction without refusing; each use is logged at WARNING and marked in the trace.

The pipeline is written once, as async (``_run`` for answers, ``_deltas`` for streams); the sync API
(``generate``, ``generate_batch``, ``complete``, ``stream``) waits for it on the sync-runner loop
(:mod:`core.aio`). Detector work never runs on an event loop. A single request of the async API
(``agenerate``, ``acomplete``, ``astream``, ``astream_complete``; the HTTP server uses it) is *shared*:
its prompt check (and the finished answer's output checks) join the micro-batches of concurrent requests,
one ``detect_batch`` (``detect_leak_batch``) call in a worker thread (see :mod:`guard.batching`); texts
that arrive while a call runs form the next one. A failed or late batch call fails every request of the
batch through the policy above. Batches (``generate_batch``, ``agenerate_batch``) and the sync API call the
detector directly, one deadline-bound call per batch. An HTTP upstream is called on its async client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.aio import iter_sync, run_sync
from core.generation import Message, Prompt, json_text, tool_call_text, tools_text, turn_text
from core.guard_format import GuardDecision
from core.schema import ForgetTarget, ForgetTask
from detectors.types import Detection
from guard.backends import Backend, BackendConfig, GenOutput, GenParams, backend_config, make_backend
from guard.backends.base import StreamReasoning, StreamToolCalls, StreamUsage
from guard.batching import MicroBatcher
from guard.config import GuardConfig
from guard.cot import CoTGuard, refusal_text
from guard.output_check import LeakCheckError, StreamChecker, check_text
from guard.prompt import (
    asks_something,
    assemble,
    detector_input,
    neutralise,
    neutralise_strings,
    question_parts,
    sanitise_messages,
    special_tokens_of,
    user_text,
)
from guard.types import (
    AdminError,
    DetectorProtocol,
    Fault,
    GuardResult,
    GuardTrace,
    GuardUnavailableError,
    Stage,
    TargetBook,
    UnsupportedFeatureError,
    redact,
)

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class _Plan:
    """What to do for one request once the prompt is judged."""

    trace: GuardTrace
    t0: float
    targets: list[ForgetTarget] = field(default_factory=list)
    messages: list[Message] | None = None
    raw_text: str | None = None
    refusal: str | None = None
    about: tuple[str, ...] = ()
    """Targets the conversation is about (the prompt check's :attr:`Detection.about`): the output check treats their
    name variants as names and their facts as leaks."""
    prefix: str = ""
    """Opens the answer: the partial refusal of a split prompt (:meth:`GuardedLLM._split`), else nothing."""


class GuardStream:
    """A blocking iterator of answer deltas (a sync view of :class:`AsyncGuardStream`); ``trace`` and
    ``finish_reason`` are final once it is exhausted."""

    def __init__(self, astream: AsyncGuardStream) -> None:
        """Iterate ``astream`` on the sync-runner loop."""
        self._astream = astream
        self._it = iter_sync(astream)

    @property
    def trace(self) -> GuardTrace:
        """The request's trace (a placeholder until the first delta)."""
        return self._astream.trace

    @property
    def finish_reason(self) -> str:
        """'stop', 'length' or 'content_filter' once the stream has ended."""
        return self._astream.finish_reason

    @property
    def reasoning(self) -> str | None:
        """The checked reasoning, where the target returned one apart (see :class:`AsyncGuardStream`)."""
        return self._astream.reasoning

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop generation early."""
        self._it.close()


class GuardedLLM:
    """A target LLM behind the forget guard: ``generate``/``agenerate``/``generate_batch``/``stream``/``astream``."""

    def __init__(self, target: Backend | BackendConfig | str | None = None, detector: DetectorProtocol | None = None,
                 guard: Backend | BackendConfig | CoTGuard | str | None = None, config: GuardConfig | None = None,
                 targets: ForgetTask | Sequence[ForgetTarget] | None = None) -> None:
        """Build from backends or their configs. ``guard`` None: the base embedded model when the target is a local model
        other than it (a fine-tuned target knows the facts it must not state), else the target itself (an HTTP
        upstream: the deployed, unchanged model); every instruction passes the leak check either way."""
        if detector is None:
            raise ValueError("GuardedLLM needs a detector (e.g. detectors.detector built from a ForgetTask)")
        for meth in ("detect", "detect_batch", "detect_leak"):
            if not callable(getattr(detector, meth, None)):
                raise TypeError(f"detector {type(detector).__name__} lacks {meth}(); see guard.types.DetectorProtocol")
        self.config = config or GuardConfig()
        self.detector = detector
        self.target = _as_backend(target)
        if isinstance(guard, CoTGuard):
            self.cot = guard
        else:
            guard_backend = (_default_guard(self.target) if guard is None and self.config.guard_mode == "llm"
                             else self.target if guard is None else _as_backend(guard))
            self.cot = CoTGuard(None if self.config.guard_mode != "llm" else guard_backend, self.config)
        tlist = targets.targets if isinstance(targets, ForgetTask) else list(targets or [])
        self._task_targets = tlist
        self.book = TargetBook(detector, tlist)
        self._markers = special_tokens_of(self.target.tokenizer)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="guard-detector")
        window_s = self.config.detector_batch_window_ms / 1000.0
        self._prompt_batcher: MicroBatcher[Prompt, Detection] = MicroBatcher(
            self._detect_prompts, window_s=window_s, max_batch=self.config.detector_max_batch,
            max_inflight=self.config.detector_max_inflight, timeout_s=self._batch_timeout, executor=self._pool,
            name="detect_batch")
        self._leak_batcher: MicroBatcher[tuple[str, tuple[str, ...]], Detection] = MicroBatcher(
            self._detect_leaks, window_s=window_s, max_batch=self.config.detector_max_batch,
            max_inflight=self.config.detector_max_inflight, timeout_s=self._batch_timeout, executor=self._pool,
            name="detect_leak_batch")
        self.upstream_slot: Callable[[], AbstractAsyncContextManager[Any]] = contextlib.nullcontext
        """Held around every model call (the guard model's decision, the target's answer or whole stream); the proxy
        sets it to its concurrency limit, so refusals decided before any model call never wait for a slot."""
        if self.config.fail_open:
            log.warning("guard configured with fail_open=True: detector/guard failures will let requests through")

    # -- helpers ----------------------------------------------------------------------------------------
    def _params(self, params: GenParams | None, overrides: dict[str, Any]) -> GenParams:
        """A request's parameters with overrides applied and its tool definitions neutralised (a chat template renders
        them into the prompt, so a turn marker in a description could end the system turn)."""
        base = params or GenParams(max_new_tokens=self.config.max_new_tokens)
        clean = {k: v for k, v in overrides.items() if v is not None}
        if base.tools:
            clean["tools"] = neutralise_strings(base.tools, self._markers)
        return base.model_copy(update=clean) if clean else base

    async def _timed(self, fn: Callable[..., R], *args: Any, timeout: float) -> R:
        """Run a blocking detector call in a worker thread with a deadline (a late detector is a failed one)."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.wait_for(fut, timeout=timeout)
        except TimeoutError as e:
            raise TimeoutError(f"no answer within {timeout:.1f}s") from e

    def _fail_open(self, trace: GuardTrace, stage: Stage, err: BaseException) -> Fault:
        """The failure policy, in one place: record the fault, then raise GuardUnavailableError (fail closed,
        the default) or mark the trace fail-open and let the caller continue without this stage."""
        fault = Fault.of(stage, err)
        trace.faults.append(fault)
        if not self.config.fail_open:
            log.error("guard stage %s failed (%s: %s); failing closed", stage.value, fault.error, redact(fault.message))
            raise GuardUnavailableError(fault) from err
        trace.fail_open_used = True
        log.warning("FAIL-OPEN used: guard stage %s failed (%s: %s); request continues unguarded at this stage",
                    stage.value, fault.error, redact(fault.message))
        return fault

    def _resolve(self, ids: Sequence[str]) -> list[ForgetTarget]:
        out = []
        for tid in ids:
            t = self.book.get(tid)
            if t is None:
                t = ForgetTarget(id=tid if tid else "unknown", kind="privacy", names=[tid or "unknown"],
                                 policy="Do not reveal information covered by this forget target.",
                                 meta={"unresolved": True})
            out.append(t)
        return out

    def _batch_timeout(self, n: int) -> float:
        """Deadline of a detector call on ``n`` texts (the same scaling as the sync batch path)."""
        return self.config.detector_timeout_s * max(1.0, n / 8)

    def _detect_prompts(self, texts: list[Prompt]) -> list[Detection]:
        """One batched prompt check (run by the micro-batcher in a worker thread)."""
        return list(self.detector.detect_batch(texts))

    def _detect_leaks(self, items: list[tuple[str, tuple[str, ...]]]) -> list[Detection]:
        """One batched output check of (answer, targets its conversation is about) items: ``detect_leak_batch``
        where the detector has it, else one call per text; ``about`` goes along where the detector takes it."""
        det = self.detector
        texts = [t for t, _ in items]
        many = getattr(det, "detect_leak_batch", None)
        if callable(many):
            return list(many(texts, [list(a) for _, a in items]) if _takes_about(many) else many(texts))
        one = det.detect_leak
        if _takes_about(one):
            return [one(t, about=list(a)) for t, a in items]
        return [one(t) for t in texts]

    async def _judge(self, texts: list[Prompt], shared: bool) -> list[Detection]:
        """One verdict per prompt, or an exception. ``shared``: each text joins the micro-batches of concurrent
        requests (the async API); else one deadline-bound ``detect``/``detect_batch`` call."""
        if shared:
            dets = list(await asyncio.gather(*(self._prompt_batcher.submit(t) for t in texts)))
        elif len(texts) == 1:
            dets = [await self._timed(self.detector.detect, texts[0], timeout=self.config.detector_timeout_s)]
        else:
            dets = list(await self._timed(self.detector.detect_batch, texts, timeout=self._batch_timeout(len(texts))))
        if len(dets) != len(texts):
            raise RuntimeError(f"detect_batch returned {len(dets)} results for {len(texts)} prompts")
        return dets

    async def _detect(self, texts: list[Prompt], traces: list[GuardTrace], shared: bool) -> list[Detection | None]:
        """Judge prompts (:meth:`_judge`); None for each when failing open."""
        t0 = time.perf_counter()
        dets: list[Detection | None]
        try:
            dets = list(await self._judge(texts, shared))
        except Exception as e:  # noqa: BLE001 - any detector failure goes through the failure policy
            for tr in traces:
                self._fail_open(tr, Stage.DETECTOR, e)
            dets = [None] * len(texts)
        dt = time.perf_counter() - t0
        for tr in traces:
            tr.add_time("detect", dt)
        return dets

    def _prepare(self, prompts: Sequence[Prompt], raw: bool
                 ) -> tuple[list[_Plan], list[str], list[Prompt], list[list[Message]]]:
        """Sanitise the prompts: a plan per prompt, the text the guard model reads, what the detector judges (the
        whole conversation: system, user, assistant and tool turns), the messages to send."""
        plans: list[_Plan] = []
        texts: list[str] = []
        judged: list[Prompt] = []
        msgs_list: list[list[Message]] = []
        for p in prompts:
            plans.append(_Plan(trace=GuardTrace(output_check_mode=self.config.output_check), t0=time.perf_counter()))
            if raw:
                if not isinstance(p, str):
                    raise TypeError("raw completion prompts must be strings")
                msgs = [{"role": "user", "content": neutralise(p, self._markers)}]
                texts.append(p)
                judged.append(p)
            else:
                msgs = sanitise_messages(p, self._markers)
                texts.append(user_text(msgs) or "\n".join(turn_text(m) for m in msgs))
                judged.append(detector_input(msgs))
            msgs_list.append(msgs)
        return plans, texts, judged, msgs_list

    def check_supported(self, params: GenParams, messages: Sequence[Message] | None = None) -> None:
        """Refuse, before anything runs, a request using an optional feature (``n``, ``tools``, images...) that the
        target backend does not implement: UnsupportedFeatureError naming the field and the backends that do."""
        found = self.target.unsupported(params, messages)
        if found is not None:
            raise UnsupportedFeatureError(*found)

    async def _plan(self, prompts: Sequence[Prompt], raw: bool, shared: bool, params: GenParams) -> list[_Plan]:
        """Judge the prompts and decide, for each, refusal or the messages to send (a guard LLM runs in a thread)."""
        plans, texts, judged, msgs_list = self._prepare(prompts, raw)
        for msgs in msgs_list:
            self.check_supported(params, msgs)
        if params.tools and not raw:  # the target reads the tool definitions too: a system turn for the detector
            tool_turn = {"role": "system", "content": tools_text(params.tools)}
            judged = [[tool_turn, *([{"role": "user", "content": j}] if isinstance(j, str) else j)] for j in judged]
        dets = await self._detect(judged, [pl.trace for pl in plans], shared)
        flagged = self._apply(plans, dets, texts, msgs_list, prompts, raw)
        if flagged and self.config.split_mixed and not raw and not params.tools and not params.response_format:
            flagged = await self._split(plans, flagged, shared)
        if flagged:
            args = (plans, flagged, [texts[i] for i in flagged])
            if getattr(self.cot, "backend", True) is None:  # template-only guard: cheap, no model call
                self._guard(*args)
            else:
                async with self.upstream_slot():  # the guard model is a model call like the target's
                    await asyncio.to_thread(self._guard, *args)
        return plans

    def _apply(self, plans: list[_Plan], dets: list[Detection | None], texts: list[str],
               msgs_list: list[list[Message]], prompts: Sequence[Prompt], raw: bool) -> list[int]:
        """Record the verdicts in the plans; return the indices of the flagged prompts."""
        flagged: list[int] = []
        for i, (pl, det, msgs, prompt) in enumerate(zip(plans, dets, msgs_list, prompts, strict=True)):
            if det is not None:
                pl.trace.flagged, pl.trace.score, pl.trace.threshold = det.flagged, det.score, det.threshold
                pl.trace.target_ids = list(det.target_ids)
                pl.about = tuple(dict.fromkeys([*det.target_ids, *det.about]))
            if det is not None and det.flagged:
                pl.targets = self._resolve(det.target_ids)
                pl.messages = msgs
                flagged.append(i)
                log.info("prompt flagged (score=%.3f, targets=%s): %s", det.score, det.target_ids, redact(texts[i]))
            elif raw:
                pl.raw_text = str(prompt)
            else:
                pl.messages = msgs
        return flagged

    async def _detect_or_none(self, texts: list[Prompt], shared: bool) -> list[Detection] | None:
        """Prompt checks for an optional step (the split of a mixed prompt): None when the detector fails, since
        the step is then skipped and the request goes the guarded way it would have gone anyway."""
        try:
            return await self._judge(texts, shared)
        except Exception as e:  # noqa: BLE001 - the split is skipped, the whole prompt is guarded instead
            log.warning("split of a flagged prompt skipped: the detector failed (%s: %s)", type(e).__name__,
                        redact(str(e)))
            return None

    async def _split(self, plans: list[_Plan], idx: list[int], shared: bool) -> list[int]:
        """Keep the benign part of flagged mixed prompts (``GuardConfig.split_mixed``); return the indices still to
        guard whole.

        The last user turn is cut into the parts it asks (:func:`guard.prompt.question_parts`) and each part is
        judged alone; the parts flagged alone are removed. The rest is sent to the target only if the conversation
        with it passes the detector as a whole (so the target reads nothing an unflagged prompt could not carry)
        and still asks something; the answer opens with the partial refusal, and its output check keeps the
        flagged targets as what the conversation is about. Otherwise the prompt is guarded whole, as before.
        """
        t0 = time.perf_counter()
        cands: list[tuple[int, int, list[str]]] = []
        for i in idx:
            msgs = plans[i].messages or []
            last = max((j for j, m in enumerate(msgs) if m.get("role") == "user"), default=None)
            if last is None or not isinstance(msgs[last].get("content"), str):
                continue
            parts = question_parts(msgs[last]["content"])
            if len(parts) > 1:
                cands.append((i, last, parts))
        if not cands:
            return idx
        dets = await self._detect_or_none([p for _, _, ps in cands for p in ps], shared)
        if dets is None:
            return idx
        reduced: list[tuple[int, list[Message], int]] = []
        k = 0
        for i, last, parts in cands:
            alone = dets[k:k + len(parts)]
            k += len(parts)
            keep = [p for p, d in zip(parts, alone, strict=True) if not d.flagged]
            if not keep or len(keep) == len(parts) or not asks_something(" ".join(keep)):
                continue
            msgs = [dict(m) for m in plans[i].messages or []]
            msgs[last]["content"] = " ".join(keep)
            reduced.append((i, msgs, len(parts) - len(keep)))
        whole = await self._detect_or_none([detector_input(m) for _, m, _ in reduced], shared) if reduced else []
        if whole is None:
            return idx
        done: set[int] = set()
        for (i, msgs, removed), d in zip(reduced, whole, strict=True):
            if d.flagged:
                continue
            pl = plans[i]
            pl.messages = msgs
            pl.about = tuple(dict.fromkeys([*pl.about, *d.target_ids, *d.about]))
            pl.prefix = refusal_text([t for t in pl.targets if not t.meta.get("unresolved")], self.config,
                                     self.config.partial_refusal_message) + "\n\n"
            pl.trace.parts_removed = removed
            done.add(i)
            log.info("flagged prompt split: %d part(s) removed, the rest answered", removed)
        dt = time.perf_counter() - t0
        for i, _, _ in cands:
            plans[i].trace.add_time("split", dt)
        return [i for i in idx if i not in done]

    def _guard(self, plans: list[_Plan], idx: list[int], texts: list[str]) -> None:
        """Run the CoT guard on the flagged plans and apply each decision."""
        t0 = time.perf_counter()
        decisions: list[tuple[GuardDecision, str, str | None]]
        try:
            decisions = self.cot.decide_batch(texts, [plans[i].targets for i in idx])
        except Exception as e:  # noqa: BLE001 - guard model failure: refusal (closed) or template (open)
            decisions = [self._guard_failed(plans[i], e) for i in idx]
        decisions = [self._instruction_checked(plans[i], d) for i, d in zip(idx, decisions, strict=True)]
        dt = time.perf_counter() - t0
        for i, (dec, source, reason) in zip(idx, decisions, strict=True):
            pl = plans[i]
            tr = pl.trace
            tr.add_time("guard", dt)
            tr.requires_refusal = dec.requires_refusal
            tr.cot_instruction = dec.cot_instruction
            tr.instruction_source = source  # type: ignore[assignment]
            tr.fallback_reason = reason
            known = [t for t in pl.targets if not t.meta.get("unresolved")]
            if dec.requires_refusal:
                pl.refusal = refusal_text(known, self.config)
                pl.messages = None
            else:
                pl.messages = assemble(pl.messages or [], dec.cot_instruction, pl.targets, self.config.system_prompt,
                                       self._markers)

    def _instruction_checked(self, pl: _Plan, decision: tuple[GuardDecision, str, str | None]
                             ) -> tuple[GuardDecision, str, str | None]:
        """The guard model's decision, unless its instruction states a fact of a target the conversation is about
        (the target would read it): then the template instruction, refusing as a failed guard would."""
        dec, source, reason = decision
        check = getattr(self.detector, "stated_facts", None)
        if dec.requires_refusal or not dec.cot_instruction or not callable(check):
            return decision
        try:
            stated = check(dec.cot_instruction, [*pl.about, *(t.id for t in pl.targets)])
        except Exception as e:  # noqa: BLE001 - a failed check is a failed output check
            self._fail_open(pl.trace, Stage.OUTPUT_CHECK, e)
            return decision
        if not stated:
            return decision
        log.warning("the guard's instruction states a forget fact of %s; using the template instruction", stated)
        return (self.cot.fallback(pl.targets, self.config.fallback_requires_refusal), "template",
                f"the guard's instruction stated a fact of {', '.join(stated)}")

    def _guard_failed(self, pl: _Plan, err: Exception) -> tuple[GuardDecision, str, str | None]:
        """A failed guard model under the failure policy (:meth:`_fail_open`): failing closed, the flagged request
        gets the refusal; failing open, the template instruction without refusing."""
        try:
            fault = self._fail_open(pl.trace, Stage.GUARD, err)
            refuse = False
        except GuardUnavailableError as closed:
            fault, refuse = closed.fault, True
        return self.cot.fallback(pl.targets, refuse), "template", f"guard failed: {fault.error}: {fault.message}"

    def _leak_refusal(self, pl: _Plan, after_text: bool = False) -> str:
        """The policy's refusal for an answer the output check blocked (after a blank line when a stream
        has already released text)."""
        known = [t for t in self._resolve(pl.trace.leak_target_ids) if not t.meta.get("unresolved")]
        return ("\n\n" if after_text else "") + refusal_text(known, self.config)

    def _leak_fn(self, shared: bool, about: tuple[str, ...] = ()) -> Callable[[str], Awaitable[Detection]]:
        """How an output check of a conversation about ``about`` calls the detector: through the micro-batcher
        (``shared``) or one deadline-bound call in a worker thread."""
        if shared:
            return lambda text: self._leak_batcher.submit((text, about))
        one = self.detector.detect_leak
        if _takes_about(one):
            return lambda text: self._timed(lambda: one(text, about=list(about)), timeout=self.config.detector_timeout_s)
        return lambda text: self._timed(one, text, timeout=self.config.detector_timeout_s)

    async def _blocked(self, pl: _Plan, text: str, shared: bool) -> bool:
        """Output check of one finished text: True when it must be replaced by the refusal (a failed check goes
        through the failure policy: closed raises, open lets it through)."""
        try:
            return await check_text(self._leak_fn(shared, pl.about), text, self.config, pl.trace)
        except LeakCheckError as e:
            self._fail_open(pl.trace, Stage.OUTPUT_CHECK, e)
            return False

    async def _checked(self, pl: _Plan, o: GenOutput, params: GenParams, shared: bool) -> GuardResult:
        """The guarded result of a generated answer: every choice checked on its own (its text, read as JSON in JSON
        mode, its reasoning, and each tool call's name and arguments); a blocked choice becomes the policy's refusal,
        with no reasoning, tool calls or log probabilities (a fact in the reasoning blocks the answer built on it);
        alternative tokens are withheld where they could name what must be forgotten."""
        choices = o.choices()
        kind = "json" if params.response_format else "content"
        parts = [[(kind, json_text(c.text) if params.response_format else c.text)] * bool(c.text)
                 + [("reasoning", c.reasoning)] * bool(c.reasoning)
                 + [("tool_call", _checked_call_text(tc)) for tc in c.tool_calls]
                 for c in choices]
        flat = [(i, part, text) for i, ps in enumerate(parts) for part, text in ps]
        verdicts = await asyncio.gather(*(self._blocked(pl, text, shared) for _, _, text in flat))
        blocked = [False] * len(choices)
        for (i, part, _), hit in zip(flat, verdicts, strict=True):
            if hit:
                blocked[i] = True
                pl.trace.blocked_parts.append(part)
        pl.trace.choices_blocked += sum(blocked)
        out = []
        for c, hit in zip(choices, blocked, strict=True):
            if hit:
                out.append(GuardResult(text=self._leak_refusal(pl), finish_reason="content_filter", trace=pl.trace))
                continue
            fr = c.finish_reason if c.finish_reason in {"stop", "length", "tool_calls"} else "stop"
            lp = await self._logprobs_checked(pl, c.text, c.logprobs, shared) if c.logprobs is not None else None
            out.append(GuardResult(text=pl.prefix + c.text, finish_reason=fr, trace=pl.trace, tool_calls=c.tool_calls,  # type: ignore[arg-type]
                                   logprobs=lp, reasoning=c.reasoning))
        return out[0].model_copy(update={"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                                         "others": out[1:]})

    async def _logprobs_checked(self, pl: _Plan, text: str, logprobs: dict[str, Any], shared: bool
                                ) -> dict[str, Any] | None:
        """A passed choice's log probabilities, rebuilt from their tokens (``bytes`` recomputed, so no other text rides
        along): the chosen tokens must be the checked text, else they are checked themselves (and all withheld when
        they leak); the alternatives (``top_logprobs``) are other text, kept only when the conversation is about no
        forget target and they, read together, name none (else emptied). The trace says when anything was withheld."""
        content = logprobs.get("content")
        if not isinstance(content, list):
            return None
        entries = [pos for pos in content if isinstance(pos, dict) and isinstance(pos.get("token"), str)]

        def entry(e: dict[str, Any], top: list[dict[str, Any]] | None) -> dict[str, Any]:
            lp = e.get("logprob")
            out = {"token": e["token"], "logprob": float(lp) if isinstance(lp, int | float) else 0.0,
                   "bytes": list(e["token"].encode("utf-8", "replace"))}
            return out if top is None else {**out, "top_logprobs": top}

        chosen = "".join(e["token"] for e in entries)
        if chosen.strip() != text.strip() and chosen.strip() and await self._blocked(pl, chosen, shared):
            pl.trace.logprobs_withheld = True
            return None
        alts = [[a for a in e.get("top_logprobs") or [] if isinstance(a, dict) and isinstance(a.get("token"), str)]
                for e in entries]
        alt_text = " ".join(a["token"] for row in alts for a in row)
        withhold = bool(alt_text.strip()) and (bool(pl.about) or pl.trace.flagged
                                               or await self._blocked(pl, alt_text, shared))
        if withhold:
            pl.trace.logprobs_withheld = True
        return {"content": [entry(e, [] if withhold else [entry(a, None) for a in row])
                            for e, row in zip(entries, alts, strict=True)]}

    # -- the pipeline, written once ---------------------------------------------------------------------
    async def _run(self, prompts: Sequence[Prompt], params: GenParams, raw: bool, shared: bool) -> list[GuardResult]:
        """Guard and answer prompts: one detector batch, one guard batch, one target batch (``shared``: a single
        request of the async API, whose checks join the micro-batches and whose answer is the backend's async
        call, native for HTTP upstreams)."""
        plans = await self._plan(prompts, raw, shared, params)
        try:
            chat_idx = [i for i, p in enumerate(plans) if p.refusal is None and p.messages is not None]
            raw_idx = [i for i, p in enumerate(plans) if p.refusal is None and p.raw_text is not None]
            outs: dict[int, GenOutput] = {}
            t0 = time.perf_counter()
            if chat_idx or raw_idx:
                async with self.upstream_slot():
                    t0 = time.perf_counter()
                    if chat_idx:
                        batch = [plans[i].messages or [] for i in chat_idx]
                        got = ([await self.target.agenerate(batch[0], params)] if shared and len(batch) == 1
                               else await self.target.agenerate_batch(batch, params))
                        outs.update(zip(chat_idx, got, strict=True))
                    if raw_idx:
                        texts = [plans[i].raw_text or "" for i in raw_idx]
                        got = ([await self.target.acomplete(texts[0], params)] if shared and len(texts) == 1
                               else await self.target.acomplete_batch(texts, params))
                        outs.update(zip(raw_idx, got, strict=True))
            gen_dt = time.perf_counter() - t0
            results: list[GuardResult] = []
            for i, pl in enumerate(plans):
                if pl.refusal is not None:
                    refusal = GuardResult(text=pl.refusal, finish_reason="content_filter", trace=pl.trace)
                    results.append(refusal.model_copy(update={"others": [refusal] * (params.n - 1)}))
                    continue
                pl.trace.add_time("generate", gen_dt)
                results.append(await self._checked(pl, outs[i], params, shared))
            return results
        finally:
            for pl in plans:
                pl.trace.add_time("total", time.perf_counter() - pl.t0)

    async def _deltas(self, prompt: Prompt, params: GenParams, raw: bool, box: AsyncGuardStream,
                      shared: bool) -> AsyncIterator[str]:
        """The guarded stream: the prompt is judged before the first delta, the output check runs as the
        backend's async stream (native for HTTP upstreams) arrives; ``box`` gets the trace and finish reason."""
        pl = (await self._plan([prompt], raw, shared, params))[0]
        box.trace = pl.trace
        try:
            if pl.refusal is not None:
                box.finish_reason = "content_filter"
                yield pl.refusal
                return
            checker = StreamChecker(self._leak_fn(shared, pl.about), self.config, pl.trace)
            released_any = bool(pl.prefix)
            if pl.prefix:  # the partial refusal of a split prompt: names no target
                yield pl.prefix
            blocked: str | None = None  # the part the output check blocked, once it has
            n = 0
            calls: list[dict[str, Any]] = []
            async with self.upstream_slot():
                t_gen = time.perf_counter()
                source = (self.target.astream_complete(pl.raw_text, params) if pl.raw_text is not None
                          else self.target.astream(pl.messages or [], params))
                try:
                    async for delta in source:
                        if isinstance(delta, StreamUsage):  # the backend's token counts, after the last delta
                            box.prompt_tokens, box.completion_tokens = delta.prompt_tokens, delta.completion_tokens
                            continue
                        if isinstance(delta, StreamToolCalls):  # whole tool calls, after the last text delta
                            calls = delta.calls
                            continue
                        if isinstance(delta, StreamReasoning):  # whole, before the answer it leads to
                            if await self._blocked(pl, delta.text, shared):
                                blocked = "reasoning"
                                break
                            box.reasoning = delta.text
                            continue
                        n += 1
                        out = await self._step(pl, checker, checker.feed(delta))
                        if out is None:
                            blocked = "content"
                            break
                        if out:
                            released_any = True
                            yield out
                finally:
                    aclose = getattr(source, "aclose", None)
                    if callable(aclose):
                        await aclose()
                    self._add_generate_time(pl, t_gen)
            rest = None if blocked else await self._step(pl, checker, checker.finish())
            if rest is None:
                pl.trace.blocked_parts.append(blocked or "content")
                box.reasoning = None
                pl.trace.choices_blocked += 1
                box.finish_reason = "content_filter"
                yield self._leak_refusal(pl, released_any)
                return
            if rest:
                released_any = True
                yield rest
            if calls:  # checked whole: a half-written argument cannot be judged
                hits = await asyncio.gather(*(self._blocked(pl, _checked_call_text(c), shared)
                                              for c in calls))
                if any(hits):
                    pl.trace.blocked_parts.extend(["tool_call"] * sum(hits))
                    pl.trace.choices_blocked += 1
                    box.finish_reason = "content_filter"
                    yield self._leak_refusal(pl, released_any)
                    return
                box.tool_calls = calls
            if not box.completion_tokens:
                box.completion_tokens = self._count_tokens(checker.text) or n
            box.finish_reason = ("tool_calls" if calls else
                                 "length" if max(n, box.completion_tokens) >= params.max_new_tokens else "stop")
        finally:
            pl.trace.add_time("total", time.perf_counter() - pl.t0)

    async def _step(self, pl: _Plan, checker: StreamChecker, check: Awaitable[str | None]) -> str | None:
        """One output-check step of a stream: what it releases (None: blocked); a failed check goes through the
        failure policy, which raises (closed) or releases the rest unchecked (open)."""
        try:
            return await check
        except LeakCheckError as e:
            self._fail_open(pl.trace, Stage.OUTPUT_CHECK, e)
            return checker.release_unchecked()

    def _count_tokens(self, text: str) -> int:
        """Tokens of a text by the target's tokenizer (0 when the target has none, e.g. an HTTP upstream)."""
        tok = self.target.tokenizer
        if tok is None or not text:
            return 0
        try:
            return len(tok(text, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 - a count is best effort
            return 0

    @staticmethod
    def _add_generate_time(pl: _Plan, t_gen: float) -> None:
        """Generation time of a stream: its wall time less the output checks run while it streamed."""
        pl.trace.add_time("generate", time.perf_counter() - t_gen - pl.trace.timings_ms.get("output_check", 0) / 1000)

    def _astream(self, prompt: Prompt, params: GenParams | None, overrides: dict[str, Any], raw: bool,
                 shared: bool) -> AsyncGuardStream:
        p = self._params(params, overrides)
        if p.needs_whole_answer:
            raise UnsupportedFeatureError("stream", "several choices, log probabilities and JSON output are "
                                          "checked on the whole answer: call generate/agenerate (the proxy streams "
                                          "such a request as whole, checked choices)")
        return AsyncGuardStream(lambda box: self._deltas(prompt, p, raw, box, shared),
                                GuardTrace(output_check_mode=self.config.output_check))

    # -- async API --------------------------------------------------------------------------------------
    async def agenerate(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Guard and answer one prompt; detector calls are batched with concurrent requests, blocking work runs
        in threads."""
        return (await self._run([prompt], self._params(params, overrides), raw=False, shared=True))[0]

    async def agenerate_batch(self, prompts: Sequence[Prompt], params: GenParams | None = None, **overrides: Any
                              ) -> list[GuardResult]:
        """Guard and answer many prompts: one detector batch, one guard batch, one target batch."""
        return await self._run(prompts, self._params(params, overrides), raw=False, shared=False)

    async def acomplete(self, text: str, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Guard and continue a raw text prompt (``/v1/completions``); flagged ones are answered as chat."""
        return (await self._run([text], self._params(params, overrides), raw=True, shared=True))[0]

    def astream(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> AsyncGuardStream:
        """Guard and stream one answer: the prompt and output checks are batched, deltas arrive without blocking
        the event loop."""
        return self._astream(prompt, params, overrides, raw=False, shared=True)

    def astream_complete(self, text: str, params: GenParams | None = None, **overrides: Any) -> AsyncGuardStream:
        """Guard and stream a raw completion."""
        return self._astream(text, params, overrides, raw=True, shared=True)

    # -- sync API: the same pipeline, waited for on the sync-runner loop (core.aio) ------------------------
    def generate_batch(self, prompts: Sequence[Prompt], params: GenParams | None = None, **overrides: Any
                       ) -> list[GuardResult]:
        """Sync ``agenerate_batch``."""
        return run_sync(self._run(prompts, self._params(params, overrides), raw=False, shared=False))

    def generate(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Guard and answer one prompt (a string or chat messages)."""
        return self.generate_batch([prompt], params, **overrides)[0]

    def complete(self, text: str, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Sync ``acomplete`` (its detector call is not shared with other requests)."""
        return run_sync(self._run([text], self._params(params, overrides), raw=True, shared=False))[0]

    def stream(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> GuardStream:
        """Guard and stream one answer; the guard runs before the first delta, the output check as it streams."""
        return GuardStream(self._astream(prompt, params, overrides, raw=False, shared=False))

    def stream_complete(self, text: str, params: GenParams | None = None, **overrides: Any) -> GuardStream:
        """Guard and stream a raw completion."""
        return GuardStream(self._astream(text, params, overrides, raw=True, shared=False))

    def batch_stats(self) -> dict[str, dict[str, float]]:
        """How the async path has batched detector calls so far (batches, items, mean and largest batch)."""
        return {b.name: {"batches": b.stats.batches, "items": b.stats.items, "failed_batches": b.stats.failed_batches,
                         "mean_batch": round(b.stats.mean_batch(), 3), "max_batch": b.stats.max_batch_seen}
                for b in (self._prompt_batcher, self._leak_batcher)}

    # -- run-time targets -------------------------------------------------------------------------------
    def add_target(self, target: ForgetTarget) -> None:
        """Add a forget target at run time (the detector must support ``add_target``)."""
        fn = getattr(self.detector, "add_target", None)
        if not callable(fn):
            raise AdminError(f"detector {type(self.detector).__name__} does not support add_target")
        fn(target)
        self.book.add(target)
        log.info("forget target %s added", target.id)

    def remove_target(self, target_id: str) -> bool:
        """Remove a forget target at run time; False when it was unknown."""
        fn = getattr(self.detector, "remove_target", None)
        if not callable(fn):
            raise AdminError(f"detector {type(self.detector).__name__} does not support remove_target")
        if target_id not in self.book.ids():
            return False
        try:
            res = fn(target_id)
        except (KeyError, LookupError, ValueError) as e:
            log.info("remove_target %s: %s", target_id, e)
            return False
        self.book.remove(target_id)
        log.info("forget target %s removed", target_id)
        return res if isinstance(res, bool) else True

    def replace_detector(self, detector: DetectorProtocol) -> None:
        """Swap in a reloaded forget store; requests already running finish with the previous one."""
        for meth in ("detect", "detect_batch", "detect_leak"):
            if not callable(getattr(detector, meth, None)):
                raise TypeError(f"detector {type(detector).__name__} lacks {meth}(); see guard.types.DetectorProtocol")
        self.book = TargetBook(detector, self._task_targets)
        self.detector = detector
        log.info("forget store replaced: %d targets", len(self.book.ids()))

    def target_ids(self) -> list[str]:
        """The forget targets currently guarded."""
        return self.book.ids()

    def ready(self) -> bool:
        """Whether the target backend answers (the detector is ready once constructed)."""
        return self.target.ready()

    def close(self) -> None:
        """Release threads and backends."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.cot.close()
        self.target.close()


class AsyncGuardStream:
    """Async iterator over a guarded answer's deltas; ``trace`` and ``finish_reason`` are final once it ends.

    The prompt is judged at the first ``__anext__`` (on the event loop's micro-batched path), so a guard
    failure surfaces there, before any delta.
    """

    def __init__(self, make: Callable[[AsyncGuardStream], AsyncIterator[str]], trace: GuardTrace) -> None:
        """``make(self)`` builds the delta generator, which fills in ``trace`` and ``finish_reason``."""
        self.trace = trace
        self.finish_reason: str = "stop"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        """Token counts once the stream has ended (the backend's, else counted with the target's tokenizer)."""
        self.tool_calls: list[dict[str, Any]] = []
        """The answer's tool calls once the stream has ended, each checked whole (none when one was blocked)."""
        self.reasoning: str | None = None
        """The reasoning a reasoning model returned apart, checked whole; set before the first delta of the answer
        (or, with no answer text, once the stream has ended), None when there was none or it was blocked."""
        self._it: AsyncIterator[str] = make(self)

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        """Stop generation early (the upstream request is closed)."""
        await self._it.aclose()  # type: ignore[attr-defined]


def _checked_call_text(call: dict[str, Any]) -> str:
    """What the output check reads of a tool call: its id (upstream text that reaches the client too), its name and
    its arguments."""
    return f"{call.get('id', '')}\n{tool_call_text(call)}"


def _takes_about(fn: Callable[..., Any]) -> bool:
    """Whether a detector's leak check accepts ``about`` (the targets a conversation is about); asked on every output
    check, so the answer is remembered per function."""
    func = getattr(fn, "__func__", fn)  # a bound method's function: the same for every call
    try:
        return _signature_takes_about(func)
    except TypeError:  # an unhashable callable object
        return _signature_takes_about.__wrapped__(func)


@functools.lru_cache(maxsize=256)
def _signature_takes_about(fn: Callable[..., Any]) -> bool:
    """The uncached check of :func:`_takes_about`."""
    try:
        return "about" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _default_guard(target: Backend) -> Backend:
    """The guard model when none is named: the base embedded model (loaded once per process, shared with a target that
    is that model) for a local target that is another model, e.g. a fine-tuned checkpoint that was taught the facts
    it must not state; the target itself otherwise (an HTTP upstream, a scripted backend, the base model)."""
    from core.models import DEFAULT_LLM

    if target.name not in ("transformers", "vllm") or target.model_id in (DEFAULT_LLM, ""):
        return target
    if str(getattr(getattr(target, "llm", None), "source", "")).startswith("tiny-"):
        return target  # a random tiny model of the unit tests: it knows nothing
    log.info("guard model: the base embedded %s (the target %s may know the forget facts)", DEFAULT_LLM,
             target.model_id)
    return make_backend(backend_config(model=DEFAULT_LLM))


def _as_backend(spec: Backend | BackendConfig | str | None) -> Backend:
    """Turn a backend, a config, a model name or None (the embedded default) into a backend."""
    if isinstance(spec, Backend):
        return spec
    if spec is None:
        return make_backend(backend_config())
    if isinstance(spec, str):
        if spec.startswith(("http://", "https://")):
            return make_backend(backend_config(kind="openai", base_url=spec, model="default"))
        return make_backend(backend_config(model=spec))
    if isinstance(spec, BackendConfig):
        return make_backend(spec)
    raise TypeError(f"cannot build a backend from {type(spec).__name__}; pass a Backend, BackendConfig or model name")
