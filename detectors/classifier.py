"""A light logistic-regression scorer over a handful of target-agnostic features.

Fitted with scikit-learn (balanced class weights, L2), applied with numpy (a dot product and a
sigmoid: microseconds per batch), stored as plain arrays (safetensors) plus feature names (JSON).
Target-agnostic features mean that a target added at run time is scored by the same model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from detectors.calibration import CalibrationReport

log = logging.getLogger(__name__)


class ClassifierError(ValueError):
    """Training data or stored parameters are unusable (one class only, shape mismatch, NaNs)."""


@dataclass(frozen=True)
class LogisticScorer:
    """p(forget | features) = sigmoid(((x - mean) / scale) @ coef + intercept)."""

    feature_names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...], C: float = 1.0,
            sample_weight: np.ndarray | None = None) -> LogisticScorer:
        """Fit on features ``X`` (n, f) and labels ``y`` in {0, 1}; balanced class weights unless weights are given."""
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if X.ndim != 2 or X.shape[1] != len(feature_names) or len(X) != len(y):
            raise ClassifierError(f"X has shape {X.shape}, y has {len(y)} labels, {len(feature_names)} feature names")
        if not np.all(np.isfinite(X)):
            raise ClassifierError("training features contain NaN or infinity")
        classes = set(np.unique(y).tolist())
        if classes != {0, 1}:
            raise ClassifierError(f"need both positives and negatives to train, got classes {sorted(classes)}")
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale = np.where(scale < 1e-6, 1.0, scale)
        model = LogisticRegression(C=C, class_weight=None if sample_weight is not None else "balanced", max_iter=2000)
        model.fit((X - mean) / scale, y, sample_weight=sample_weight)
        return cls(tuple(feature_names), mean.astype(np.float64), scale.astype(np.float64),
                   model.coef_[0].astype(np.float64), float(model.intercept_[0]))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Probabilities in [0, 1] for each row of ``X``."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.coef):
            raise ClassifierError(f"expected features of width {len(self.coef)}, got shape {X.shape}")
        z = ((X - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Parameters as named arrays (for safetensors)."""
        return {f"{prefix}.mean": self.mean, f"{prefix}.scale": self.scale, f"{prefix}.coef": self.coef,
                f"{prefix}.intercept": np.array([self.intercept], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, feature_names: tuple[str, ...]) -> LogisticScorer:
        """Rebuild from :meth:`to_arrays` output, checking shapes."""
        try:
            mean, scale = arrays[f"{prefix}.mean"], arrays[f"{prefix}.scale"]
            coef, icpt = arrays[f"{prefix}.coef"], arrays[f"{prefix}.intercept"]
        except KeyError as e:
            raise ClassifierError(f"classifier arrays lack {e.args[0]!r}") from e
        f = len(feature_names)
        if not (mean.shape == scale.shape == coef.shape == (f,)) or icpt.shape != (1,):
            raise ClassifierError(f"classifier {prefix!r}: parameter shapes do not match {f} features")
        return cls(tuple(feature_names), mean.astype(np.float64), scale.astype(np.float64),
                   coef.astype(np.float64), float(icpt[0]))

    def weights(self) -> dict[str, float]:
        """Coefficient per feature on the standardised scale (for reports)."""
        return {n: round(float(c), 4) for n, c in zip(self.feature_names, self.coef, strict=True)}


@dataclass(frozen=True)
class ChannelModel:
    """A channel's trained scorer and its calibrated threshold."""

    scorer: LogisticScorer
    calibration: CalibrationReport

    @property
    def threshold(self) -> float:
        """Scores strictly above this are flagged."""
        return self.calibration.threshold
