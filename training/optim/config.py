"""``OptimConfig``: optimiser-level robustness options that compose with any unlearning objective.

Every field's default is today's plain AdamW step, so a config that sets nothing changes nothing
(:meth:`OptimConfig.is_default`; the run fingerprint then stays what it was). The options, and the
papers and reference code each follows, are documented in :mod:`training.optim.step`; in short:

- ``rectify="gru"``: GRU (Y. Wang et al., ICML 2025, arXiv 2503.09117), the forget gradient projected off
  the (EMA of the) retain gradient when they conflict.
- ``mask="salun:<kept>"``: SalUn (C. Fan et al., ICLR 2024, arXiv 2310.12508), a fixed weight-saliency mask;
  ``mask="dgs:<kept>"``: ALKN's dynamic gradient sparsity (A. Wuerkaixi et al., ICML 2025).
- ``sam``: the smoothing family of C. Fan et al., "Towards LLM Unlearning Resilient to Relearning Attacks"
  (arXiv 2502.05374): ``sam``, randomized smoothing ``rs``, gradient penalty ``gp``; ``wa``: weight averaging.
- ``kind``: optimiser downgrade (Y. Lang et al., "Downgrade to Upgrade", arXiv 2510.00761): ``signsgd``,
  ``signadam``, zeroth-order ``zo`` and the first-order / zeroth-order ``hybrid``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MASK_KINDS = ("salun", "dgs")
_MASK_RE = re.compile(r"^(salun|dgs):(\d*\.?\d+(?:e-?\d+)?)$")


def parse_mask(spec: str) -> tuple[str, float]:
    """``"salun:0.5"`` -> ``("salun", 0.5)``: the mask kind and the fraction of weights it keeps trainable."""
    m = _MASK_RE.match(spec.strip())
    if m is None:
        raise ValueError(f"mask {spec!r} is not one of {', '.join(k + ':<fraction kept>' for k in MASK_KINDS)} "
                         "(e.g. salun:0.5, dgs:0.8)")
    frac = float(m.group(2))
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"mask {spec!r}: the fraction kept must be in (0, 1], got {frac}")
    return m.group(1), frac


class OptimConfig(BaseModel):
    """Optimiser-level options (see :mod:`training.optim.step`); the defaults are the plain AdamW step.

    Learning rate: the sign optimisers move every coordinate by exactly ``lr`` per step, which is what
    AdamW does at its first steps (``m / sqrt(v) = sign(g)``), and ``zo``/``hybrid`` feed their estimate
    to AdamW (ZO-Adam), whose per-coordinate step is also ~``lr`` whatever the estimate's scale; so the
    methods' learning rates carry over and ``lr_scale`` stays 1 by default (unmeasured on the benchmark).
    """

    model_config = ConfigDict(extra="forbid")

    rectify: Literal["none", "gru"] = Field("none", description="Gradient rectification of the forget gradient.")
    gru_ema: float = Field(0.8, gt=0, le=1, description="GRU: weight of the current retain gradient in its EMA "
                                                        "(the reference's gamma_gru=0.8; 1: no averaging).")
    mask: str | None = Field(None, description="Weight mask 'salun:<fraction kept>' (fixed, saliency of the forget "
                                               "loss before training) or 'dgs:<fraction kept>' (ALKN, per step).")
    sam: Literal["none", "sam", "rs", "gp"] = Field("none", description="Smoothing of the forget objective: SAM, "
                                                                        "randomized smoothing or gradient penalty.")
    sam_rho: float = Field(0.1, gt=0, description="SAM / GP perturbation radius (L2 over all trainable weights; "
                                                  "the reference's sam_rho=0.1).")
    rs_sigma: float = Field(1e-3, gt=0, description="RS: std of the Gaussian weight noise per coordinate.")
    rs_samples: int = Field(3, ge=1, description="RS: noisy copies averaged per step (reference: 3).")
    gp_lambda: float = Field(0.01, gt=0, description="GP: weight of the forget-gradient norm penalty (reference: 0.01).")
    wa: bool = Field(False, description="Save the average of the weights over the last steps (weight averaging).")
    wa_start: int | None = Field(None, ge=1, description="WA: first step averaged; None: half of the run's steps.")
    wa_every: int = Field(5, ge=1, description="WA: average a snapshot every N steps (reference: 5).")
    kind: Literal["adamw", "signsgd", "signadam", "zo", "hybrid"] = Field(
        "adamw", description="Optimiser: AdamW, signSGD, signAdam (sign of Adam's momentum), zeroth-order "
                             "(two-point SPSA estimate fed to AdamW) or hybrid first-/zeroth-order steps.")
    signadam_beta: float = Field(0.9, ge=0, lt=1, description="signAdam: momentum of the sign's argument (Adam's beta1).")
    zo_mu: float = Field(1e-3, gt=0, description="ZO: finite-difference step along each direction (MeZO: 1e-3).")
    zo_dirs: int = Field(1, ge=1, description="ZO: Gaussian directions averaged per estimate (MeZO: 1).")
    hybrid_fo_steps: int = Field(1, ge=1, description="Hybrid: first-order steps in each cycle.")
    hybrid_zo_steps: int = Field(1, ge=1, description="Hybrid: zeroth-order steps in each cycle (after the FO ones).")
    lr_scale: float = Field(1.0, gt=0, description="Multiplies the learning rate (see the class docstring).")
    seed: int = Field(0, description="Seed of the ZO directions and RS noise (drawn per step: resume-exact).")

    @field_validator("sam", mode="before")
    @classmethod
    def _no_cr(cls, v: Any) -> Any:
        if v == "cr":
            raise ValueError("sam='cr' (curvature regularisation) is not implemented: the reference code "
                             "(OPTML-Group/Unlearn-Smooth, NPO_FT_CR) adds the norm of a Hessian-vector product as a "
                             "Python float (.item()), so its penalty has no gradient, and the paper gives no update "
                             "rule to follow instead; use 'sam', 'rs' or 'gp'")
        return v

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() in ("", "none"):
            return None
        parse_mask(v)
        return v.strip()

    @model_validator(mode="after")
    def _compose(self) -> OptimConfig:
        zo = self.kind in ("zo", "hybrid")
        if zo and self.sam != "none":
            raise ValueError(f"sam={self.sam!r} needs first-order forget gradients at perturbed weights; it does not "
                             f"combine with kind={self.kind!r} (zeroth-order steps already smooth the loss)")
        if zo and self.rectify != "none":
            raise ValueError(f"rectify={self.rectify!r} projects the forget gradient off the retain gradient, both "
                             f"first-order; it does not combine with kind={self.kind!r}")
        if zo and self.mask_kind == "dgs":
            raise ValueError(f"mask 'dgs' ranks weights by forget x retain gradients every step; it does not combine "
                             f"with kind={self.kind!r} (use a fixed 'salun:<fraction>' mask)")
        return self

    @property
    def mask_kind(self) -> str | None:
        """``"salun"``, ``"dgs"`` or None."""
        return parse_mask(self.mask)[0] if self.mask else None

    @property
    def mask_fraction(self) -> float:
        """Fraction of weights the mask keeps trainable (1 without a mask)."""
        return parse_mask(self.mask)[1] if self.mask else 1.0

    def is_default(self) -> bool:
        """Whether every field is at its default (the loop then takes today's plain path, bit for bit)."""
        return self == OptimConfig()

    def needs_split(self) -> bool:
        """Whether a step needs the forget and retain gradients separately (GRU, SAM family, DGS)."""
        return self.rectify != "none" or self.sam != "none" or self.mask_kind == "dgs"

    def needs_retain_stream(self) -> bool:
        """Whether the batch must carry a ``retain`` stream even for a method without a retain term."""
        return self.rectify == "gru" or self.mask_kind == "dgs"


OPTIM_PRESETS: dict[str, dict[str, Any]] = {
    "sam": {"sam": "sam"},
    "rs": {"sam": "rs"},
    "gp": {"sam": "gp"},
    "wa": {"wa": True},
    "gru": {"rectify": "gru"},
    "salun": {"mask": "salun:0.5"},
    "dgs": {"mask": "dgs:0.8"},
    "sign": {"kind": "signadam"},
    "signsgd": {"kind": "signsgd"},
    "zo": {"kind": "zo"},
    "hybrid": {"kind": "hybrid"},
}
"""The variants the robustness comparison runs, by name: ``optim_preset(name)`` builds each one."""


def optim_preset(name: str) -> OptimConfig:
    """The :class:`OptimConfig` of a named preset of :data:`OPTIM_PRESETS` ("none" is the default config)."""
    if name == "none":
        return OptimConfig()
    if name not in OPTIM_PRESETS:
        raise ValueError(f"unknown optim preset {name!r}; known: none, {', '.join(OPTIM_PRESETS)}")
    return OptimConfig.model_validate(OPTIM_PRESETS[name])
