"""Local transformers backend (the default): batched greedy generation via ``core.generation`` and
streaming via ``TextIteratorStreamer`` in a worker thread.

The chat API's optional features it implements (``TransformersBackend.features``): ``n`` choices, ``logprobs`` and
``top_logprobs``, ``frequency_penalty``/``presence_penalty`` and ``logit_bias`` (logits processors, streams included)
and ``response_format`` (JSON grammar via xgrammar's Hugging Face logits processor, where xgrammar is installed).
The guard's own ``json_schema`` (its decision schema) is grammar-constrained the same way; without xgrammar it is
prefix-forced instead. Tools are not implemented.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from core.generation import chat_text, generate
from core.models import LoadedLLM, load_llm
from guard.backends.base import (
    BACKENDS,
    Backend,
    BackendConfig,
    GenOutput,
    GenParams,
    Messages,
    logprob_entry,
)
from guard.types import BackendError, RequestFieldError

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


class _StopOnStrings:
    """A StoppingCriteria that ends a row once its generated text (never the prompt, as OpenAI's ``stop`` reads)
    contains a stop string: each step decodes the row's last tokens, enough to hold the longest stop string (every
    token writes at least one character), so a step costs a short decode whatever the answer's length."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.width = prompt_width
        self.tail = max((len(s) for s in self.stop), default=0) + 1

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.width:][:, -self.tail:].tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut text at the first stop string; report whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


_FEATURES = frozenset({"n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias"})
_BIAS_LIMIT = 100.0  # OpenAI's (and vLLM's) logit_bias range: values beyond it are clamped, as vLLM does
_LOGITS_BUDGET_BYTES = 1 << 30  # raw logits kept per generate call when log probabilities are asked for


class PenaltyLogitsProcessor:
    """OpenAI's frequency and presence penalties as a transformers logits processor: ``scores[t] -= frequency *
    count(t) + presence * (count(t) > 0)``, counting token ``t`` in the generated tokens only (not the prompt)."""

    def __init__(self, prompt_len: int, frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> None:
        """``prompt_len``: the (padded) prompt width, after which ``input_ids`` holds generated tokens."""
        self.prompt_len = prompt_len
        self.frequency = float(frequency_penalty)
        self.presence = float(presence_penalty)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Penalise the scores of the tokens generated so far (no change before the first one)."""
        import torch

        gen = input_ids[:, self.prompt_len:]
        if gen.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogitBiasLogitsProcessor:
    """OpenAI's ``logit_bias`` as a transformers logits processor: a fixed bias added to some tokens' logits."""

    def __init__(self, bias: Any) -> None:
        """``bias``: a tensor with one value per vocabulary entry (zero for unbiased tokens)."""
        self.bias = bias

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Add the bias to every row's scores."""
        return scores + self.bias.to(device=scores.device, dtype=scores.dtype)


def parse_logit_bias(logit_bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    """Token ids and biases of an OpenAI ``logit_bias`` (token-id strings to biases), validated against the model's
    vocabulary so that a wrong id is refused instead of silently ignored; biases are clamped to [-100, 100]."""
    out: dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            tid = int(str(key).strip())
        except ValueError:
            raise RequestFieldError("logit_bias", f"logit_bias key {key!r} is not a token id; accepted: integer token ids (as strings) "
                             f"from 0 to {vocab_size - 1}") from None
        if not 0 <= tid < vocab_size:
            raise RequestFieldError("logit_bias", f"logit_bias token id {tid} is outside this model's vocabulary; accepted: 0 to "
                             f"{vocab_size - 1}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RequestFieldError("logit_bias", f"logit_bias value for token {tid} must be a finite number (-100 to 100), got {value!r}")
        out[tid] = max(-_BIAS_LIMIT, min(_BIAS_LIMIT, float(value)))
    return out


def _json_grammar_schema(response_format: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema a client's ``response_format`` asks for: its own (json_schema) or any object (json_object)."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:  # OpenAI's schema is optional: without one, any JSON object
            return {"type": "object"}
        if not isinstance(schema, dict):
            raise RequestFieldError("response_format", f"response_format.json_schema.schema must be a JSON schema object, got "
                             f"{type(schema).__name__}")
        return schema
    raise RequestFieldError("response_format", f"response_format type {kind!r} cannot be constrained by the transformers backend; accepted: "
                     "'json_object', 'json_schema' ('text' is the default and needs no response_format)")


def _xgrammar_importable() -> bool:
    """Whether xgrammar can be imported here (it constrains ``response_format`` output)."""
    try:
        import xgrammar  # noqa: F401
        import xgrammar.contrib.hf  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no grammar-constrained output
        return False
    return True


class _Controls:
    """What a request asks of the logits (penalties, biases, a JSON grammar), validated before anything runs; each
    ``generate`` call gets fresh processors from :meth:`processors`."""

    def __init__(self, frequency: float, presence: float, bias: Any, grammar: Any) -> None:
        self.frequency, self.presence, self.bias, self.grammar = frequency, presence, bias, grammar

    def processors(self, prompt_len: int) -> list[Any]:
        """The logits processors of one generate call (the grammar's matcher state is per call)."""
        procs: list[Any] = []
        if self.frequency or self.presence:
            procs.append(PenaltyLogitsProcessor(prompt_len, self.frequency, self.presence))
        if self.bias is not None:
            procs.append(LogitBiasLogitsProcessor(self.bias))
        if self.grammar is not None:
            import xgrammar.contrib.hf

            procs.append(xgrammar.contrib.hf.LogitsProcessor(self.grammar))
        return procs


def _stripped(o: GenOutput) -> GenOutput:
    """A chat answer with every choice's text stripped of surrounding whitespace (as ``generate`` returns it)."""
    return o.model_copy(update={"text": o.text.strip(), "others": [c.model_copy(update={"text": c.text.strip()})
                                                                    for c in o.others]})


class TransformersConfig(BackendConfig):
    """A Hugging Face causal LM loaded in this process: which dtype, on which device."""

    kind: Literal["transformers"] = "transformers"
    dtype: str = "float32"
    device: str = "cpu"


@BACKENDS.register("transformers")
class TransformersBackend(Backend):
    """A Hugging Face causal LM in this process.

    Log probabilities (``logprobs``/``top_logprobs``) are the log-softmax of the model's raw logits at each step,
    before penalties, ``logit_bias``, the JSON grammar and temperature: vLLM's default (``logprobs_mode=
    'raw_logprobs'``), so the two local backends report the same numbers. They cover the generated tokens up to the
    end-of-sequence token or the stop string; each token is decoded on its own (the chosen ones as the text is, with
    special tokens hidden; alternatives with special tokens shown), ``bytes`` being its text's UTF-8 bytes.
    """

    name = "transformers"
    config_class = TransformersConfig
    supports_json_schema = False
    supports_prefix = True
    features = _FEATURES | ({"response_format"} if importlib.util.find_spec("xgrammar") else frozenset())

    def __init__(self, llm: LoadedLLM, batch_size: int = 16, model_id: str | None = None) -> None:
        """Wrap a loaded model (see ``core.models.load_llm`` / ``tiny_llm``)."""
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.batch_size = batch_size
        self.model_id = model_id or llm.source
        # response_format needs xgrammar importable here (it is not a dependency of the project)
        self.features = _FEATURES | ({"response_format"} if _xgrammar_importable() else frozenset())
        self.supports_json_schema = "response_format" in self.features  # the guard's decision schema, by grammar
        self._grammar_compiler: Any = None
        self._grammar_lock = threading.Lock()

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

    def vocab_size(self) -> int:
        """The width of the model's logits (which token ids ``logit_bias`` and the grammar mask can name)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        return int(weight.shape[0]) if weight is not None else int(self.model.config.vocab_size)

    def _eos_ids(self) -> list[int]:
        """The token ids that end generation (the generation config's, else the tokenizer's end-of-sequence)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [int(e) for e in ([] if eos is None else eos if isinstance(eos, list | tuple) else [eos])]

    def _grammar(self, schema: dict[str, Any], field: str = "response_format") -> Any:
        """The compiled xgrammar grammar of a JSON schema (the compiler is built once, its cache reused); ``field`` is
        the request field a failure is reported against."""
        if "response_format" not in self.features:
            raise RequestFieldError(field, f"{field} needs the xgrammar package, which cannot be imported here; "
                                    "install xgrammar or send the request without it")
        import xgrammar as xgr

        with self._grammar_lock:
            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size(),
                                                          stop_token_ids=self._eos_ids() or None)
                self._grammar_compiler = xgr.GrammarCompiler(info)
        try:
            # compact JSON (no free whitespace): a weak model cannot fill max_new_tokens with blanks
            return self._grammar_compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for a schema it cannot take
            raise RequestFieldError(field, f"{field}: the JSON schema cannot be compiled into a grammar: {e}") from e

    def _controls(self, params: GenParams) -> _Controls:
        """Validate what the request asks of the logits (ValueError saying what is wrong) and prepare it."""
        bias = None
        if params.logit_bias:
            import torch

            size = self.vocab_size()
            parsed = parse_logit_bias(params.logit_bias, size)
            bias = torch.zeros(size)
            if parsed:
                bias[list(parsed)] = torch.tensor(list(parsed.values()))
        grammar = None
        if params.response_format:
            grammar = self._grammar(_json_grammar_schema(params.response_format))
        elif params.json_schema is not None and params.assistant_prefix is None:
            grammar = self._grammar(params.json_schema, "json_schema")
        return _Controls(params.frequency_penalty or 0.0, params.presence_penalty or 0.0, bias, grammar)

    @staticmethod
    def _plain(params: GenParams) -> bool:
        """Whether a chat request is plain greedy decoding with none of the optional features (the fast path)."""
        return (params.assistant_prefix is None and not params.stop and params.seed is None
                and params.temperature == 0 and params.n == 1 and not params.logprobs and not params.top_logprobs
                and not params.response_format and not params.frequency_penalty and not params.presence_penalty
                and not params.logit_bias and params.json_schema is None)

    def _logprobs(self, ids: list[int], steps: Any, k: int) -> dict[str, Any]:
        """OpenAI's logprobs object of chosen tokens ``ids`` from their steps' raw logits (one row per token)."""
        import torch

        tok = self.tokenizer
        if not ids:
            return {"content": []}
        lps = torch.log_softmax(steps.float(), dim=-1)
        chosen = lps[torch.arange(len(ids)), torch.tensor(ids)].tolist()
        top_v, top_i = torch.topk(lps, k, dim=-1) if k else (None, None)
        content = []
        for t, (tid, lp) in enumerate(zip(ids, chosen, strict=True)):
            alts = ([logprob_entry(tok.decode([a], skip_special_tokens=False), v)
                     for a, v in zip(top_i[t].tolist(), top_v[t].tolist(), strict=True)] if k else [])
            content.append(logprob_entry(tok.decode([tid], skip_special_tokens=True), lp, alts))
        return {"content": content}

    def _choice(self, row: Any, params: GenParams, logits: Any, r: int) -> GenOutput:
        """One generated row as a choice: text cut at a stop string, its finish reason, token count and, when
        ``logits`` (every step's raw logits, a tuple of (rows, vocab) tensors) are given, row ``r``'s log
        probabilities."""
        import torch

        tok = self.tokenizer
        n_new = int((row != tok.pad_token_id).sum())
        text, stopped = _cut_at_stop(tok.decode(row, skip_special_tokens=True), params.stop)
        finish = "stop" if stopped or n_new < params.max_new_tokens else "length"
        lp = None
        if logits is not None:
            ids = row.tolist()
            eos = set(self._eos_ids())
            end = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            ids = ids[:end]
            if stopped:  # the tokens that wrote the kept text (the stop string's own tokens are not the answer)
                keep, acc = 0, 0
                while keep < len(ids) and acc < len(text):
                    acc += len(tok.decode([ids[keep]], skip_special_tokens=True))
                    keep += 1
                ids = ids[:keep]
            steps = torch.stack([s[r] for s in logits[: len(ids)]]) if ids else None
            lp = self._logprobs(ids, steps, params.top_logprobs)
        return GenOutput(text=text, finish_reason=finish, completion_tokens=n_new, logprobs=lp)

    def _generate_texts(self, texts: Sequence[str], params: GenParams, ctl: _Controls | None = None) -> list[GenOutput]:
        """Generate from already-rendered prompt texts in length-sorted, left-padded batches: ``params.n`` choices
        per prompt (sampled, or one greedy answer repeated as vLLM does), usage totals on the first choice."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        ctl = ctl if ctl is not None else self._controls(params)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[GenOutput] = [GenOutput(text="")] * len(texts)
        k = params.n if params.temperature > 0 else 1  # greedy choices are all the same: generated once
        want_lp = params.logprobs or params.top_logprobs > 0
        per_call = self.batch_size
        if want_lp:  # every step's raw logits are kept until the call ends: bound their memory
            row_bytes = k * params.max_new_tokens * self.vocab_size() * 4
            per_call = max(1, min(per_call, _LOGITS_BUDGET_BYTES // row_bytes))
        for start in range(0, len(order), per_call):
            idx = order[start:start + per_call]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            width = enc["input_ids"].shape[1]
            kw = self._gen_kwargs(params)
            procs = ctl.processors(width)
            if procs:
                kw["logits_processor"] = LogitsProcessorList(procs)
            if params.stop:  # each row ends at its stop string (its text is still cut there after decoding)
                kw["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tok, params.stop, width)])
            if k > 1:
                kw["num_return_sequences"] = k
            if want_lp:
                kw.update(return_dict_in_generate=True, output_logits=True)
            with torch.no_grad():
                gen = self.model.generate(**enc, **kw)
            seqs, logits = (gen.sequences, gen.logits) if want_lp else (gen, None)
            new = seqs[:, width:]
            for j, (i, mask) in enumerate(zip(idx, enc["attention_mask"], strict=True)):
                choices = [self._choice(new[j * k + c], params, logits, j * k + c) for c in range(k)]
                choices += [choices[0].model_copy(deep=True) for _ in range(params.n - k)]
                total = sum(c.completion_tokens for c in choices)
                others = [c.model_copy(update={"completion_tokens": 0}) for c in choices[1:]]
                out[i] = choices[0].model_copy(update={"prompt_tokens": int(mask.sum()), "completion_tokens": total,
                                                       "others": others})
        return out

    # -- interface ----------------------------------------------------------------------------------
    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer chat prompts; plain greedy requests go through ``core.generation.generate`` unchanged. A request
        the backend cannot take (a logit_bias id outside the vocabulary, a schema xgrammar cannot compile) raises
        ValueError before anything runs."""
        if not batch:
            return []
        plain = self._plain(params)
        ctl = None if plain else self._controls(params)
        try:
            if plain:
                texts = generate(self.model, self.tokenizer, [list(m) for m in batch],
                                 max_new_tokens=params.max_new_tokens, batch_size=self.batch_size)
                outs = []
                for m, t in zip(batch, texts, strict=True):
                    n = self._count(t)
                    outs.append(GenOutput(text=t, finish_reason="length" if n >= params.max_new_tokens else "stop",
                                          prompt_tokens=self._count(chat_text(self.tokenizer, list(m))),
                                          completion_tokens=n))
                return outs
            return [_stripped(o) for o in self._generate_texts([self._render(m, params) for m in batch], params, ctl)]
        except RequestFieldError:
            raise
        except Exception as e:
            raise BackendError(f"transformers generation failed: {e.__class__.__name__}: {e}") from e

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Continue raw texts (no chat template); an invalid request raises ValueError before anything runs."""
        ctl = self._controls(params)
        try:
            return self._generate_texts(list(texts), params, ctl)
        except RequestFieldError:
            raise
        except Exception as e:
            raise BackendError(f"transformers completion failed: {e.__class__.__name__}: {e}") from e

    def _stream_text(self, text: str, params: GenParams) -> Iterator[str]:
        """Stream a rendered prompt with TextIteratorStreamer (penalties, logit_bias and a response_format grammar
        applied; ``n`` and log probabilities are for whole answers only); closing the iterator stops the worker."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList, TextIteratorStreamer

        ctl = self._controls(params)  # ValueError for an invalid request, before the worker starts
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        enc = tok([text], return_tensors="pt", add_special_tokens=False).to(device)
        kw = self._gen_kwargs(params)
        procs = ctl.processors(enc["input_ids"].shape[1])
        if procs:
            kw["logits_processor"] = LogitsProcessorList(procs)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=120.0)
        stop_event = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**enc, **kw, streamer=streamer,
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
