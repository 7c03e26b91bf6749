"""Unlearning methods, one small module each; importing this package registers them all in ``METHODS``."""

from training.methods import ga, idk, npo, r2mu, rmu, tru  # noqa: E402,F401  (registration side effects)
from training.methods.common import METHODS, MethodContext, MethodPlan, UnlearnMethod

__all__ = ["METHODS", "MethodContext", "MethodPlan", "UnlearnMethod"]
