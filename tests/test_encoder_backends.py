"""The encoder's ONNX Runtime / int8 / OpenVINO runtimes: same embeddings and decisions as torch, cached exports."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from core.encoder_export import EncoderBackendError
from core.models import load_encoder
from detectors.config import DetectorConfig
from detectors.detector import Detector
from detectors.encoder import Encoder
from eval.tasks.offline import generate_benchmark

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXTS = ["Where was Elena Marchetti born?", "what is the capital of france", "", "   padded text   ",
         "A much longer message that goes on " * 60, "Ünïcödé naïve café, 東京", "x"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh cache directory, so the export itself runs in this test module."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def torch_encoder() -> Encoder:
    return Encoder.load("minilm-l6", backend="torch")


@pytest.fixture(scope="module")
def torch_emb(torch_encoder: Encoder) -> np.ndarray:
    return torch_encoder.encode(TEXTS)


def _runtime(cache: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> Encoder:
    monkeypatch.setenv("UNLEARN_GUARD_CACHE", cache)
    return Encoder.load("minilm-l6", backend=backend)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_fp32_runtimes_give_torchs_embeddings(backend: str, cache: str, torch_emb: np.ndarray,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    enc = _runtime(cache, backend, monkeypatch)
    got = enc.encode(TEXTS)
    assert got.shape == torch_emb.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float((got * torch_emb).sum(1).min()) > 0.99999
    # One at a time (no padding) equals the padded batch.
    single = np.stack([enc.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(single, got, atol=1e-5)


def test_int8_is_close_and_smaller(cache: str, torch_emb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _runtime(cache, "onnx-int8", monkeypatch)
    cos = (enc.encode(TEXTS) * torch_emb).sum(1)
    assert cos.min() > 0.95 and cos.mean() > 0.98, cos
    out = enc.model.export_dir
    assert (out / "model_int8.onnx").stat().st_size < 0.4 * (out / "model.onnx").stat().st_size


def test_export_is_cached_and_reused(cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _runtime(cache, "onnx", monkeypatch).model.export_dir
    stamp = (first / "model.onnx").stat().st_mtime_ns
    again = _runtime(cache, "onnx", monkeypatch).model.export_dir
    assert again == first and (again / "model.onnx").stat().st_mtime_ns == stamp
    meta = json.loads((first / "export.json").read_text())
    assert meta["dim"] == 384 and meta["max_seq_length"] == 256 and "onnx" in meta["backends"]
    assert first.parent.parent == Path(cache)


def test_bad_backend_and_missing_package_are_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="accepted: torch, onnx, onnx-int8, openvino"):
        load_encoder("minilm-l6", backend="tensorrt")
    with pytest.raises(ValueError):
        DetectorConfig(encoder_backend="tensorrt")
    assert DetectorConfig().encoder_backend == "onnx" and Encoder.load.__defaults__[-1] == "onnx"
    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path))
    real = importlib.import_module

    def no_ort(name: str, *a: object) -> object:
        if name.startswith("onnxruntime"):
            raise ImportError("no onnxruntime here")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_ort)
    with pytest.raises(EncoderBackendError, match=r"pip install onnxruntime onnx"):
        load_encoder("minilm-l6", backend="onnx-int8")


def test_detector_on_onnx_decides_as_on_torch(torch_encoder: Encoder, cache: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    task = generate_benchmark()
    cfg = DetectorConfig(encoder_backend="torch")
    ref = Detector.build(task, cfg, torch_encoder)
    fast = Detector.build(task, cfg.model_copy(update={"encoder_backend": "onnx"}), _runtime(cache, "onnx", monkeypatch))
    prompts = ([q.paraphrased_question or q.question for q in task.forget_qa][:60]
               + [q.question for q in task.neighbour_qa][:60] + list(task.benign_questions)[:40])
    a = [d.flagged for d in ref.detect_batch(prompts)]
    b = [d.flagged for d in fast.detect_batch(prompts)]
    assert a == b and 0 < sum(a) < len(a)
    assert abs(ref.threshold - fast.threshold) < 1e-4
    assert fast.config.encoder_backend == "onnx"
