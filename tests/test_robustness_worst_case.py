"""The calibrated robustness table and the worst-case forget-set selector (issue 20, items 2 and 3)."""

from __future__ import annotations

import json

import pytest

from core.models import tiny_llm
from core.schema import ForgetTarget, ForgetTask, QAItem
from eval import worst_case as wc
from eval.compare import CompareConfig, run_comparison
from eval.robustness import RobustnessConfig, robustness_table, variant_name, variant_params


def _task(n: int = 6) -> ForgetTask:
    qa = [QAItem(question=f"What is fact {i} of Ana Ruiz?", answer=f"Fact {i} is value{i}.", subject="Ana Ruiz")
          for i in range(n)]
    t = ForgetTarget(id="ana", kind="privacy", names=["Ana Ruiz"], policy="p", texts=["Ana Ruiz text."], qa=qa)
    return ForgetTask(name="t", targets=[t], retain_qa=[QAItem(question="r?", answer="r.")])


def test_capped_simplex_projection_matches_the_closed_form() -> None:
    w = wc.project_capped_simplex([0.9, 0.5, 0.1], 1.0)
    assert w == pytest.approx([0.7, 0.3, 0.0], abs=1e-9)
    w = wc.project_capped_simplex([3.0, 2.0, -1.0, 0.2], 2.0)  # caps at 1 and floors at 0, sum k
    assert sum(w) == pytest.approx(2.0) and all(0.0 <= x <= 1.0 for x in w) and w[:2] == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="k=5 must be in"):
        wc.project_capped_simplex([0.1, 0.2], 5)


def test_subset_request_keeps_counts_and_drops_texts() -> None:
    task = _task()
    qs = [q.question for q in task.forget_qa]
    sub = wc.subset_request(task, {qs[0]: 2, qs[3]: 1})
    assert [q.question for q in sub.forget_qa] == [qs[0], qs[0], qs[3]]
    assert sub.forget_texts == [] and sub.retain_qa == task.retain_qa
    with pytest.raises(ValueError, match="holds no forget item"):
        wc.subset_request(task, {})


def test_selector_puts_weight_on_what_unlearning_leaves_known(monkeypatch) -> None:
    """Round 1 is the ordinary run on the whole request; later rounds train more on the items weighted up; the
    selection is the k items with the lowest NLL (still known) after unlearning."""
    task = _task(6)
    qs = [q.question for q in task.forget_qa]
    calls: list[tuple[str, list[str]]] = []
    nll = {qs[i]: v for i, v in enumerate([3.0, 0.2, 2.5, 0.1, 2.8, 3.1])}  # items 1 and 3 resist unlearning

    def fake_unlearn(req, method, name):  # noqa: ANN001, ANN202
        calls.append((name, [q.question for q in req.forget_qa]))
        return object()

    monkeypatch.setattr(wc, "item_nll", lambda llm, items, system=None: [nll[q.question] for q in items])
    sel = wc.select_worst_case(wc.WorstCaseConfig(k=2, rounds=2, copies=3), "ga", task, fake_unlearn,
                               full_run_name="unlearn-ga")
    assert sel.worst == [qs[1], qs[3]]
    assert calls[0] == ("unlearn-ga", qs)  # uniform w: the shared full-request run
    second = calls[1][1]
    assert second.count(qs[1]) > second.count(qs[0]) and calls[1][0].startswith("worst-ga-")
    assert set(second) == set(qs)  # every item is still unlearned: none is "known" only for being skipped
    assert len(sel.weights) == 2 and all(sum(w) == pytest.approx(2.0) for w in sel.weights)
    assert len(sel.random) == 2 and set(sel.random) <= set(qs)
    with pytest.raises(ValueError, match="must be smaller than the pool"):
        wc.select_worst_case(wc.WorstCaseConfig(k=6), "ga", task, fake_unlearn)


def test_robustness_options_are_checked_and_map_to_optim_presets() -> None:
    from training.optim import OPTIM_PRESETS

    assert variant_name("rmu", "plain") == "rmu" and variant_name("rmu", "sam") == "rmu+sam"
    params = variant_params({"train": {"max_steps": 3}}, "gru")
    assert params["train"] == {"max_steps": 3} and params["optim"] == OPTIM_PRESETS["gru"]
    assert variant_params({"train": {"lr": 1e-5}}, "plain") == {"train": {"lr": 1e-5}}
    with pytest.raises(ValueError, match="unknown robustness option"):
        RobustnessConfig(options=["plain", "nonsense"])


def test_item_nll_is_low_for_what_a_model_was_trained_on() -> None:
    """The selector's upper-level loss on a real (tiny) model: an answer it was fitted to scores below a random one."""
    import torch

    llm = tiny_llm(0)
    items = [QAItem(question="Name?", answer="Ana"), QAItem(question="Town?", answer="Zorbu qlaxe")]
    before = wc.item_nll(llm, items)
    opt = torch.optim.AdamW(llm.model.parameters(), lr=1e-2)
    from core.generation import encode_qa, pad_batch

    batch = pad_batch([encode_qa(llm.tokenizer, "Name?", "Ana", None, 64)], llm.tokenizer.eos_token_id or 0)
    llm.model.train()
    for _ in range(20):
        loss = llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    llm.model.eval()
    after = wc.item_nll(llm, items)
    assert after[0] < before[0] - 1.0 and after[0] < after[1]


@pytest.mark.slow
def test_comparison_with_robustness_and_worst_case_sections(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "models"
    for name, seed in (("target", 0), ("retain", 1)):
        llm = tiny_llm(seed)
        llm.model.save_pretrained(root / name)
        llm.tokenizer.save_pretrained(root / name)
    steps = {"train": {"max_steps": 2, "batch_size": 2}}
    cfg = CompareConfig(
        task="offline", base_model=str(root / "target"), target_model=str(root / "target"),
        retain_model=str(root / "retain"), methods=["ga"], method_params={"ga": steps, "rmu": steps}, guard_with=[],
        guard={"guard_mode": "refuse"}, attacks=["quantize-8bit"], max_mixed=0, max_forget=4, max_heldout=3,
        max_retain=3, max_neighbour=3, max_benign=2, max_general=2, max_new_tokens=4,
        robustness={"methods": ["ga"], "options": ["plain", "gru"], "attacks": ["quantize-4bit", "relearn"],
                    "calib_items": 4, "mix_iter": 2},
        attack_params={"relearn": {"steps": 1, "num_examples": 2}},
        worst_case={"methods": ["rmu"], "k": 2, "rounds": 2}, out=str(tmp_path / "report"))
    report, paths = run_comparison(cfg)
    rob = report.details["robustness"]
    assert [(r["method"], r["option"]) for r in rob["rows"]] == [("ga", "plain"), ("ga", "gru")]
    assert rob["shared"]["request_items"] > 0 and rob["shared"]["target_request_fact_rate"] is not None
    for r in rob["rows"]:
        assert 0.0 <= r["a"] <= 1.0 and set(r["attacked"]) == {"quantize-4bit", "relearn"}
        assert set(r["request_attacked"]) == {"quantize-4bit", "relearn"} and r["request_fact_rate"] is not None
        if r["reached"]:
            assert r["calib_retain"] >= rob["shared"]["level"] - 1e-9
    runs = tmp_path / "cache" / "runs" / "offline-seed0"
    gru_cfg = (runs / "unlearn-ga+gru" / "run_config.yaml").read_text()
    assert "gru" in gru_cfg  # the variant was trained with the option, in its own cache entry
    worst = report.details["worst_case"]
    sel = worst["selections"][0]
    assert len(sel["worst"]) == 2 and len(sel["weights"]) == 2 and set(sel["worst"]) <= set(sel["pool"])
    assert [(r["subset"], r["k"]) for r in worst["rows"]] == [("worst-case", 2), ("random", 2)]
    md = paths["report.md"].read_text()
    assert "## Calibrated robustness" in md and "## Worst-case vs random forget set" in md
    assert "| ga | gru |" in md
    data = json.loads(paths["report.json"].read_text())
    assert data["parity"]["overlaps"] == {} and "robustness: total (training included)" in data["timings"]
    assert robustness_table([], ["relearn"])[0][-3:] == ["relearn", "relearn recovery", "train s"]
    assert "relearn (a) recovery" in md  # the request facts outside the relearn sample have columns of their own


def test_request_facts_outside_the_relearn_sample_are_exactly_the_ones_it_does_not_train_on() -> None:
    from eval.attacks import make_attack
    from eval.robustness import request_items_outside_relearn
    from eval.split import split_task
    from eval.tasks.offline import generate_benchmark

    request = split_task(generate_benchmark()).request
    params = {"relearn": {"num_examples": 5}}
    left = request_items_outside_relearn(request, params)
    trained = make_attack("relearn", params["relearn"]).training_items(request)
    facts = [q for q in request.forget_qa if q.kind == "fact"]
    assert len(trained) == 5 and len(left) == len(facts) - 5
    assert {q.question for q in left}.isdisjoint(q.question for q in trained)
    assert {q.question for q in left} | {q.question for q in trained} == {q.question for q in facts}
    assert request_items_outside_relearn(request, {"relearn": {"num_examples": None}}) == []  # all relearned


def test_mixing_calibration_questions_are_never_evaluated() -> None:
    from types import SimpleNamespace

    from eval.robustness import calibration_items

    retain = [QAItem(question=f"Retain q{i}?", answer=f"a{i}.") for i in range(12)]
    split = SimpleNamespace(negatives={"retain": retain})
    evaluated = [q.question for q in retain[:5]]
    calib = calibration_items(split, evaluated, 6, seed=0)
    assert len(calib) == 6 and not {q.question for q in calib} & set(evaluated)
    assert calibration_items(split, evaluated, 6, seed=0) == calib  # seeded
    with pytest.raises(ValueError, match="lie outside the evaluated sets"):
        calibration_items(split, [q.question for q in retain[:10]], 6, seed=0)


@pytest.mark.slow
def test_worst_case_command_on_tiny_models(tmp_path, monkeypatch):
    """`unlearn-guard worst-case` runs the selection and the worst vs random evaluation and writes both files."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path / "cache"))
    llm = tiny_llm(0)
    llm.model.save_pretrained(tmp_path / "target")
    llm.tokenizer.save_pretrained(tmp_path / "target")
    args = ["worst-case", "--method", "ga", "--k", "3", "--rounds", "2", "--out", str(tmp_path / "wc"),
            "--set", f"target_model={tmp_path / 'target'}", "--set", "method_params.ga.train.max_steps=2",
            "--set", "max_new_tokens=4", "--set", "max_retain=3", "--set", "max_neighbour=3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "wc" / "worst_case.json").read_text())
    sel = data["selections"][0]
    assert sel["method"] == "ga" and len(sel["worst"]) == 3 and len(sel["losses"]) == 2
    # The selection follows the final weights: the worst subset is the k items of largest w.
    w = dict(zip(sel["pool"], sel["weights"][-1], strict=True))
    assert min(w[q] for q in sel["worst"]) >= max(w[q] for q in sel["pool"] if q not in sel["worst"]) - 1e-9
    assert [r["subset"] for r in data["rows"]] == ["worst-case", "random"]
    assert all(r["nll_a"] > 0 and r["target_nll_a"] > 0 for r in data["rows"])
    assert "| ga | worst-case | 3 |" in (tmp_path / "wc" / "worst_case.md").read_text()
    bad = CliRunner().invoke(app, [*args[:3], "--k", "99", *args[5:]])
    assert bad.exit_code != 0 and "must be smaller than the pool" in bad.output


@pytest.mark.slow
def test_robustness_command_on_tiny_models(tmp_path, monkeypatch):
    """`unlearn-guard robustness` alone: the mixing weight, the attacks and the recovery ratio are consistent."""
    from typer.testing import CliRunner

    from cli.main import app
    from eval.attacks import attack_recovery

    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path / "cache"))
    llm = tiny_llm(0)
    llm.model.save_pretrained(tmp_path / "target")
    llm.tokenizer.save_pretrained(tmp_path / "target")
    args = ["robustness", "--methods", "ga,rmu", "--options", "plain", "--out", str(tmp_path / "rb"),
            "--set", f"target_model={tmp_path / 'target'}", "--set", "method_params.ga.train.max_steps=2",
            "--set", "method_params.rmu.train.max_steps=2", "--set", "max_new_tokens=4",
            "--set", "robustness.attacks=[quantize-4bit]", "--set", "robustness.mix_iter=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "rb" / "robustness.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["ga", "rmu"]
    upper = data["shared"]["upper_fact_rate"]["quantize-4bit"]
    for r in data["rows"]:
        assert 0.0 <= r["a"] <= 1.0 and r["train_seconds"] is not None
        assert r["recovery"]["quantize-4bit"] == attack_recovery(upper, r["fact_rate"], r["attacked"]["quantize-4bit"])
    assert "Calibrated robustness" in res.output and (tmp_path / "rb" / "robustness.md").exists()
    bad = CliRunner().invoke(app, [*args[:3], "--options", "plain,nonsense", *args[5:]])
    assert bad.exit_code != 0 and "unknown robustness option" in bad.output
