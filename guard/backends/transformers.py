"""Local transformers backend (the default): batched greedy generation via ``core.generation`` and
streaming via ``TextIteratorStreamer`` in a worker thread. JSON output is prefix-forced (no grammar)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from core.generation import chat_text, generate
from core.models import LoadedLLM, load_llm
from guard.backends.base import BACKENDS, Backend, BackendConfig, GenOutput, GenParams, Messages
from guard.types import BackendError

log = logging.getLogger(__name__)
_SHARED: dict[tuple[str, str, str], LoadedLLM] = {}
_SHARED_LOCK = threading.Lock()


def shared_llm(model: str, dtype: str = "float32", device: str = "cpu") -> LoadedLLM:
    """Load a model once per process, so a guard and a target naming the same model share the weights."""
    key = (model, dtype, device)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load_llm(model, dtype=dtype, device=device)
        return _SHARED[key]


class _StopOnEvent:
    """A StoppingCriteria that ends generation once an event is set (the consumer closed the stream)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut text at the first stop string; report whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersConfig(BackendConfig):
    """A Hugging Face causal LM loaded in this process: which dtype, on which device."""

    kind: Literal["transformers"] = "transformers"
    dtype: str = "float32"
    device: str = "cpu"


@BACKENDS.register("transformers")
class TransformersBackend(Backend):
    """A Hugging Face causal LM in this process."""

    name = "transformers"
    config_class = TransformersConfig
    supports_json_schema = False
    supports_prefix = True

    def __init__(self, llm: LoadedLLM, batch_size: int = 16, model_id: str | None = None) -> None:
        """Wrap a loaded model (see ``core.models.load_llm`` / ``tiny_llm``)."""
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.batch_size = batch_size
        self.model_id = model_id or llm.source

    @classmethod
    def from_config(cls, cfg: TransformersConfig) -> TransformersBackend:
        """Load (or reuse) the configured model."""
        return cls(shared_llm(cfg.model, cfg.dtype, cfg.device), batch_size=cfg.batch_size, model_id=cfg.model)

    # -- helpers ------------------------------------------------------------------------------------
    def _gen_kwargs(self, params: GenParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _render(self, messages: Messages, params: GenParams) -> str:
        return chat_text(self.tokenizer, list(messages)) + (params.assistant_prefix or "")

    def _generate_texts(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Generate from already-rendered prompt texts in length-sorted, left-padded batches."""
        import torch

        if params.seed is not None:
            torch.manual_seed(params.seed)
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[GenOutput] = [GenOutput(text="")] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = self.model.generate(**enc, **self._gen_kwargs(params))
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, row, mask in zip(idx, new, enc["attention_mask"], strict=True):
                n_new = int((row != tok.pad_token_id).sum())
                text, stopped = _cut_at_stop(tok.decode(row, skip_special_tokens=True), params.stop)
                finish = "stop" if stopped or n_new < params.max_new_tokens else "length"
                out[i] = GenOutput(text=text, finish_reason=finish, prompt_tokens=int(mask.sum()), completion_tokens=n_new)
        return out

    # -- interface ----------------------------------------------------------------------------------
    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer chat prompts; plain greedy requests go through ``core.generation.generate`` unchanged."""
        if not batch:
            return []
        try:
            if params.assistant_prefix is None and not params.stop and params.seed is None and params.temperature == 0:
                texts = generate(self.model, self.tokenizer, [list(m) for m in batch],
                                 max_new_tokens=params.max_new_tokens, batch_size=self.batch_size)
                outs = []
                for m, t in zip(batch, texts, strict=True):
                    n = self._count(t)
                    outs.append(GenOutput(text=t, finish_reason="length" if n >= params.max_new_tokens else "stop",
                                          prompt_tokens=self._count(chat_text(self.tokenizer, list(m))),
                                          completion_tokens=n))
                return outs
            return [GenOutput(text=o.text.strip(), finish_reason=o.finish_reason, prompt_tokens=o.prompt_tokens,
                              completion_tokens=o.completion_tokens)
                    for o in self._generate_texts([self._render(m, params) for m in batch], params)]
        except Exception as e:
            raise BackendError(f"transformers generation failed: {e.__class__.__name__}: {e}") from e

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Continue raw texts (no chat template)."""
        try:
            return self._generate_texts(list(texts), params)
        except Exception as e:
            raise BackendError(f"transformers completion failed: {e.__class__.__name__}: {e}") from e

    def _stream_text(self, text: str, params: GenParams) -> Iterator[str]:
        """Stream a rendered prompt with TextIteratorStreamer; closing the iterator stops the worker."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        enc = tok([text], return_tensors="pt", add_special_tokens=False).to(device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=120.0)
        stop_event = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**enc, **self._gen_kwargs(params), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event)]))
            except BaseException as e:  # noqa: BLE001 - surfaced to the consumer
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True, name="hf-stream")
        worker.start()
        emitted = ""
        buf = ""
        try:
            for piece in streamer:
                if not piece:
                    continue
                buf += piece
                if params.stop:
                    cut, stopped = _cut_at_stop(buf, params.stop)
                    if stopped:
                        if cut[len(emitted):]:
                            yield cut[len(emitted):]
                        return
                    # hold back a possible stop-string prefix
                    hold = max(len(s) for s in params.stop) - 1
                    safe = buf[:max(len(emitted), len(buf) - hold)]
                else:
                    safe = buf
                if len(safe) > len(emitted):
                    yield safe[len(emitted):]
                    emitted = safe
            if errors:
                raise BackendError(f"transformers streaming failed: {errors[0]!r}") from errors[0]
            if len(buf) > len(emitted):
                yield buf[len(emitted):]
        finally:
            stop_event.set()
            worker.join(timeout=30)

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Yield answer deltas as the model writes them (leading whitespace dropped, like ``generate``)."""
        started = False
        for d in self._stream_text(self._render(messages, params), params):
            if not started:
                d = d.lstrip()
                if not d:
                    continue
                started = True
            yield d

    def stream_complete(self, text: str, params: GenParams) -> Iterator[str]:
        """Yield raw-completion deltas as the model writes them."""
        yield from self._stream_text(text, params)
