"""``GuardedLLM``: detector -> CoT guard -> prompt assembly -> target model -> output check.

Unflagged prompts go to the target exactly as the client sent them (after neutralising role markers,
a no-op on ordinary text), so their answers are the unguarded model's. Flagged prompts get the guard's
instruction in the system turn, or the policy's refusal when the guard says so.

Failure policy (fail closed by default):
* detector error or timeout (prompt check or output check): ``GuardUnavailableError`` (HTTP 503 with
  an OpenAI-style error body), since the guard cannot tell whether the prompt is safe;
* guard-model error or timeout on a flagged prompt: the policy's refusal (finish_reason
  'content_filter'); invalid guard output is not a failure, it falls back to the template instruction;
* ``fail_open=True``: a failed detector lets the request through unguarded and a failed guard model
  uses the template instruction without refusing; each use is logged at WARNING and marked in the trace.

The async API (``agenerate``, ``acomplete``, ``astream``, ``astream_complete``; the HTTP server uses it)
never runs detector work on the event loop, and micro-batches it: the prompts (and the finished answers'
output checks) of concurrent requests share one ``detect_batch`` (``detect_leak_batch``) call in a
worker thread (see :mod:`guard.batching`); texts that arrive while a call runs form the next one. A
failed or late batch call fails every request of the batch through the policy above. An HTTP upstream
is called on its async client (no thread). The sync API is unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.generation import Message, Prompt
from core.guard_format import GuardDecision
from core.schema import ForgetTarget, ForgetTask
from detectors.types import Detection
from guard.backends import Backend, GenOutput, GenParams, make_backend
from guard.batching import MicroBatcher
from guard.config import BackendConfig, GuardConfig
from guard.cot import CoTGuard, refusal_text
from guard.output_check import LeakCheckError, StreamChecker, acheck_text, check_text
from guard.prompt import assemble, neutralise, sanitise_messages, special_tokens_of, user_text
from guard.types import (
    AdminError,
    DetectorProtocol,
    GuardResult,
    GuardTrace,
    GuardUnavailableError,
    TargetBook,
)

log = logging.getLogger(__name__)
R = TypeVar("R")


def redact(text: str) -> str:
    """A log-safe stand-in for a prompt: its length and a short hash, never its words."""
    return f"<redacted {len(text)} chars sha256:{hashlib.sha256(text.encode()).hexdigest()[:10]}>"


@dataclass
class _Plan:
    """What to do for one request once the prompt is judged."""

    trace: GuardTrace
    t0: float
    targets: list[ForgetTarget] = field(default_factory=list)
    messages: list[Message] | None = None
    raw_text: str | None = None
    refusal: str | None = None


class GuardStream:
    """An iterator of answer deltas; ``trace`` and ``finish_reason`` are final once it is exhausted."""

    def __init__(self, gen: Iterator[str], trace: GuardTrace) -> None:
        """Wrap the guarded delta generator."""
        self._gen = gen
        self.trace = trace
        self.finish_reason: str = "stop"

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        """Stop generation early."""
        close = getattr(self._gen, "close", None)
        if callable(close):
            close()


class GuardedLLM:
    """A target LLM behind the forget guard: ``generate``/``agenerate``/``generate_batch``/``stream``/``astream``."""

    def __init__(self, target: Backend | BackendConfig | str | None = None, detector: DetectorProtocol | None = None,
                 guard: Backend | BackendConfig | CoTGuard | str | None = None, config: GuardConfig | None = None,
                 targets: ForgetTask | Sequence[ForgetTarget] | None = None) -> None:
        """Build from backends or their configs; ``guard`` None reuses the target model (loaded once)."""
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
            guard_backend = self.target if guard is None else _as_backend(guard)
            self.cot = CoTGuard(None if self.config.guard_mode == "template" else guard_backend, self.config)
        tlist = targets.targets if isinstance(targets, ForgetTask) else list(targets or [])
        self._task_targets = tlist
        self.book = TargetBook(detector, tlist)
        self._markers = special_tokens_of(self.target.tokenizer)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="guard-detector")
        window_s = self.config.detector_batch_window_ms / 1000.0
        self._prompt_batcher: MicroBatcher[str, Detection] = MicroBatcher(
            self._detect_prompts, window_s=window_s, max_batch=self.config.detector_max_batch,
            max_inflight=self.config.detector_max_inflight, timeout_s=self._batch_timeout, executor=self._pool,
            name="detect_batch")
        self._leak_batcher: MicroBatcher[str, Detection] = MicroBatcher(
            self._detect_leaks, window_s=window_s, max_batch=self.config.detector_max_batch,
            max_inflight=self.config.detector_max_inflight, timeout_s=self._batch_timeout, executor=self._pool,
            name="detect_leak_batch")
        if self.config.fail_open:
            log.warning("guard configured with fail_open=True: detector/guard failures will let requests through")

    # -- helpers ----------------------------------------------------------------------------------------
    def _params(self, params: GenParams | None, overrides: dict[str, Any]) -> GenParams:
        base = params or GenParams(max_new_tokens=self.config.max_new_tokens)
        clean = {k: v for k, v in overrides.items() if v is not None}
        return base.model_copy(update=clean) if clean else base

    def _timed(self, fn: Callable[..., R], *args: Any, timeout: float) -> R:
        """Run a detector call with a deadline (a late detector is a failed detector)."""
        fut = self._pool.submit(fn, *args)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout:.1f}s") from e

    def _fail_open(self, trace: GuardTrace, stage: str, err: BaseException) -> None:
        """Apply the failure policy: log and mark fail-open, or raise GuardUnavailableError."""
        msg = f"{err.__class__.__name__}: {err}"
        trace.errors.append(f"{stage}: {msg}")
        if not self.config.fail_open:
            log.error("guard stage %s failed (%s); failing closed", stage, msg)
            raise GuardUnavailableError(stage, msg) from err
        trace.fail_open_used = True
        log.warning("FAIL-OPEN used: guard stage %s failed (%s); request continues unguarded at this stage", stage, msg)

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

    def _detect_prompts(self, texts: list[str]) -> list[Detection]:
        """One batched prompt check (run by the micro-batcher in a worker thread)."""
        return list(self.detector.detect_batch(texts))

    def _detect_leaks(self, texts: list[str]) -> list[Detection]:
        """One batched output check: ``detect_leak_batch`` where the detector has it, else one call per text."""
        many = getattr(self.detector, "detect_leak_batch", None)
        if callable(many):
            return list(many(texts))
        return [self.detector.detect_leak(t) for t in texts]

    def _detect_many(self, texts: list[str], traces: list[GuardTrace]) -> list[Detection | None]:
        """Judge prompts with a deadline; None for each when failing open."""
        t0 = time.perf_counter()
        try:
            if len(texts) == 1:
                dets: list[Detection | None] = [self._timed(self.detector.detect, texts[0],
                                                            timeout=self.config.detector_timeout_s)]
            else:
                dets = list(self._timed(self.detector.detect_batch, texts,
                                        timeout=self.config.detector_timeout_s * max(1, len(texts) / 8)))
            if len(dets) != len(texts):
                raise RuntimeError(f"detect_batch returned {len(dets)} results for {len(texts)} prompts")
        except GuardUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - any detector failure goes through the failure policy
            for tr in traces:
                self._fail_open(tr, "detector", e)
            dets = [None] * len(texts)
        dt = time.perf_counter() - t0
        for tr in traces:
            tr.add_time("detect", dt)
        return dets

    async def _adetect(self, text: str, trace: GuardTrace) -> Detection | None:
        """Judge one prompt through the micro-batcher; None when failing open."""
        t0 = time.perf_counter()
        try:
            det: Detection | None = await self._prompt_batcher.submit(text)
        except Exception as e:  # noqa: BLE001 - any detector failure goes through the failure policy
            self._fail_open(trace, "detector", e)
            det = None
        finally:
            trace.add_time("detect", time.perf_counter() - t0)
        return det

    def _prepare(self, prompts: Sequence[Prompt], raw: bool) -> tuple[list[_Plan], list[str], list[list[Message]]]:
        """Sanitise the prompts: a plan per prompt, the text the detector judges, the messages to send."""
        plans: list[_Plan] = []
        texts: list[str] = []
        msgs_list: list[list[Message]] = []
        for p in prompts:
            plans.append(_Plan(trace=GuardTrace(output_check_mode=self.config.output_check), t0=time.perf_counter()))
            if raw:
                if not isinstance(p, str):
                    raise TypeError("raw completion prompts must be strings")
                msgs = [{"role": "user", "content": neutralise(p, self._markers)}]
                texts.append(p)
            else:
                msgs = sanitise_messages(p, self._markers)
                texts.append(user_text(msgs))
            msgs_list.append(msgs)
        return plans, texts, msgs_list

    def _plan_batch(self, prompts: Sequence[Prompt], raw: bool = False) -> list[_Plan]:
        """Judge the prompts and decide, for each, refusal or the messages to send."""
        plans, texts, msgs_list = self._prepare(prompts, raw)
        dets = self._detect_many(texts, [pl.trace for pl in plans])
        flagged = self._apply(plans, dets, texts, msgs_list, prompts, raw)
        if flagged:
            self._guard(plans, flagged, [texts[i] for i in flagged])
        return plans

    async def _aplan(self, prompt: Prompt, raw: bool) -> _Plan:
        """Async ``_plan_batch`` for one prompt: batched detection; a guard LLM, if any, runs in a thread."""
        plans, texts, msgs_list = self._prepare([prompt], raw)
        dets = [await self._adetect(texts[0], plans[0].trace)]
        flagged = self._apply(plans, dets, texts, msgs_list, [prompt], raw)
        if flagged:
            if getattr(self.cot, "backend", True) is None:  # template-only guard: cheap, no model call
                self._guard(plans, flagged, [texts[0]])
            else:
                await asyncio.to_thread(self._guard, plans, flagged, [texts[0]])
        return plans[0]

    def _apply(self, plans: list[_Plan], dets: list[Detection | None], texts: list[str],
               msgs_list: list[list[Message]], prompts: Sequence[Prompt], raw: bool) -> list[int]:
        """Record the verdicts in the plans; return the indices of the flagged prompts."""
        flagged: list[int] = []
        for i, (pl, det, msgs, prompt) in enumerate(zip(plans, dets, msgs_list, prompts, strict=True)):
            if det is not None:
                pl.trace.flagged, pl.trace.score, pl.trace.threshold = det.flagged, det.score, det.threshold
                pl.trace.target_ids = list(det.target_ids)
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

    def _guard(self, plans: list[_Plan], idx: list[int], texts: list[str]) -> None:
        """Run the CoT guard on the flagged plans and apply each decision."""
        t0 = time.perf_counter()
        decisions: list[tuple[GuardDecision, str, str | None]]
        try:
            decisions = self.cot.decide_batch(texts, [plans[i].targets for i in idx])
        except Exception as e:  # noqa: BLE001 - guard model failure: refusal (closed) or template (open)
            msg = f"{e.__class__.__name__}: {e}"
            decisions = []
            for i in idx:
                tr = plans[i].trace
                tr.errors.append(f"guard: {msg}")
                if self.config.fail_open:
                    tr.fail_open_used = True
                    log.warning("FAIL-OPEN used: guard model failed (%s); answering with the template instruction", msg)
                    decisions.append((self.cot.fallback(plans[i].targets, False), "template", f"guard failed: {msg}"))
                else:
                    log.error("guard model failed (%s); refusing the flagged request", msg)
                    decisions.append((self.cot.fallback(plans[i].targets, True), "template", f"guard failed: {msg}"))
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

    def _leak_refusal(self, pl: _Plan, after_text: bool = False) -> str:
        """The policy's refusal for an answer the output check blocked (after a blank line when a stream
        has already released text)."""
        known = [t for t in self._resolve(pl.trace.leak_target_ids) if not t.meta.get("unresolved")]
        return ("\n\n" if after_text else "") + refusal_text(known, self.config)

    def _check(self, pl: _Plan, text: str) -> str | None:
        """Output check of a finished answer: the refusal to substitute, or None to keep it."""
        try:
            blocked = check_text(self._leak_now, text, self.config, pl.trace)
        except LeakCheckError as e:
            self._fail_open(pl.trace, "output_check", e)
            return None
        return self._leak_refusal(pl) if blocked else None

    def _leak_now(self, text: str) -> Detection:
        """One output check with a deadline, waited for in the calling thread (the sync path)."""
        return self._timed(self.detector.detect_leak, text, timeout=self.config.detector_timeout_s)

    async def _acheck(self, pl: _Plan, text: str) -> str | None:
        """Async ``_check``: the leak check goes through the micro-batcher; same policy on failure."""
        try:
            blocked = await acheck_text(self._leak_batcher.submit, text, self.config, pl.trace)
        except LeakCheckError as e:
            self._fail_open(pl.trace, "output_check", e)
            return None
        return self._leak_refusal(pl) if blocked else None

    def _answer(self, pl: _Plan, o: GenOutput, substitute: str | None) -> GuardResult:
        """The result of a generated answer: the model's text, or the refusal the output check substituted."""
        if substitute is not None:
            return GuardResult(text=substitute, finish_reason="content_filter", trace=pl.trace,
                               prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens)
        fr = o.finish_reason if o.finish_reason in {"stop", "length"} else "stop"
        return GuardResult(text=o.text, finish_reason=fr, trace=pl.trace,  # type: ignore[arg-type]
                           prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens)

    # -- sync API ---------------------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[Prompt], params: GenParams | None = None, **overrides: Any
                       ) -> list[GuardResult]:
        """Guard and answer many prompts: one detector batch, one guard batch, one target batch."""
        return self._run(prompts, self._params(params, overrides), raw=False)

    def generate(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Guard and answer one prompt (a string or chat messages)."""
        return self.generate_batch([prompt], params, **overrides)[0]

    def complete(self, text: str, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Guard and continue a raw text prompt (``/v1/completions``); flagged ones are answered as chat."""
        return self._run([text], self._params(params, overrides), raw=True)[0]

    def _run(self, prompts: Sequence[Prompt], params: GenParams, raw: bool) -> list[GuardResult]:
        plans = self._plan_batch(prompts, raw=raw)
        results: list[GuardResult | None] = [None] * len(plans)
        chat_idx = [i for i, p in enumerate(plans) if p.refusal is None and p.messages is not None]
        raw_idx = [i for i, p in enumerate(plans) if p.refusal is None and p.raw_text is not None]
        outs: dict[int, Any] = {}
        t0 = time.perf_counter()
        if chat_idx:
            for i, o in zip(chat_idx, self.target.generate_batch([plans[i].messages or [] for i in chat_idx], params),
                            strict=True):
                outs[i] = o
        if raw_idx:
            for i, o in zip(raw_idx, self.target.complete_batch([plans[i].raw_text or "" for i in raw_idx], params),
                            strict=True):
                outs[i] = o
        gen_dt = time.perf_counter() - t0
        for i, pl in enumerate(plans):
            if pl.refusal is not None:
                results[i] = GuardResult(text=pl.refusal, finish_reason="content_filter", trace=pl.trace)
            else:
                pl.trace.add_time("generate", gen_dt)
                o = outs[i]
                results[i] = self._answer(pl, o, self._check(pl, o.text))
            pl.trace.add_time("total", time.perf_counter() - pl.t0)
        return [r for r in results if r is not None]

    def stream(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> GuardStream:
        """Guard and stream one answer; the guard runs before the first delta, the output check as it streams."""
        return self._stream(prompt, self._params(params, overrides), raw=False)

    def stream_complete(self, text: str, params: GenParams | None = None, **overrides: Any) -> GuardStream:
        """Guard and stream a raw completion."""
        return self._stream(text, self._params(params, overrides), raw=True)

    def _stream(self, prompt: Prompt, params: GenParams, raw: bool) -> GuardStream:
        """The guarded stream of the sync API: the prompt is judged at the first ``next``."""
        holder: dict[str, GuardStream] = {}
        trace_box = GuardTrace(output_check_mode=self.config.output_check)

        def gen() -> Iterator[str]:
            pl = self._plan_batch([prompt], raw=raw)[0]
            gs = holder["s"]
            gs.trace = pl.trace
            try:
                if pl.refusal is not None:
                    gs.finish_reason = "content_filter"
                    yield pl.refusal
                    return
                source = (self.target.stream_complete(pl.raw_text, params) if pl.raw_text is not None
                          else self.target.stream(pl.messages or [], params))
                checker = StreamChecker(self._leak_now, self.config, pl.trace)
                released_any = False
                t_gen = time.perf_counter()
                n = 0
                try:
                    for delta in source:
                        n += 1
                        try:
                            out = checker.feed(delta)
                        except LeakCheckError as e:
                            out = self._unchecked(pl, checker, e)
                        if out is None:
                            gs.finish_reason = "content_filter"
                            yield self._leak_refusal(pl, released_any)
                            return
                        if out:
                            released_any = True
                            yield out
                finally:
                    close = getattr(source, "close", None)
                    if callable(close):
                        close()
                    self._add_generate_time(pl, t_gen)
                try:
                    rest = checker.finish()
                except LeakCheckError as e:
                    rest = self._unchecked(pl, checker, e)
                if rest is None:
                    gs.finish_reason = "content_filter"
                    yield self._leak_refusal(pl, released_any)
                    return
                if rest:
                    yield rest
                gs.finish_reason = "length" if n >= params.max_new_tokens else "stop"
            finally:
                pl.trace.add_time("total", time.perf_counter() - pl.t0)

        s = GuardStream(gen(), trace_box)
        holder["s"] = s
        return s


    def _unchecked(self, pl: _Plan, checker: StreamChecker, err: LeakCheckError) -> str:
        """A failed output check mid-stream: the failure policy raises (closed) or the rest goes out unchecked."""
        self._fail_open(pl.trace, "output_check", err)
        return checker.release_unchecked()

    @staticmethod
    def _add_generate_time(pl: _Plan, t_gen: float) -> None:
        """Generation time of a stream: its wall time less the output checks run while it streamed."""
        pl.trace.add_time("generate", time.perf_counter() - t_gen - pl.trace.timings_ms.get("output_check", 0) / 1000)

    # -- async API --------------------------------------------------------------------------------------
    async def agenerate(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Async ``generate``: detector calls are batched with concurrent requests, blocking work runs in threads."""
        return await self._arun(prompt, self._params(params, overrides), raw=False)

    async def agenerate_batch(self, prompts: Sequence[Prompt], params: GenParams | None = None, **overrides: Any
                              ) -> list[GuardResult]:
        """Async ``generate_batch``."""
        return await asyncio.to_thread(self.generate_batch, prompts, params, **overrides)

    async def acomplete(self, text: str, params: GenParams | None = None, **overrides: Any) -> GuardResult:
        """Async ``complete`` (batched detector calls, as ``agenerate``)."""
        return await self._arun(text, self._params(params, overrides), raw=True)

    async def _arun(self, prompt: Prompt, params: GenParams, raw: bool) -> GuardResult:
        """One request through the async pipeline: batched checks, then the backend's async call (native for HTTP
        upstreams, a worker thread for in-process models)."""
        pl = await self._aplan(prompt, raw)
        try:
            if pl.refusal is not None:
                return GuardResult(text=pl.refusal, finish_reason="content_filter", trace=pl.trace)
            t0 = time.perf_counter()
            if pl.raw_text is not None:
                o = await self.target.acomplete(pl.raw_text, params)
            else:
                o = await self.target.agenerate(pl.messages or [], params)
            pl.trace.add_time("generate", time.perf_counter() - t0)
            return self._answer(pl, o, await self._acheck(pl, o.text))
        finally:
            pl.trace.add_time("total", time.perf_counter() - pl.t0)

    async def _agen(self, prompt: Prompt, params: GenParams, raw: bool, box: AsyncGuardStream) -> AsyncIterator[str]:
        """The async guarded stream: the prompt check and the output checks join the micro-batches, the
        answer comes from the backend's async stream (native for HTTP upstreams); no thread is held."""
        pl = await self._aplan(prompt, raw)
        box.trace = pl.trace
        try:
            if pl.refusal is not None:
                box.finish_reason = "content_filter"
                yield pl.refusal
                return
            source = (self.target.astream_complete(pl.raw_text, params) if pl.raw_text is not None
                      else self.target.astream(pl.messages or [], params))
            checker = StreamChecker(None, self.config, pl.trace, adetect_leak=self._leak_batcher.submit)
            released_any = False
            t_gen = time.perf_counter()
            n = 0
            try:
                async for delta in source:
                    n += 1
                    try:
                        out = await checker.afeed(delta)
                    except LeakCheckError as e:
                        out = self._unchecked(pl, checker, e)
                    if out is None:
                        box.finish_reason = "content_filter"
                        yield self._leak_refusal(pl, released_any)
                        return
                    if out:
                        released_any = True
                        yield out
            finally:
                aclose = getattr(source, "aclose", None)
                if callable(aclose):
                    await aclose()
                self._add_generate_time(pl, t_gen)
            try:
                rest = await checker.afinish()
            except LeakCheckError as e:
                rest = self._unchecked(pl, checker, e)
            if rest is None:
                box.finish_reason = "content_filter"
                yield self._leak_refusal(pl, released_any)
                return
            if rest:
                yield rest
            box.finish_reason = "length" if n >= params.max_new_tokens else "stop"
        finally:
            pl.trace.add_time("total", time.perf_counter() - pl.t0)

    def astream(self, prompt: Prompt, params: GenParams | None = None, **overrides: Any) -> AsyncGuardStream:
        """Async ``stream``: the prompt and output checks are batched, deltas arrive without blocking the event loop."""
        return AsyncGuardStream(lambda box: self._agen(prompt, self._params(params, overrides), False, box),
                                GuardTrace(output_check_mode=self.config.output_check))

    def astream_complete(self, text: str, params: GenParams | None = None, **overrides: Any) -> AsyncGuardStream:
        """Async ``stream_complete``."""
        return AsyncGuardStream(lambda box: self._agen(text, self._params(params, overrides), True, box),
                                GuardTrace(output_check_mode=self.config.output_check))

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
        self._it: AsyncIterator[str] = make(self)

    def __aiter__(self) -> AsyncGuardStream:
        return self

    async def __anext__(self) -> str:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        """Stop generation early (the upstream request is closed)."""
        await self._it.aclose()  # type: ignore[attr-defined]


def _as_backend(spec: Backend | BackendConfig | str | None) -> Backend:
    """Turn a backend, a config, a model name or None (the embedded default) into a backend."""
    if isinstance(spec, Backend):
        return spec
    if spec is None:
        return make_backend(BackendConfig())
    if isinstance(spec, str):
        if spec.startswith(("http://", "https://")):
            return make_backend(BackendConfig(kind="openai", base_url=spec, model="default"))
        return make_backend(BackendConfig(model=spec))
    if isinstance(spec, BackendConfig):
        return make_backend(spec)
    raise TypeError(f"cannot build a backend from {type(spec).__name__}; pass a Backend, BackendConfig or model name")
