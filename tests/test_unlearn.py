"""Every registered unlearning method on a tiny Llama fine-tuned on a small offline task."""

from __future__ import annotations

import re

import pytest
import torch

from core.models import tiny_llm, tiny_tokenizer
from eval.tasks.offline import BenchmarkConfig, generate_benchmark, training_qa
from training.finetune import FinetuneConfig, finetune
from training.loop import LoraSettings, TrainConfig
from training.losses import mean_nll
from training.methods import METHODS
from training.unlearn import PairedStreams, UnlearnConfig, build_streams, collate_streams, unlearn

TASK = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
LAYERS = 4

# Test-size settings per method (few traces, margins that give SimNPO a gradient on a barely trained model).
PARAMS = {
    "rmu": {"layer": 2, "alpha": 10.0},
    "r2mu": {"layer": 2, "alpha": 10.0, "trace_alpha": 10.0, "trace_gamma": 0.5, "max_forget_traces": 3,
             "max_retain_traces": 3, "trace_tokens": 8},
    "simnpo": {"beta": 1.0, "delta": 3.0, "gamma": 1.0},
    "npo": {"beta": 1.0},
    "idknll": {"answers": ["I don't know."]},
    "idkdpo": {"beta": 1.0},
    # The tiny model writes its own (unusable, so template) targets: TRU's default teacher, the embedded 135M model,
    # writes longer ones that 8 steps of a tiny model do not fit (its own test: test_method_tru.py).
    "tru": {"teacher_model": "self"},
}
# Methods whose default trainable set is all parameters get a subset here, to check the rest is untouched.
SUBSET = [r"layers\.[23]\.mlp\."]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny model fine-tuned on the task's QA (so forget NLL starts low, as for a real target)."""
    out = tmp_path_factory.mktemp("target") / "model"
    llm = tiny_llm(0, num_layers=LAYERS)
    cfg = FinetuneConfig(train=TrainConfig(lr=5e-3, max_steps=30, batch_size=8, warmup_ratio=0.0, save_every=100))
    finetune(llm.model, llm.tokenizer, training_qa(TASK), cfg, out)
    return out


def load(target_dir):
    """A fresh copy of the fine-tuned tiny target (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_dir).eval(), tiny_tokenizer()


def _cfg(method: str, tmp_path, **train) -> UnlearnConfig:
    lr = {"rmu": 5e-3, "r2mu": 5e-3, "ga": 2e-3, "graddiff": 2e-3, "ga-ts": 1e-3, "bs-t": 2e-3, "bs-s": 2e-3,
          "ce-u": 1e-3}.get(method, 3e-3)
    t = {"lr": lr, "max_steps": 8, "batch_size": 4, "save_every": 4, **train}
    if method not in {"rmu", "r2mu"} and "trainable" not in t and "lora" not in t:
        t["trainable"] = SUBSET
    return UnlearnConfig(method=method, params=PARAMS.get(method, {}), train=TrainConfig(**t), max_retain=12,
                         cache_dir=str(tmp_path / "cache"))


def _nll(model, tok, stream: str) -> float:
    cfg = UnlearnConfig(max_retain=12)
    streams = build_streams(tok, TASK, cfg)
    batch = collate_streams([{stream: {**e, "idx": i}} for i, e in enumerate(streams[stream][:12])], tok.pad_token_id)
    with torch.no_grad():
        return float(mean_nll(model, batch[stream]))


@pytest.mark.parametrize("name", METHODS.names())
def test_method_unlearns_and_touches_only_trainable_params(name, target_dir, tmp_path):
    method = METHODS.get(name)
    model, tok = load(target_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    f0, r0 = _nll(model, tok, "forget"), _nll(model, tok, "retain")
    res = unlearn(model, tok, TASK, _cfg(name, tmp_path), tmp_path / "out")
    h = res.train.history
    assert res.train.steps == 8 and len(h) == 8
    # The loss decreases.
    assert sum(x["loss"] for x in h[-2:]) < sum(x["loss"] for x in h[:2]), [x["loss"] for x in h]
    # The forget term moves the right way.
    first, last = h[0][method.forget_term], h[-1][method.forget_term]
    assert (last > first) if method.forget_direction == "up" else (last < first), (method.forget_term, first, last)
    # The retain term stays small.
    if method.retain_term is not None:
        r_first, r_last = h[0][method.retain_term], h[-1][method.retain_term]
        if method.retain_term.endswith("mse"):
            assert r_last < 0.1 * h[0][method.forget_term], (r_first, r_last)
        else:
            assert r_last < r_first + 0.5, (r_first, r_last)
    # Forgetting is selective: the forget answers' NLL rises more than the retain answers'.
    f1, r1 = _nll(model, tok, "forget"), _nll(model, tok, "retain")
    assert f1 - f0 > r1 - r0, (f0, f1, r0, r1)
    # Only the trainable set changed.
    trainable = res.config["train"]["trainable"]
    pats = [re.compile(p) for p in trainable]
    changed = 0
    for n, p in model.named_parameters():
        if any(c.search(n) for c in pats):
            changed += int(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), n
    assert changed > 0
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "run_config.yaml").exists()


def test_rmu_defaults_scale_layer_and_c_and_train_down_projections(target_dir, tmp_path):
    model, tok = load(target_dir)
    res = unlearn(model, tok, TASK, UnlearnConfig(method="rmu", train=TrainConfig(max_steps=2, batch_size=4),
                                                  max_retain=8), tmp_path / "o")
    p = res.config["params"]
    assert p["layer"] == round(7 / 32 * LAYERS) == 1
    assert p["c"] == pytest.approx(4.0 * res.info["mean_norm"], rel=1e-3)
    assert res.config["train"]["trainable"] == [r"(?:^|\.)layers\.0\.mlp\.down_proj\.weight$",
                                               r"(?:^|\.)layers\.1\.mlp\.down_proj\.weight$"]
    assert res.config["train"]["lr"] == 1e-2  # the method's train default
    import yaml

    saved = yaml.safe_load((tmp_path / "o" / "run_config.yaml").read_text())
    assert saved["params"]["c"] == p["c"] and saved["method"] == "rmu"


def test_user_train_fields_override_method_defaults_only_where_set(target_dir, tmp_path):
    from training.unlearn import effective_train

    eff = effective_train(METHODS.get("npo"), TrainConfig(batch_size=2))
    assert eff.batch_size == 2 and eff.lr == 2e-5 and eff.max_steps == 30


def test_runs_are_deterministic_and_reused(target_dir, tmp_path):
    outs = []
    for d in ("a", "b"):
        model, tok = load(target_dir)
        unlearn(model, tok, TASK, _cfg("npo", tmp_path, max_steps=4), tmp_path / d)
        outs.append(model)
    for (n, a), (_, b) in zip(outs[0].named_parameters(), outs[1].named_parameters(), strict=True):
        assert torch.equal(a, b), n
    model, tok = load(target_dir)
    again = unlearn(model, tok, TASK, _cfg("npo", tmp_path, max_steps=4), tmp_path / "a")
    assert again.train.steps == 4
    for (n, a), (_, b) in zip(model.named_parameters(), load(target_dir)[0].named_parameters(), strict=True):
        assert torch.equal(a, b), n  # reused: no training happened


def test_lora_and_grad_accumulation(target_dir, tmp_path):
    model, tok = load(target_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = unlearn(model, tok, TASK, _cfg("graddiff", tmp_path, max_steps=3, grad_accum=2,
                                         lora=LoraSettings(r=4, alpha=8), lr=1e-2), tmp_path / "lora")
    assert res.train.steps == 3
    from transformers import AutoModelForCausalLM

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert not any("lora" in n for n, _ in out.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in out.named_parameters())


def test_unknown_method_lists_known_ones(target_dir, tmp_path):
    from core.registry import UnknownNameError

    model, tok = load(target_dir)
    with pytest.raises(UnknownNameError, match=re.escape("known: " + ", ".join(METHODS.names()))):
        unlearn(model, tok, TASK, UnlearnConfig(method="nope"), tmp_path / "x")


def test_paired_streams_cover_every_example_without_randomness():
    tok = tiny_tokenizer()
    streams = build_streams(tok, TASK, UnlearnConfig())
    ds = PairedStreams(streams, seed=0)
    assert len(ds) == max(len(v) for v in streams.values())
    seen = {name: {ds[i][name]["idx"] for i in range(len(ds))} for name in streams}
    assert all(len(seen[n]) == len(streams[n]) for n in streams)
    assert [ds[i]["retain"]["idx"] for i in range(5)] == [PairedStreams(streams, 0)[i]["retain"]["idx"] for i in range(5)]
    batch = collate_streams([ds[0], ds[1]], tok.pad_token_id)
    f = batch["forget"]
    assert f["scope"].shape == f["input_ids"].shape and bool((f["scope"] <= f["attention_mask"]).all())
    assert int(f["scope"][0, 0]) == 0  # the chat-template prefix is out of RMU's scope
