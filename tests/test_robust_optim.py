"""Optimiser-level robustness options (training.optim): each mechanism checked with values, then in the loop."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from core.config import ConfigError, load_config
from core.models import tiny_llm
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training.loop import TrainConfig, train
from training.losses import mean_nll
from training.methods import METHODS
from training.optim import OPTIM_PRESETS, OptimConfig, optim_preset
from training.optim.step import (
    RobustStep,
    SignOptimizer,
    dot,
    gru_rectify,
    salun_mask,
    zo_gradient,
)
from training.unlearn import (
    PairedStreams,
    UnlearnConfig,
    _fingerprint,
    collate_streams,
    prepare_plan,
    unlearn,
)

TASK = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))

# Test-size settings per method: no generation beyond a few tokens, the template teacher for TRU.
PARAMS = {
    "rmu": {"layer": 1, "alpha": 10.0},
    "r2mu": {"layer": 1, "alpha": 10.0, "max_forget_traces": 2, "max_retain_traces": 2, "trace_tokens": 4},
    "tru": {"teacher": "template"},
    "altpo": {"num_alternates": 2, "max_new_tokens": 8},
    "bs-s": {"n_samples": 1, "max_new_tokens": 4},
    "undial": {"alpha": 1.0},
}


def _batches(tok, plan, seed: int = 0, size: int = 4):
    """Two batches of a plan's streams: the second with the same retain streams but other forget examples."""
    pad = tok.pad_token_id
    ds = PairedStreams(plan.streams, seed=seed)
    a = collate_streams([ds[i] for i in range(size)], pad)
    b_items = [ds[i] for i in range(size)]
    n_forget = len(plan.streams["forget"])
    for j, it in enumerate(b_items):
        for name in it:
            if name.startswith("forget"):
                it[name] = ds[(j + size) % max(size + 1, n_forget)][name]
    return a, collate_streams(b_items, pad)


# ---- every method returns forget_loss, and loss - forget_loss is its retain part ------------------------

@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_returns_its_forget_part(name, tmp_path):
    llm = tiny_llm(0, num_layers=2)
    params = PARAMS.get(name, {})
    cfg = UnlearnConfig(method=name, params=params, max_retain=8, cache_dir=str(tmp_path / "cache"),
                        train=TrainConfig(batch_size=4))
    plan, _, _ = prepare_plan(llm.model, llm.tokenizer, TASK, cfg)
    a, b = _batches(llm.tokenizer, plan)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the model off its frozen reference (at it, NPO/DPO losses are constants)
        for p in llm.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
        out_a, out_b = plan.loss_fn(llm.model, a), plan.loss_fn(llm.model, b)
    assert "forget_loss" in out_a, sorted(out_a)
    rest_a = float(out_a["loss"] - out_a["forget_loss"])
    rest_b = float(out_b["loss"] - out_b["forget_loss"])
    # The retain part does not depend on the forget examples; the forget part does.
    assert rest_a == pytest.approx(rest_b, rel=1e-5, abs=1e-6), (rest_a, rest_b)
    assert float(out_a["forget_loss"]) != float(out_b["forget_loss"])
    if "retain" not in plan.streams:
        assert out_a["loss"] is out_a["forget_loss"] and rest_a == 0.0


# ---- the mechanisms, with values ----------------------------------------------------------------------------

def _tiny_grads(seed: int = 0):
    """GA-style forget gradient and retain-NLL gradient of a tiny Llama on the task's batches."""
    llm = tiny_llm(seed, num_layers=2)
    cfg = UnlearnConfig(method="graddiff", max_retain=8, train=TrainConfig(batch_size=4))
    plan, _, _ = prepare_plan(llm.model, llm.tokenizer, TASK, cfg)
    batch, _ = _batches(llm.tokenizer, plan)
    params = [p for p in llm.model.parameters() if p.requires_grad]
    g_f = list(torch.autograd.grad(-mean_nll(llm.model, batch["forget"]), params))
    g_r = list(torch.autograd.grad(mean_nll(llm.model, batch["retain"]), params))
    return g_f, g_r


def test_gru_rectified_gradient_never_opposes_the_retain_gradient():
    g_f, g_r = _tiny_grads()
    for sign in (1.0, -1.0):  # one of the two signs conflicts with g_r
        gf = [sign * g for g in g_f]
        out, d = gru_rectify(gf, g_r)
        after = dot(out, g_r)
        if d < 0:
            assert after >= -1e-6 * max(1.0, abs(d)), (d, after)
            assert abs(after) < 1e-5 * abs(d)  # the projection removes the conflicting component exactly
        else:
            assert out is gf and after == d  # already compatible: unchanged


def test_gru_in_the_step_rectifies_against_the_ema():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    step = RobustStep(OptimConfig(rectify="gru", gru_ema=0.5), [w], grad_accum=1, total_steps=3)
    step.ready = True
    g_r1, g_r2 = torch.tensor([1.0, 0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0, 0])
    step._acc = {"forget": [torch.tensor([-1.0, -1.0, 1, 0, 0])], "retain_ref": [g_r1]}
    step.apply_gradients()
    torch.testing.assert_close(w.grad, torch.tensor([0.0, -1.0, 1, 0, 0]))
    step._acc = {"forget": [torch.tensor([-1.0, -1.0, 1, 0, 0])], "retain_ref": [g_r2]}
    step.apply_gradients()
    ema = 0.5 * g_r2 + 0.5 * (0.5 * g_r1)  # the reference's EMA, from zero
    assert dot([w.grad], [ema]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(step.ema[0], ema)


def _toy_step(optim: OptimConfig, steps: int, weight_decay: float = 0.1):
    """A tiny Llama trained ``steps`` GradDiff steps through RobustStep by hand (as the loop does)."""
    llm = tiny_llm(1, num_layers=2)
    cfg = UnlearnConfig(method="graddiff", max_retain=8, train=TrainConfig(batch_size=4))
    plan, _, _ = prepare_plan(llm.model, llm.tokenizer, TASK, cfg)
    ds = PairedStreams(plan.streams, seed=0)
    pad = llm.tokenizer.pad_token_id
    params = [p for p in llm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    step = RobustStep(optim, params, grad_accum=1, total_steps=steps)
    step.setup(llm.model, lambda s: (collate_streams([ds[j] for j in range(i, min(len(ds.streams[s]), i + 4))], pad)
                                     for i in range(0, len(ds.streams[s]), 4)))
    before = [p.detach().clone() for p in params]
    snaps = []
    for k in range(steps):
        batch = collate_streams([ds[(4 * k + j) % len(ds)] for j in range(4)], pad)
        step.micro(llm.model, batch, plan.loss_fn)
        step.apply_gradients()
        step.optimizer_step(opt)
        snaps.append([p.detach().clone() for p in params])
    return step, params, before, snaps


@pytest.mark.parametrize("mask", ["salun:0.3", "dgs:0.5"])
def test_masked_weights_stay_bit_identical(mask):
    step, params, before, snaps = _toy_step(OptimConfig(mask=mask), steps=3)
    if mask.startswith("salun"):
        kept = sum(int(m.sum()) for m in step.mask) / sum(m.numel() for m in step.mask)
        assert 0.25 < kept <= 0.31, kept
        for p, b, m in zip(params, before, step.mask, strict=True):
            assert torch.equal(p[~m], b[~m])  # weight decay and momentum did not move them
        assert sum(int((p != b)[m].sum()) for p, b, m in zip(params, before, step.mask, strict=True)) > 0
    else:
        # DGS's mask moves each step: the last step left the weights it masked where they were.
        assert step.mask is not None
        kept = sum(int(m.sum()) for m in step.mask) / sum(m.numel() for m in step.mask)
        assert 0.3 <= kept <= 0.4, kept  # 0.5 falling towards 0.25 over the run, as ALKN's schedule
        for p, b, m in zip(snaps[-1], snaps[-2], step.mask, strict=True):
            assert torch.equal(p[~m], b[~m])
        assert sum(int((p != b)[m].sum()) for p, b, m in zip(snaps[-1], snaps[-2], step.mask, strict=True)) > 0


def test_salun_mask_is_one_global_ranking_of_the_saliency():
    sal = [torch.tensor([[0.1, -5.0], [0.0, 2.0]]), torch.tensor([3.0, -0.2, 0.0, 1.0])]
    masks = salun_mask(sal, 0.5)  # 8 weights, the 4 largest |s|: 5, 3, 2, 1
    assert masks[0].tolist() == [[False, True], [False, True]] and masks[1].tolist() == [True, False, False, True]
    assert not any(bool(m[s == 0].any()) for m, s in zip(salun_mask(sal, 1.0), sal, strict=True))


@pytest.mark.parametrize("kind", ["sam", "gp", "rs"])
def test_sam_perturbation_has_the_radius_and_weights_are_restored(kind):
    llm = tiny_llm(2, num_layers=2)
    cfg = UnlearnConfig(method="graddiff", max_retain=8, train=TrainConfig(batch_size=4))
    plan, _, _ = prepare_plan(llm.model, llm.tokenizer, TASK, cfg)
    batch, _ = _batches(llm.tokenizer, plan)
    params = [p for p in llm.model.parameters() if p.requires_grad]
    seen = []

    def loss_fn(model, b):
        seen.append([p.detach().clone() for p in params])
        return plan.loss_fn(model, b)

    rho = 0.05
    step = RobustStep(OptimConfig(sam=kind, sam_rho=rho, rs_sigma=1e-3, rs_samples=2), params, 1, 1)
    before = [p.detach().clone() for p in params]
    step.micro(llm.model, batch, loss_fn)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # restored bit for bit
    assert len(seen) == (3 if kind == "rs" else 2)
    deltas = [[a - b for a, b in zip(s, seen[0], strict=True)] for s in seen[1:]]
    if kind == "rs":
        for d in deltas:  # Gaussian noise of the configured std
            std = torch.cat([x.flatten() for x in d]).std().item()
            assert std == pytest.approx(1e-3, rel=0.05)
    else:
        assert dot(deltas[0], deltas[0]) ** 0.5 == pytest.approx(rho, abs=1e-5)
        assert step.last["sam_eps_norm"] == pytest.approx(rho, abs=1e-6)


def test_zo_estimate_matches_the_gradient_direction_on_a_quadratic():
    torch.manual_seed(0)
    n = 20
    q = torch.randn(n, n, dtype=torch.float64)
    a = q @ q.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    x = torch.randn(n, dtype=torch.float64)
    true = a @ x + b
    loss = lambda: float(0.5 * x @ a @ x + b @ x)  # noqa: E731
    est = torch.stack([zo_gradient([x], loss, mu=1e-3, dirs=1, seed=s)[0] for s in range(2000)]).mean(0)
    cos = float(est @ true / (est.norm() * true.norm()))
    assert cos > 0.9, cos
    x0 = x.clone()
    zo_gradient([x], loss, mu=1e-3, dirs=3, seed=7)
    assert torch.equal(x, x0)  # weights restored exactly
    same = [zo_gradient([x], loss, mu=1e-3, dirs=2, seed=5)[0] for _ in range(2)]
    assert torch.equal(same[0], same[1])  # seed-reproducible


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_sign_update_moves_every_coordinate_by_exactly_lr(beta):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1000))
    opt = SignOptimizer([w], lr=1e-3, beta=beta)
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.randn(1000)
        opt.step()
        torch.testing.assert_close((w.detach() - before).abs(), torch.full((1000,), 1e-3), atol=1e-7, rtol=0)
    if beta:
        assert "m" in opt.state[w]


def test_weight_averaging_saves_the_mean_of_the_snapshots():
    step, params, _, snaps = _toy_step(OptimConfig(wa=True, wa_start=2, wa_every=1), steps=4, weight_decay=0.0)
    step.finalize()
    for i, p in enumerate(params):
        mean = torch.stack([s[i] for s in snaps[1:]]).double().mean(0).to(p.dtype)
        torch.testing.assert_close(p.detach(), mean, atol=1e-7, rtol=1e-6)
    assert step.wa_n == 3


# ---- config ---------------------------------------------------------------------------------------------------

def test_presets_configs_and_errors():
    assert OptimConfig().is_default() and not optim_preset("gru").is_default()
    for name in ("sam", "rs", "gp", "wa", "gru", "salun", "dgs", "sign", "zo", "hybrid"):
        assert name in OPTIM_PRESETS and not optim_preset(name).is_default()
    with pytest.raises(ValueError, match="known: none, sam"):
        optim_preset("adam")
    with pytest.raises(ValueError, match="salun:<fraction kept>, dgs:<fraction kept>"):
        OptimConfig(mask="top:0.5")
    with pytest.raises(ValueError, match=r"fraction kept must be in \(0, 1\]"):
        OptimConfig(mask="salun:1.5")
    with pytest.raises(ValueError, match="does not combine with kind='zo'"):
        OptimConfig(kind="zo", sam="sam")
    with pytest.raises(ValueError, match="does not combine with kind='hybrid'"):
        OptimConfig(kind="hybrid", rectify="gru")
    with pytest.raises(ValueError, match="curvature regularisation"):
        OptimConfig(sam="cr")
    cfg = load_config(UnlearnConfig, None, ["optim.rectify=gru", "optim.mask=salun:0.5", "optim.sam=sam"])
    assert cfg.optim == OptimConfig(rectify="gru", mask="salun:0.5", sam="sam") and cfg.optim.mask_fraction == 0.5
    with pytest.raises(ConfigError, match="optim.kind"):
        load_config(UnlearnConfig, None, ["optim.kind=lion"])


def test_default_optim_leaves_the_fingerprint_unchanged():
    cfg = UnlearnConfig(method="ga")
    streams = {"forget": [{"input_ids": [1, 2], "labels": [1, 2]}]}
    h = hashlib.sha256(cfg.model_dump_json(exclude={"optim"}).encode())
    h.update(b"digest")
    h.update(b"forget")
    h.update(json.dumps([[[1, 2], [1, 2], None, None, None]]).encode())
    assert _fingerprint(cfg, "digest", streams) == h.hexdigest()[:16]
    assert _fingerprint(cfg.model_copy(update={"optim": optim_preset("gru")}), "digest", streams) != h.hexdigest()[:16]


# ---- in the loop ---------------------------------------------------------------------------------------------

def _run(tmp_path, method: str, optim: OptimConfig, out: str, **train):
    llm = tiny_llm(0, num_layers=2)
    t = {"lr": 3e-3, "max_steps": 6, "batch_size": 4, "save_every": 3, **train}
    cfg = UnlearnConfig(method=method, max_retain=12, train=TrainConfig(**t), optim=optim,
                        cache_dir=str(tmp_path / "cache"))
    return llm.model, unlearn(llm.model, llm.tokenizer, TASK, cfg, tmp_path / out)


def test_default_optim_takes_todays_path_bit_for_bit(tmp_path):
    cfg = UnlearnConfig(method="graddiff", max_retain=8, train=TrainConfig(lr=3e-3, max_steps=3, batch_size=4))
    models = []
    for i, optim in enumerate((None, OptimConfig())):
        m = tiny_llm(0, num_layers=2)
        p, e, _ = prepare_plan(m.model, m.tokenizer, TASK, cfg)
        pad = m.tokenizer.pad_token_id
        train(m.model, m.tokenizer, PairedStreams(p.streams, seed=0), lambda b, pad=pad: collate_streams(b, pad), p.loss_fn,
              e.train, tmp_path / f"o{i}", optim=optim)
        models.append(m.model)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("preset", ["gru", "salun", "dgs", "sam", "rs", "gp", "wa", "sign", "signsgd", "zo", "hybrid"])
def test_each_option_unlearns_on_tiny_llm(preset, tmp_path):
    optim = optim_preset(preset)
    train = {}
    if preset in ("zo", "hybrid"):
        optim = optim.model_copy(update={"zo_dirs": 16})
    if preset == "zo":  # a ZO step correlates with the gradient by ~sqrt(dirs / d): more lr to move in 6 steps
        train = {"lr": 1e-2}
    # GRU on GA: the retain reference is the retain stream the runner adds; ZO on GA: no retain noise.
    method = "ga" if preset in ("gru", "zo") else "graddiff"
    model, res = _run(tmp_path, method, optim, "out", **train)
    h = res.train.history
    assert len(h) == 6 and not any("forget_loss" in x for x in h)  # a part of "loss", not a logged term
    assert h[-1]["forget_nll"] > h[0]["forget_nll"], [x["forget_nll"] for x in h]
    assert sum(x["loss"] for x in h[-2:]) < sum(x["loss"] for x in h[:2]), [x["loss"] for x in h]
    assert res.config["optim"] == optim.model_dump(mode="json")
    assert (tmp_path / "out" / "run_config.yaml").read_text().count("optim:") == 1


def test_interrupted_run_with_options_resumes_to_the_same_weights(tmp_path):
    optim = OptimConfig(rectify="gru", mask="salun:0.5", wa=True, wa_start=2, wa_every=1)
    straight, _ = _run(tmp_path, "ga", optim, "straight", save_every=2)
    llm = tiny_llm(0, num_layers=2)
    cfg = UnlearnConfig(method="ga", max_retain=12, optim=optim, cache_dir=str(tmp_path / "cache"),
                        train=TrainConfig(lr=3e-3, max_steps=6, batch_size=4, save_every=2))
    first = unlearn(llm.model, llm.tokenizer, TASK, cfg, tmp_path / "resumed", stop_after=2)
    assert first.train.steps == 2 and (tmp_path / "resumed.ckpt" / "state.pt").exists()
    state = torch.load(tmp_path / "resumed.ckpt" / "state.pt", weights_only=True)
    assert state["optim"]["steps"] == 2 and state["optim"]["mask"] is not None and state["optim"]["ema"] is not None
    again = tiny_llm(0, num_layers=2)
    res = unlearn(again.model, again.tokenizer, TASK, cfg, tmp_path / "resumed")
    assert res.train.resumed_from == 2 and res.train.steps == 6
    for (n, a), (_, b) in zip(straight.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
