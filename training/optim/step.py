"""The optimiser-level robustness options of :class:`training.optim.config.OptimConfig`, as one step object.

The loop calls :class:`RobustStep` instead of ``backward + step`` when the optim config is not the
default. Each micro-batch, :meth:`RobustStep.micro` evaluates the method's loss and takes the gradients
it needs: ``g_f`` of ``out["forget_loss"]`` (every method returns it: the weighted forget part of
``loss``) and ``g_rest`` of ``loss - forget_loss`` (none when the two are the same tensor), or one
zeroth-order estimate of ``loss``. At the optimiser step :meth:`apply_gradients` combines them into
``p.grad`` (the loop clips as usual), and :meth:`optimizer_step` steps, restores masked weights and
updates the weight average. All state (GRU's EMA, masks, DGS scores, the WA sum, the step count that
seeds ZO/RS noise) is in :meth:`state_dict` and goes into the checkpoint (``state.pt["optim"]``).

In several processes (the loop's DDP-style launches) each process holds the whole model and its share of
the micro-batch; ``reduce`` averages the accumulated parts over the processes before :meth:`apply_gradients`
combines them, and SAM/GP's perturbation is taken along the averaged forget gradient, so every option acts
on the global batch's gradients. Set-up passes (SalUn, DGS) run on the whole stream in every process, and
ZO/RS draw the same seeded directions everywhere, so masks, noise and state agree between processes.

Mechanisms, references (read for this module; ours is our own code) and deviations:

- **GRU** (Y. Wang, Q. Wang, F. Liu, W. Huang, Y. Du, X. Du, B. Han, "GRU: Mitigating the Trade-off between
  Unlearning and Retention for LLMs", ICML 2025, arXiv 2503.09117; reference: the authors' port in
  open-unlearning, ``community/methods/GRU``, ``src/trainer/unlearn/gru.py``). The retain gradient is
  smoothed, ``g_ema <- gru_ema * g_r + (1 - gru_ema) * g_ema`` (the reference's ``gamma_gru=0.8``, from
  zero), and if ``<g_f, g_ema> < 0`` the forget gradient is projected off it,
  ``g_f <- g_f - <g_f, g_ema> / ||g_ema||^2 * g_ema``, over all trainable weights jointly (the reference
  flattens every tensor into one vector; not per layer). ``g_r`` is ``g_rest`` when the method has a
  retain term, else the gradient of the NLL of the batch's ``retain`` stream (the reference always uses
  the retain NLL). Deviation: the update is ``rectified g_f + g_rest``; the reference's update is the
  rectified forget gradient alone (its retain loss only steers the projection), which is the same for
  methods without a retain term (GA, GA-TS, CE-U, UNDIAL), and keeps each objective's own retain term
  otherwise so GRU composes with all of them.
- **SalUn** (C. Fan, J. Liu, Y. Zhang, E. Wong, D. Wei, S. Liu, ICLR 2024, arXiv 2310.12508; reference:
  OPTML-Group/Unlearn-Saliency ``Classification/generate_mask.py``). Before training, the gradient of the
  forget NLL is summed over the forget stream once, and the fraction ``f`` of trainable weights with the
  largest ``|sum|`` (one global ranking over all tensors, as the reference) is kept trainable; the rest are
  frozen for the run. Deviations: the saliency is of the forget NLL for every objective (the reference's
  loss is the task's forget loss, -CE), because calling a stateful objective (PDU's dual) before training
  would move its state; weights with zero saliency are never kept (the reference's argsort breaks such
  ties arbitrarily).
- **DGS**, the dynamic gradient sparsity of ALKN (A. Wuerkaixi, Q. Wang, S. Cui, W. Xu, B. Han, G. Niu,
  M. Sugiyama, C. Zhang, "Adaptive Localization of Knowledge Negation for Continual LLM Unlearning", ICML
  2025; reference: github:zaocan666/ALKN ``ALKN.py`` ``mask_gradient`` / ``get_retain_gradient``). What
  the reference does (checked there): the mean retain-NLL gradient ``g_r`` is computed once before
  training; each step a score accumulates, ``m += g_learn * g_r`` (a running sum, not an EMA), where
  ``g_learn`` is the gradient of the *learning* loss on the forget data (ALKN fine-tunes a task vector on
  them and negates it afterwards); per tensor, the fraction with the largest ``m`` is kept and the rest
  of the gradient zeroed; that fraction starts at ``r`` and falls linearly to ``r/2`` in five stages. So
  the largest ``g ⊙ g_r`` is kept, with ``g`` the learning gradient. Here the objective *unlearns*, so its
  learning direction is ``-g_f`` and the score is ``m += (-g_f) ⊙ g_r`` (for GA exactly the reference's
  ``grad NLL_f ⊙ g_r``). Deviations: the per-tensor threshold is the exact quantile (the reference
  interpolates linearly between trimmed extremes, an approximation of it); the continual-unlearning
  terms (previous tasks' masks, per-parameter learning rates, soft labels) have no counterpart here.
- **SAM, RS, GP** (C. Fan, J. Jia, Y. Zhang, A. Ramakrishna, M. Hong, S. Liu, "Towards LLM Unlearning
  Resilient to Relearning Attacks: A Sharpness-Aware Minimization Perspective and Beyond", ICML 2025,
  arXiv 2502.05374; reference: OPTML-Group/Unlearn-Smooth ``WMDP/src/unlearn/base.py`` (SAM, RSTrainer),
  ``GA.py`` (NPO_FT_GNR, NPO_FT_CR), ``MUSE/baselines/baselines/sam_iterative.py``). All act on the forget
  objective only, as the reference (the retain gradient is taken at the unperturbed weights). SAM: the
  weights move by ``rho * g_f / ||g_f||`` (L2 over all trainable weights), ``g_f`` is recomputed there and
  the weights are restored exactly (a saved copy, not a subtraction). RS: ``g_f`` averaged over
  ``rs_samples`` copies with Gaussian noise (reference: 3 samples, std ``sam_rho``=0.1; here ``rs_sigma``
  = 1e-3, since noise of std 0.1 per coordinate is larger than SmolLM2-135M's weights). GP: the penalty
  ``gp_lambda * ||g_f||`` through its finite-difference gradient
  ``g_f + gp_lambda / rho * (g_f(w + rho g_f/||g_f||) - g_f(w))``. Deviation: the reference adds the
  norm as ``.item()``, a constant with no gradient, so its GNR term does not act; we take the standard
  finite-difference gradient of the same penalty (weight 0.01 as the reference). CR is not implemented
  (see :class:`OptimConfig`): its reference penalty is also a detached float.
- **WA** (same paper; reference ``WeightAveragingCallback``: from step 100, every 5 steps). The saved model
  is the mean of the trainable weights snapshotted after every ``wa_every``-th step from ``wa_start`` on
  (default: half of the run, since our runs are 30 steps where the reference's are 500).
- **signSGD / signAdam, ZO, hybrid** (Y. Lang, Y. Zhang, C. Fan, C. Wang, J. Jia, S. Liu, "Downgrade to
  Upgrade: Optimizer Simplification Enhances Robustness in LLM Unlearning", arXiv 2510.00761; its code,
  OPTML-Group/Unlearn_Optimizer, was not available here). signSGD: ``w -= lr * sign(g)``; signAdam is
  Adam's direction quantised to one bit, ``sign(m_hat / (sqrt(v_hat) + eps)) = sign(m)``, i.e. the sign
  of the first-moment EMA (Signum). ZO: the two-point Gaussian estimator (SPSA / MeZO),
  ``(1/q) sum_i (L(w + mu z_i) - L(w - mu z_i)) / (2 mu) z_i``, ``z_i ~ N(0, I)`` drawn from a generator
  seeded by (seed, step, micro-batch, i), on the whole loss, fed to AdamW (ZO-Adam). Hybrid: the paper
  "alternates" first-order and zeroth-order updates; here each cycle is ``hybrid_fo_steps`` FO steps then
  ``hybrid_zo_steps`` ZO steps (1 and 1 by default). The split and ZO-Adam as the ZO optimiser are our
  choices where the paper's code could not be read.

Not supported: several processes (the gradients are taken with ``torch.autograd.grad``, outside DDP's
all-reduce); :func:`training.loop.train` refuses that combination.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from training.optim.config import OptimConfig

log = logging.getLogger(__name__)

Tensors = list[torch.Tensor]


# ---- small pure pieces (unit-tested on their own) ------------------------------------------------------

def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def dot(a: Tensors, b: Tensors) -> float:
    """Inner product of two gradients given as lists of tensors (float64 accumulation)."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def gru_rectify(g_f: Tensors, g_r: Tensors) -> tuple[Tensors, float]:
    """GRU's closed form: ``g_f`` projected off ``g_r`` when ``<g_f, g_r> < 0`` (else unchanged); returns (g', <g_f, g_r>)."""
    d = dot(g_f, g_r)
    nn = dot(g_r, g_r)
    if d >= 0 or nn == 0:
        return g_f, d
    c = d / nn
    return [f - c * r for f, r in zip(g_f, g_r, strict=True)], d


def gaussian_directions(params: Tensors, seed: int, masks: list[torch.Tensor] | None = None) -> Tensors:
    """One ``N(0, I)`` direction shaped like ``params`` from a generator seeded with ``seed`` (zero where masked)."""
    device = params[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    zs = [torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) for p in params]
    if masks is not None:
        zs = [z * m.to(z.dtype) for z, m in zip(zs, masks, strict=True)]
    return zs


@torch.no_grad()
def zo_gradient(params: Tensors, loss_at: Callable[[], float], mu: float, dirs: int, seed: int,
                masks: list[torch.Tensor] | None = None) -> Tensors:
    """Two-point zeroth-order estimate of the gradient of ``loss_at()`` in ``params`` (restored bit-exactly)."""
    saved = [p.detach().clone() for p in params]
    est = [torch.zeros_like(p) for p in params]
    for i in range(dirs):
        zs = gaussian_directions(params, derived_seed(seed, i), masks)
        for p, z in zip(params, zs, strict=True):
            p.add_(z, alpha=mu)
        plus = float(loss_at())
        for p, s, z in zip(params, saved, zs, strict=True):
            p.copy_(s).add_(z, alpha=-mu)
        minus = float(loss_at())
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
        c = (plus - minus) / (2.0 * mu * dirs)
        for e, z in zip(est, zs, strict=True):
            e.add_(z, alpha=c)
    return est


class SignOptimizer(torch.optim.Optimizer):
    """signSGD (``beta=0``: ``w -= lr * sign(g)``) or signAdam/Signum (``w -= lr * sign(m)``, ``m`` Adam's first
    moment ``beta m + (1 - beta) g``), with AdamW's decoupled weight decay. Every coordinate with a
    non-zero argument moves by exactly ``lr`` (before decay)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, beta: float = 0.0, weight_decay: float = 0.0) -> None:
        """``beta`` is the momentum of the sign's argument (0: plain signSGD)."""
        if lr <= 0 or not 0 <= beta < 1 or weight_decay < 0:
            raise ValueError(f"SignOptimizer needs lr > 0, 0 <= beta < 1, weight_decay >= 0; got {lr}, {beta}, {weight_decay}")
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: D102 - torch's contract
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if beta > 0:
                    st = self.state[p]
                    if "m" not in st:
                        st["m"] = torch.zeros_like(p)
                    st["m"].mul_(beta).add_(g, alpha=1 - beta)
                    g = st["m"]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(g), alpha=-lr)
        return loss


def build_optimizer(params: Tensors, lr: float, weight_decay: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.kind`` at ``lr * cfg.lr_scale`` (AdamW for adamw, zo and hybrid)."""
    lr = lr * cfg.lr_scale
    if cfg.kind == "signsgd":
        return SignOptimizer(params, lr=lr, beta=0.0, weight_decay=weight_decay)
    if cfg.kind == "signadam":
        return SignOptimizer(params, lr=lr, beta=cfg.signadam_beta, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _grads(loss: torch.Tensor, params: Tensors, retain_graph: bool = False) -> Tensors:
    gs = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs, strict=True)]


def _snapshot(loss_fn: Any) -> Any:
    """A stateful loss's state (PDU's dual), so extra evaluations (SAM, ZO) do not advance it."""
    if callable(getattr(loss_fn, "state_dict", None)):
        import copy

        return copy.deepcopy(loss_fn.state_dict())
    return None


def _restore(loss_fn: Any, state: Any) -> None:
    if state is not None:
        loss_fn.load_state_dict(state)


# ---- the step ---------------------------------------------------------------------------------------------

class RobustStep:
    """One optimiser step with the options of an :class:`OptimConfig` (see the module docstring)."""

    def __init__(self, cfg: OptimConfig, params: Tensors, grad_accum: int, total_steps: int,
                 reduce: Callable[[Tensors], None] | None = None) -> None:
        """``params`` are the trainable tensors in the optimiser's order; ``total_steps`` the run's optimiser steps.

        ``reduce`` averages a list of tensors in place over the processes of a multi-process run (None in one
        process): the step averages its gradient parts with it before combining them (see :meth:`apply_gradients`).
        """
        self.cfg, self.params, self.accum, self.total = cfg, list(params), grad_accum, total_steps
        self.reduce = reduce
        self._weight = 1.0
        self.steps = 0
        self.micro_index = 0
        self.ema: Tensors | None = None
        self.mask: list[torch.Tensor] | None = None
        self.dgs_score: Tensors | None = None
        self.dgs_retain: Tensors | None = None
        self.dgs_ratio = cfg.mask_fraction
        self.wa_sum: Tensors | None = None
        self.wa_n = 0
        self.ready = False
        self.last: dict[str, float] = {}
        self._acc: dict[str, Tensors] = {}

    # -- set-up before the first step (skipped on resume: the state comes from the checkpoint) --

    def setup(self, model: Any, batches: Callable[[str], Iterable[dict[str, Any]]]) -> None:
        """Compute what needs a pass over the data before training: SalUn's mask, DGS's mean retain gradient."""
        from training.losses import mean_nll

        kind = self.cfg.mask_kind
        if kind == "salun":
            total = [torch.zeros_like(p) for p in self.params]
            for b in batches("forget"):
                for t, g in zip(total, _grads(mean_nll(model, b["forget"]), self.params), strict=True):
                    t.add_(g)
            self.mask = salun_mask(total, self.cfg.mask_fraction)
            kept = sum(int(m.sum()) for m in self.mask) / max(1, sum(m.numel() for m in self.mask))
            log.info("SalUn mask: %.3f of %d trainable weights kept", kept, sum(m.numel() for m in self.mask))
        elif kind == "dgs":
            total = [torch.zeros_like(p) for p in self.params]
            n = 0
            for b in batches("retain"):
                for t, g in zip(total, _grads(mean_nll(model, b["retain"]), self.params), strict=True):
                    t.add_(g)
                n += 1
            self.dgs_retain = [t / max(1, n) for t in total]
            self.dgs_score = [torch.zeros_like(p) for p in self.params]
        self.ready = True

    # -- per micro-batch --

    def mode(self) -> str:
        """``"zo"`` or ``"fo"`` for the current optimiser step."""
        if self.cfg.kind == "zo":
            return "zo"
        if self.cfg.kind == "hybrid":
            cycle = self.cfg.hybrid_fo_steps + self.cfg.hybrid_zo_steps
            return "fo" if self.steps % cycle < self.cfg.hybrid_fo_steps else "zo"
        return "fo"

    def _add(self, key: str, grads: Tensors) -> None:
        scale = self._weight / self.accum
        if key not in self._acc:
            self._acc[key] = [g * scale for g in grads]
        else:
            for a, g in zip(self._acc[key], grads, strict=True):
                a.add_(g, alpha=scale)

    def micro(self, model: Any, batch: dict[str, Any], loss_fn: Callable[[Any, dict[str, Any]], dict[str, Any]],
              weight: float = 1.0) -> dict[str, Any]:
        """Evaluate the loss on one micro-batch and accumulate the gradients the step needs; returns the loss dict.

        ``weight`` scales this process's share of a global micro-batch (the loop's ``_shard``; 1 in one process).
        """
        self._weight = weight
        mode = self.mode()
        if mode == "zo":
            out = self._zo_micro(model, batch, loss_fn)
        elif not self.cfg.needs_split():
            out = loss_fn(model, batch)
            self._add("total", _grads(out["loss"], self.params))
        else:
            out = self._split_micro(model, batch, loss_fn)
        if self.cfg.kind == "hybrid":
            out = {**out, "zo_step": float(mode == "zo")}
        self.micro_index += 1
        return out

    def _zo_micro(self, model: Any, batch: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
        with torch.no_grad():
            out = loss_fn(model, batch)
            state = _snapshot(loss_fn)
            seed = derived_seed("zo", self.cfg.seed, self.steps, self.micro_index)
            est = zo_gradient(self.params, lambda: float(loss_fn(model, batch)["loss"]), self.cfg.zo_mu,
                              self.cfg.zo_dirs, seed, self.mask)
            _restore(loss_fn, state)
        self._add("total", est)
        return out

    def _split_micro(self, model: Any, batch: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
        out = loss_fn(model, batch)
        if "forget_loss" not in out:
            raise ValueError("the optim options rectify/sam/dgs need the loss dict's 'forget_loss' (the weighted "
                             f"forget part of 'loss'); this loss returns {sorted(out)}")
        state = _snapshot(loss_fn)
        loss, f = out["loss"], out["forget_loss"]
        has_rest = loss is not f
        g_f = _grads(f, self.params, retain_graph=has_rest)
        g_rest = _grads(loss - f, self.params) if has_rest else None
        if self.cfg.sam != "none":
            g_f = self._smoothed(model, batch, loss_fn, g_f)
        _restore(loss_fn, state)
        self._add("forget", g_f)
        if g_rest is not None:
            self._add("rest", g_rest)
        if self.cfg.rectify == "gru":
            if g_rest is not None:
                g_r = g_rest
            else:
                from training.losses import mean_nll

                if "retain" not in batch:
                    raise ValueError("GRU needs a 'retain' stream in the batch for a method without a retain term")
                g_r = _grads(mean_nll(model, batch["retain"]), self.params)
            self._add("retain_ref", g_r)
        return out

    @torch.no_grad()
    def _perturbed_forget_grad(self, model: Any, batch: dict[str, Any], loss_fn: Any, eps: Tensors) -> Tensors:
        """``grad forget_loss`` at ``w + eps``; the weights are restored from a copy (bit-exact)."""
        saved = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, eps, strict=True):
            p.add_(e)
        try:
            with torch.enable_grad():
                g = _grads(loss_fn(model, batch)["forget_loss"], self.params)
        finally:
            for p, s in zip(self.params, saved, strict=True):
                p.copy_(s)
        return g

    def _smoothed(self, model: Any, batch: dict[str, Any], loss_fn: Any, g_f: Tensors) -> Tensors:
        """The SAM / RS / GP forget gradient (see the module docstring)."""
        cfg = self.cfg
        if cfg.sam == "rs":
            total = [torch.zeros_like(p) for p in self.params]
            for k in range(cfg.rs_samples):
                noise = gaussian_directions(self.params, derived_seed("rs", cfg.seed, self.steps, self.micro_index, k))
                for t, g in zip(total, self._perturbed_forget_grad(model, batch, loss_fn,
                                                                   [n * cfg.rs_sigma for n in noise]), strict=True):
                    t.add_(g)
            return [t / cfg.rs_samples for t in total]
        if self.reduce is not None:  # the perturbation follows the whole micro-batch's forget gradient
            g_f = [g * self._weight for g in g_f]
            self.reduce(g_f)
        norm = dot(g_f, g_f) ** 0.5
        if norm == 0:
            self.last["sam_eps_norm"] = 0.0
            return g_f
        eps = [g * (cfg.sam_rho / norm) for g in g_f]
        self.last["sam_eps_norm"] = dot(eps, eps) ** 0.5
        g_adv = self._perturbed_forget_grad(model, batch, loss_fn, eps)
        if cfg.sam == "sam":
            return g_adv
        c = cfg.gp_lambda / cfg.sam_rho  # gp
        return [g + c * (a - g) for g, a in zip(g_f, g_adv, strict=True)]

    # -- at the optimiser step --

    def apply_gradients(self) -> None:
        """Combine the accumulated gradients (GRU, DGS, masks) into ``p.grad`` for clipping and the step.

        In several processes each part is first averaged over them, so the non-linear steps (GRU's projection,
        DGS's ranking, sign optimisers) see the gradients of the global batch, as in one process.
        """
        acc, self._acc = self._acc, {}
        if self.reduce is not None:
            for key in sorted(acc):
                self.reduce(acc[key])
        if "total" in acc:
            grad = acc["total"]
        else:
            g_f = acc["forget"]
            if self.cfg.mask_kind == "dgs":
                self._dgs_update(g_f)
            if self.cfg.rectify == "gru":
                g_f = self._gru(g_f, acc["retain_ref"])
            grad = [f + r for f, r in zip(g_f, acc["rest"], strict=True)] if "rest" in acc else g_f
        if self.mask is not None:
            grad = [g * m.to(g.dtype) for g, m in zip(grad, self.mask, strict=True)]
        for p, g in zip(self.params, grad, strict=True):
            p.grad = g.to(p.dtype)

    def _gru(self, g_f: Tensors, g_r: Tensors) -> Tensors:
        a = self.cfg.gru_ema
        if self.ema is None:
            self.ema = [torch.zeros_like(g) for g in g_r]
        self.ema = [a * g + (1 - a) * e for g, e in zip(g_r, self.ema, strict=True)]
        out, d = gru_rectify(g_f, self.ema)
        self.last["gru_dot"] = d
        self.last["gru_projected"] = float(d < 0)
        return out

    def _dgs_update(self, g_f: Tensors) -> None:
        """ALKN: accumulate ``(-g_f) * g_r``, keep the top ``ratio`` of each tensor's score, then move the ratio."""
        if self.dgs_score is None or self.dgs_retain is None:
            raise RuntimeError("DGS needs setup() before the first step")
        for s, g, r in zip(self.dgs_score, g_f, self.dgs_retain, strict=True):
            s.add_(-g * r)
        self.mask = [top_fraction(s, self.dgs_ratio) for s in self.dgs_score]
        start = self.cfg.mask_fraction
        stage = max(1, self.total // 5)
        if (self.steps + 1) % stage == 0 and self.steps + 1 < self.total:
            self.dgs_ratio = start - (start - start / 2) * (self.steps + 1) / self.total

    @torch.no_grad()
    def optimizer_step(self, optimizer: Any) -> None:
        """Step, put masked weights back bit for bit, and snapshot for weight averaging."""
        saved = [p.detach().clone() for p in self.params] if self.mask is not None else None
        optimizer.step()
        if saved is not None and self.mask is not None:
            for p, s, m in zip(self.params, saved, self.mask, strict=True):
                p.copy_(torch.where(m, p, s))
        self.steps += 1
        self.micro_index = 0
        if self.cfg.wa and self.steps >= self.wa_start() and self.steps % self.cfg.wa_every == 0:
            if self.wa_sum is None:
                self.wa_sum = [p.detach().double().clone() for p in self.params]
            else:
                for s, p in zip(self.wa_sum, self.params, strict=True):
                    s.add_(p.detach().double())
            self.wa_n += 1

    def wa_start(self) -> int:
        """First step that weight averaging snapshots."""
        return self.cfg.wa_start or max(1, self.total // 2)

    @torch.no_grad()
    def finalize(self) -> None:
        """At the end of the run: load the weight average into the trainable weights (WA)."""
        if not self.cfg.wa:
            return
        if self.wa_sum is None or self.wa_n == 0:
            log.warning("weight averaging took no snapshot (wa_start=%d, wa_every=%d, %d steps); keeping the last "
                        "weights", self.wa_start(), self.cfg.wa_every, self.steps)
            return
        for p, s in zip(self.params, self.wa_sum, strict=True):
            p.copy_((s / self.wa_n).to(p.dtype))

    # -- checkpoint state --

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (tensors on CPU)."""
        def cpu(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t.detach().cpu() for t in ts]

        return {"steps": self.steps, "ema": cpu(self.ema), "mask": cpu(self.mask), "dgs_score": cpu(self.dgs_score),
                "dgs_retain": cpu(self.dgs_retain), "dgs_ratio": self.dgs_ratio, "wa_sum": cpu(self.wa_sum),
                "wa_n": self.wa_n, "ready": self.ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values onto the parameters' devices."""
        dev = self.params[0].device

        def put(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t.to(dev) for t in ts]

        self.steps = int(state["steps"])
        self.ema, self.mask = put(state["ema"]), put(state["mask"])
        self.dgs_score, self.dgs_retain = put(state["dgs_score"]), put(state["dgs_retain"])
        self.dgs_ratio = float(state["dgs_ratio"])
        self.wa_sum, self.wa_n = put(state["wa_sum"]), int(state["wa_n"])
        self.ready = bool(state["ready"])


def top_fraction(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``ceil(fraction * n)`` largest entries of ``score`` (ties at the threshold kept)."""
    n = score.numel()
    k = max(1, min(n, int(-(-fraction * n // 1))))
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    thr = torch.kthvalue(score.flatten().float(), n - k + 1).values
    return score >= thr


def salun_mask(saliency: Tensors, fraction: float) -> list[torch.Tensor]:
    """SalUn: one global ranking of ``|saliency|`` over all tensors; the top ``fraction`` is kept (never a zero)."""
    flat = torch.cat([s.detach().abs().flatten().float() for s in saliency])
    n = flat.numel()
    k = max(1, min(n, int(-(-fraction * n // 1))))
    thr = float(torch.kthvalue(flat, n - k + 1).values) if k < n else float(flat.min())
    return [(s.abs() > 0) & (s.abs() >= thr) if thr > 0 else s.abs() > 0 for s in saliency]
