"""Faster CPU runtimes for a sentence encoder: ONNX Runtime (fp32, int8) and OpenVINO, exported locally.

A sentence-transformers model (the embedded MiniLM, a local directory or a hub id) is exported once
to one ONNX graph, transformer + pooling + normalisation, so the runtime returns the same unit
vectors as ``SentenceTransformer.encode``; ``onnx-int8`` is that graph with dynamically quantised
int8 weights (``onnxruntime.quantization.quantize_dynamic``), ``openvino`` the same graph compiled
by OpenVINO at fp32. Exports live in the cache (``<cache>/encoders/<name>-<key>/``) beside the
converted LLM, keyed by the source weights' path, size and mtime, written atomically; nothing is
downloaded.

Deviation from the issue's wording: sentence-transformers' own ``backend="onnx"`` /
``backend="openvino"`` needs ``optimum`` (``optimum-onnx`` or ``optimum-intel``), and every release
of those on PyPI pins ``transformers<4.58`` or another torch, which would replace our pinned
torch 2.13 / transformers 5.x. So we export with ``torch.onnx.export`` and run the graph with
``onnxruntime`` / ``openvino`` directly, reproducing ST's tokenisation (strip, optional lower-case,
truncation at ``max_seq_length``, length-sorted batches).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from core.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

EncoderBackend = Literal["torch", "onnx", "onnx-int8", "openvino"]
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)
EXPORT_VERSION = 1
_FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx", "openvino": "openvino/model.xml"}
_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules the graph reproduces
_INSTALL = {"onnx": "pip install onnxruntime", "onnx-int8": "pip install onnxruntime onnx",
            "openvino": "pip install 'unlearn-guard[openvino]'"}
DEFAULT_ENCODER_BACKEND = "onnx"
"""The runtime a detector uses unless told otherwise: ONNX Runtime fp32, which made the same decisions as torch on
every held-out prompt of three tasks at twice the speed (``eval/bench/encoder_bench.py``)."""
_export_lock = threading.Lock()


class EncoderBackendError(RuntimeError):
    """A fast encoder backend cannot be used: its package is missing or the model cannot be exported."""


def _require(module: str, backend: str) -> Any:
    """Import ``module`` for ``backend`` or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EncoderBackendError(
            f"encoder backend {backend!r} needs the Python package {module!r}, which is not installed; "
            f"install it ({_INSTALL[backend]}) or use encoder_backend='torch'") from e


def require_backend(backend: str) -> None:
    """Fail early, before any export, when ``backend``'s runtime package is missing."""
    if backend not in _FILES:
        raise EncoderBackendError(f"unknown encoder backend {backend!r}; accepted: {', '.join(ENCODER_BACKENDS)}")
    _require("openvino" if backend == "openvino" else "onnxruntime", backend)


def export_key(source: Path | str, name: str) -> str:
    """A short key that changes when the source model changes (path, size and mtime of a local model's files)."""
    parts = [name, str(EXPORT_VERSION), str(source)]
    p = Path(source)
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".txt"}:
                s = f.stat()
                parts.append(f"{f.resolve()}:{s.st_size}:{s.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def export_dir(cache: Path, source: Path | str, name: str) -> Path:
    """Where the exports of the encoder loaded from ``source`` live in the cache."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]
    return cache / "encoders" / f"{safe}-{export_key(source, name)}"


def has_export(out: Path, backend: str) -> bool:
    """Whether ``out`` already holds ``backend``'s graph."""
    meta = out / "export.json"
    return meta.exists() and backend in json.loads(meta.read_text())["backends"] and (out / _FILES[backend]).exists()


def _check_pipeline(st: Any) -> None:
    """Refuse models whose modules the exported graph would not reproduce (only Transformer, Pooling, Normalize)."""
    names = [type(m).__name__ for m in st]
    if not names or names[0] != "Transformer" or any(n not in _MODULES for n in names):
        raise EncoderBackendError(f"cannot export this sentence-transformers pipeline ({', '.join(names)}); the fast "
                                  f"backends reproduce Transformer -> Pooling -> [Normalize] only; use 'torch'")


def export_encoder(st: Any, out: Path, backends: Sequence[str]) -> Path:
    """Write the ONNX graph (and the int8 / OpenVINO versions asked for) of ``st`` to ``out``, atomically."""
    import torch

    _check_pipeline(st)
    tok = st.tokenizer
    first = st[0]
    do_lower = bool(getattr(first, "do_lower_case", False))
    with atomic_dir(out) as tmp:
        t0 = time.perf_counter()
        sample = tok(["an example sentence", "a second, rather longer example sentence"], padding=True,
                     return_tensors="pt")
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in sample]

        class _Graph(torch.nn.Module):
            """Transformer + pooling + normalisation as one function of the token tensors."""

            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, *tensors: Any) -> Any:
                return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

        graph = _Graph(st).eval()
        dyn = {n: {0: "batch", 1: "seq"} for n in names}
        dyn["embedding"] = {0: "batch"}
        with torch.no_grad():
            torch.onnx.export(graph, tuple(sample[n] for n in names), str(tmp / _FILES["onnx"]), input_names=names,
                              output_names=["embedding"], dynamic_axes=dyn, opset_version=17, dynamo=False)
        if "onnx-int8" in backends:
            quant = _require("onnxruntime.quantization", "onnx-int8")
            quant.quantize_dynamic(str(tmp / _FILES["onnx"]), str(tmp / _FILES["onnx-int8"]),
                                   weight_type=quant.QuantType.QInt8, per_channel=True)
        if "openvino" in backends:
            ov = _require("openvino", "openvino")
            (tmp / "openvino").mkdir()
            ov.save_model(ov.convert_model(str(tmp / _FILES["onnx"])), str(tmp / _FILES["openvino"]),
                          compress_to_fp16=False)
        tok.save_pretrained(tmp / "tokenizer")
        dim = st.get_embedding_dimension() if hasattr(st, "get_embedding_dimension") else st.get_sentence_embedding_dimension()
        atomic_write_json(tmp / "export.json", {
            "version": EXPORT_VERSION, "inputs": names, "dim": int(dim), "max_seq_length": int(st.max_seq_length),
            "do_lower_case": do_lower, "backends": sorted({"onnx", *backends} - {"torch"}),
            "seconds": round(time.perf_counter() - t0, 2), "source": str(getattr(first.auto_model.config, "_name_or_path", ""))})
    log.info("exported encoder to %s (%s)", out, ", ".join(backends))
    return out


def ensure_export(st: Any, out: Path, backend: str) -> Path:
    """The export directory ``out`` holding ``backend``'s graph of ``st``, exporting it (once) if missing."""
    if backend not in _FILES:
        raise EncoderBackendError(f"unknown encoder backend {backend!r}; accepted: {', '.join(ENCODER_BACKENDS)}")
    with _export_lock:
        if not has_export(out, backend):
            meta = out / "export.json"
            have = set(json.loads(meta.read_text())["backends"]) if meta.exists() else set()
            export_encoder(st, out, sorted(have | {backend}))
    return out


class ExportedEncoderModel:
    """Runs an exported encoder graph with ST's tokenisation; ``encode`` matches ``SentenceTransformer.encode``."""

    def __init__(self, export_dir: Path, backend: str, threads: int | None = None) -> None:
        """Open ``backend``'s graph in ``export_dir``; ``threads`` defaults to torch's intra-op thread count."""
        from transformers import AutoTokenizer

        meta = json.loads((export_dir / "export.json").read_text())
        self.backend = backend
        self.export_dir = export_dir
        self.inputs: list[str] = list(meta["inputs"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.do_lower_case = bool(meta["do_lower_case"])
        self.dim = int(meta["dim"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(export_dir / "tokenizer"))
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.threads = int(threads)
        self._run = self._open(export_dir / _FILES[backend])

    def _open(self, path: Path) -> Any:
        """A callable ``feeds -> (n, dim) float32`` for the graph at ``path``."""
        if self.backend.startswith("onnx"):
            ort = _require("onnxruntime", self.backend)
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            # Spinning threads won at one client (19 vs 23 ms added) and lost at 8 and 64 (eval/bench/load.py, 2 cores).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return lambda feeds: sess.run(None, feeds)[0]
        ov = _require("openvino", self.backend)
        compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads})
        local = threading.local()

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            req = getattr(local, "req", None)
            if req is None:  # an infer request is not thread-safe; one per thread
                req = local.req = compiled.create_infer_request()
            return np.asarray(req.infer(feeds)[compiled.output(0)])

        return run

    def get_sentence_embedding_dimension(self) -> int:
        """Embedding width (the name sentence-transformers uses)."""
        return self.dim

    def encode(self, sentences: Sequence[str], batch_size: int = 32, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True, show_progress_bar: bool = False, **_: Any) -> np.ndarray:
        """Embed ``sentences`` in length-sorted batches, as ``SentenceTransformer.encode`` does."""
        texts = [str(s).strip() for s in sentences]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for i in range(0, len(texts), batch_size):
            idx = order[i:i + batch_size]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation="longest_first",
                                 max_length=self.max_seq_length, return_tensors="np")
            feeds = {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in self.inputs}
            out[idx] = self._run(feeds)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
