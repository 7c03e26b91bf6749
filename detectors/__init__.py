"""The forget-target detector: normalisation, forget store, faiss index, classifier, conformal threshold.

Public names are imported lazily (``from detectors import Detector``) so that ``detectors.types``,
which the guard imports, stays free of faiss and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Detector": "detectors.detector",
    "ChannelModel": "detectors.classifier",
    "DetectorConfig": "detectors.config",
    "Encoder": "detectors.encoder",
    "ForgetStore": "detectors.store",
    "NegativeItem": "detectors.store",
    "task_negatives": "detectors.store",
    "VectorIndex": "detectors.index",
    "EntityMatcher": "detectors.entities",
    "LogisticScorer": "detectors.classifier",
    "CalibrationReport": "detectors.calibration",
    "conformal_threshold": "detectors.calibration",
    "calibrate": "detectors.calibration",
    "normalize": "detectors.normalize",
    "DetectorFormatError": "detectors.persistence",
    "save_detector": "detectors.persistence",
    "load_detector": "detectors.detector",
    "cross_validate": "detectors.evaluation",
    "evaluate_detector": "detectors.evaluation",
    "EvalReport": "detectors.evaluation",
    "Detection": "detectors.types",
    "Evidence": "detectors.types",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'detectors' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
