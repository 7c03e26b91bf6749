"""Unlearning methods, one small module each; importing this package registers them all in ``METHODS``.

Every module of this package but ``common`` is imported here, so a new method is one new file (see CONTRIBUTING.md).
"""

from core.registry import import_submodules
from training.methods.common import METHODS, MethodContext, MethodPlan, UnlearnMethod

import_submodules(__name__, __path__, skip={"common"})

__all__ = ["METHODS", "MethodContext", "MethodPlan", "UnlearnMethod"]
