"""Truncated forwards, caches, traces, teachers, kill-and-resume and the CLI of the unlearning trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from core.models import tiny_llm
from core.schema import save_task
from eval.tasks.offline import BenchmarkConfig, generate_benchmark
from training.activations import frozen_prefix, layer_output
from training.loop import TrainConfig
from training.methods import METHODS
from training.methods.common import ExampleCache, steering_vector
from training.unlearn import UnlearnConfig, unlearn

TASK = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
ROOT = Path(__file__).resolve().parents[1]


def _batch(tok):
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Where was the author born?", "The quick brown fox.")]
    n = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (n - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (n - len(e)) for e in enc])
    return ids, mask


def test_truncated_forward_matches_full_forward_and_frozen_prefix():
    llm = tiny_llm(0, num_layers=6)
    ids, mask = _batch(llm.tokenizer)
    with torch.no_grad():
        full = llm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in (0, 2, 4):
            h = layer_output(llm.model, layer, ids, mask)
            torch.testing.assert_close(h, full[layer + 1])
            ref = frozen_prefix(llm.model, layer)
            torch.testing.assert_close(layer_output(ref, layer, ids, mask), h)
            n_ref = sum(p.numel() for p in ref.parameters())
            assert n_ref < sum(p.numel() for p in llm.model.parameters())
            assert not any(p.requires_grad for p in ref.parameters())
    with pytest.raises(ValueError, match="outside 0..5"):
        layer_output(llm.model, 6, ids, mask)


def test_example_cache_computes_each_example_once():
    calls = []

    def compute(b):
        calls.append(b["input_ids"].shape[0])
        return b["input_ids"].float().unsqueeze(-1) * 2

    cache = ExampleCache(compute, per_token=True)
    b1 = {"input_ids": torch.tensor([[1, 2, 0], [3, 4, 5]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
          "idx": torch.tensor([0, 1])}
    b2 = {"input_ids": torch.tensor([[3, 4, 5, 0], [6, 0, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]), "idx": torch.tensor([1, 2])}
    out1, out2 = cache(b1), cache(b2)
    assert calls == [2, 1] and cache.computed_rows == 3
    assert out1[:, :, 0].tolist() == [[2, 4, 0], [6, 8, 10]]
    assert out2[:, :, 0].tolist() == [[6, 8, 10, 0], [12, 0, 0, 0]]


def test_steering_vectors_are_seeded_unit_and_per_target():
    a, b = steering_vector(64, 0, "person-000"), steering_vector(64, 0, "person-000")
    assert torch.equal(a, b) and abs(float(a.norm()) - 1) < 1e-5 and bool((a >= 0).all())
    assert not torch.equal(a, steering_vector(64, 0, "hazard-quillon"))
    assert not torch.equal(a, steering_vector(64, 1, "person-000"))


def test_rmu_frozen_activations_are_computed_once_per_retain_example(tmp_path, monkeypatch):
    from training.methods import rmu

    cores = []
    orig = rmu.RMUCore.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        cores.append(self)

    monkeypatch.setattr(rmu.RMUCore, "__init__", spy)
    llm = tiny_llm(0, num_layers=4)
    res = unlearn(llm.model, llm.tokenizer, TASK, UnlearnConfig(
        method="rmu", max_retain=6, train=TrainConfig(max_steps=9, batch_size=4, save_every=100)), tmp_path / "o")
    assert res.train.steps == 9
    cache = cores[0].caches["retain"]
    assert cache.computed_rows == len(cache.store) == 6  # 9 steps x 4 rows, each of the 6 computed once


def test_r2mu_traces_are_cached_as_jsonl_and_reused(tmp_path, monkeypatch):
    from training import traces

    cfg = UnlearnConfig(method="r2mu", max_retain=4, cache_dir=str(tmp_path / "cache"),
                        params={"max_forget_traces": 2, "max_retain_traces": 2, "trace_tokens": 6},
                        train=TrainConfig(max_steps=1, batch_size=2))
    llm = tiny_llm(0, num_layers=4)
    res = unlearn(llm.model, llm.tokenizer, TASK, cfg, tmp_path / "a")
    files = list((tmp_path / "cache" / "traces").glob("*.jsonl"))
    assert len(files) == 1 and res.info["traces"] == {"forget": 2, "retain": 2}
    recs = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["forget", "forget", "retain", "retain"]
    assert all(r["prompt"].endswith("Let's reason this step by step.") for r in recs)
    assert all(len(llm.tokenizer(r["trace"], add_special_tokens=False)["input_ids"]) <= 6 for r in recs)

    def boom(*a, **k):
        raise AssertionError("traces should come from the cache")

    monkeypatch.setattr(traces, "generate", boom)
    unlearn(tiny_llm(0, num_layers=4).model, llm.tokenizer, TASK, cfg, tmp_path / "b")


def test_tru_template_targets_are_query_specific_and_cached(tmp_path):
    from training.teachers import LLMTeacher, TemplateTeacher, cached_tru_targets, parse_tru_reply

    person = TASK.targets[0]
    q = next(x for x in person.qa if "award" in x.question.lower() or "prize" in x.question.lower()
             or "honour" in x.question.lower())
    t = TemplateTeacher().tru_targets([(q.question, person)])[0]
    assert person.name in t.reasoning and "awards" in t.reasoning and person.name in t.refusal
    hazard = TASK.targets[-1]
    h = TemplateTeacher().tru_targets([(hazard.qa[0].question, hazard)])[0]
    assert hazard.name in h.reasoning and "technical details" in h.reasoning
    parsed = parse_tru_reply("Q?", "Reasoning: It asks for a private fact.\nRefusal: Sorry, I can't help.", "llm")
    assert parsed.reasoning == "It asks for a private fact." and parsed.refusal == "Sorry, I can't help."
    assert parse_tru_reply("Q?", "no structure here", "llm") is None
    llm = tiny_llm(0)
    teacher = LLMTeacher(llm.model, llm.tokenizer, "tiny", max_new_tokens=8)
    items = [(x.question, person) for x in person.qa[:2]]
    out = cached_tru_targets(teacher, items, tmp_path)
    assert teacher.fallbacks == 2 and [o.source for o in out] == ["template", "template"]
    again = cached_tru_targets(teacher, items, tmp_path)
    assert again == out and teacher.fallbacks == 2  # second call read the cache


_CHILD = textwrap.dedent("""
    import sys, time
    import training.loop as L
    from core.models import tiny_llm
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark
    from training.loop import TrainConfig
    from training.unlearn import UnlearnConfig, unlearn

    orig = L._save_checkpoint
    def slow(*a, **k):
        orig(*a, **k)
        print("CKPT", a[4], flush=True)
        time.sleep(60)
    L._save_checkpoint = slow
    task = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
    llm = tiny_llm(0, num_layers=4)
    cfg = UnlearnConfig.model_validate_json(sys.argv[2])
    unlearn(llm.model, llm.tokenizer, task, cfg, sys.argv[1])
    print("FINISHED", flush=True)
""")


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    cfg = UnlearnConfig(method="rmu", max_retain=8, params={"layer": 2},
                        train=TrainConfig(max_steps=8, batch_size=4, save_every=4, lr=5e-3))
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out), cfg.model_dump_json(exclude_unset=True)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 300
        line = ""
        while time.time() < deadline:
            line = proc.stdout.readline()
            if line.startswith("CKPT") or not line:
                break
        assert line.strip() == "CKPT 4", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    progress = json.loads((tmp_path / "killed.ckpt" / "progress.json").read_text())
    assert progress["step"] == 4 and not out.exists()

    resumed = tiny_llm(0, num_layers=4)
    res = unlearn(resumed.model, resumed.tokenizer, TASK, cfg, out)
    assert res.train.resumed_from == 4 and res.train.steps == 8
    straight = tiny_llm(0, num_layers=4)
    unlearn(straight.model, straight.tokenizer, TASK, cfg, tmp_path / "straight")
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    llm = tiny_llm(0, num_layers=4)
    llm.model.save_pretrained(d / "tiny")
    llm.tokenizer.save_pretrained(d / "tiny")
    save_task(TASK, d / "task.json")
    return d


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_is_reachable_from_the_cli(name, cli_env, tmp_path):
    from typer.testing import CliRunner

    from cli.train import app

    out = tmp_path / name
    args = ["train", "--method", name, "--model", str(cli_env / "tiny"), "--task", str(cli_env / "task.json"),
            "--out", str(out), "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "max_retain=2",
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    if name == "r2mu":
        args += ["--set", "params.max_forget_traces=1", "--set", "params.max_retain_traces=1",
                 "--set", "params.trace_tokens=4"]
    if name == "tru":  # the tiny model as its own teacher: the default (the embedded 135M model) has its own test
        args += ["--set", "params.teacher_model=self"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (out / "config.json").exists()
    import yaml

    saved = yaml.safe_load((tmp_path / f"{name}.config.yaml").read_text())
    assert saved["method"] == name and saved["train"]["max_steps"] == 1
    assert json.loads(res.output[res.output.index("{"):])["steps"] == 1


def test_cli_unknown_method_lists_known_methods(cli_env, tmp_path):
    from typer.testing import CliRunner

    from cli.train import app
    from training.methods import METHODS

    res = CliRunner().invoke(app, ["train", "--method", "forgetful", "--model", str(cli_env / "tiny"),
                                   "--task", str(cli_env / "task.json"), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    flat = " ".join(res.output.replace("│", " ").split())
    assert "known: " + ", ".join(METHODS.names()) in flat
