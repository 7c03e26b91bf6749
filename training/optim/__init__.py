"""Optimiser-level robustness options (GRU, SalUn/DGS masks, SAM/RS/GP, weight averaging, sign and zeroth-order
optimisers) that compose with every unlearning objective; see :mod:`training.optim.step`."""

from training.optim.config import OPTIM_PRESETS, OptimConfig, optim_preset, parse_mask

__all__ = ["OPTIM_PRESETS", "OptimConfig", "optim_preset", "parse_mask"]
