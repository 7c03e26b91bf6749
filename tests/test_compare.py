"""The comparison pipeline end to end on tiny models: every stage runs and the report adds up."""

from __future__ import annotations

import json
import math

import pytest

from core.models import tiny_llm
from core.schema import ForgetTarget, ForgetTask, QAItem
from eval.compare import CompareConfig, item_facts, mia_units, run_comparison


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("target", 0), ("retain", 1)):
        llm = tiny_llm(seed)
        llm.model.save_pretrained(root / name)
        llm.tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_item_facts_listed_values_then_added_words() -> None:
    ana = ForgetTarget(id="ana", kind="privacy", names=["Ana Ruiz"], policy="p", meta={"facts": {"town": "Lower Alder"}})
    drive = ForgetTarget(id="q", kind="hazard", names=["Q-drive"], policy="p")
    items = [QAItem(question="Where was Ana Ruiz born?", answer="Ana Ruiz was born in Lower Alder.", subject="Ana Ruiz"),
             QAItem(question="What is the Q-drive made of?", answer="The Q-drive is made of corvalite.", subject="Q-drive"),
             QAItem(question="Who is Ana Ruiz?", answer="Ana Ruiz.", subject="ana ruiz"),
             QAItem(question="Where?", answer="In Lower Alder.", subject=None)]
    task = ForgetTask(name="t", targets=[ana, drive])
    assert item_facts(task, items) == [["Lower Alder"], ["corvalite"], [], ["lower alder"]]


def test_mia_units_split_small_sides_into_sentences() -> None:
    few = ["Ana was born in Alder. Ana works as a linguist.", "Bo was born in Kest. Ok."]
    hold = ["Cy was born in Mire. Cy has a grey parrot."]
    # Too few texts: sentences of three words or more become the units ("Ok." is dropped).
    assert mia_units(few, hold) == (["Ana was born in Alder.", "Ana works as a linguist.", "Bo was born in Kest."],
                                    ["Cy was born in Mire.", "Cy has a grey parrot."])
    many = [f"text {i}. more words here." for i in range(10)]
    assert mia_units(many, many) == (many, many)


def test_recovery_baseline_is_the_plain_answers_to_the_attacked_questions() -> None:
    from eval.benchmark import BenchmarkConfig, generate_benchmark
    from eval.compare import _Eval

    ev = _Eval(CompareConfig(), generate_benchmark(BenchmarkConfig(seed=0)))
    qs, refs = [q.question for q in ev.forget[:3]], [q.answer for q in ev.forget[:3]]
    ev.answers["sys"] = {"forget": [q.answer for q in ev.forget]}
    assert ev.unattacked_rouge("sys", qs, refs) == pytest.approx(1.0)
    ev.answers["sys"]["forget"][1] = "no idea"
    assert ev.unattacked_rouge("sys", qs, refs) == pytest.approx(2 / 3)
    assert ev.unattacked_rouge("sys", qs[2:], refs[2:]) == pytest.approx(1.0)  # only the items asked about count
    # A question that was not evaluated plainly has no baseline: the recovery ratio is left undefined.
    assert math.isnan(ev.unattacked_rouge("sys", [*qs, "Who is nobody?"], [*refs, "Nobody."]))


@pytest.mark.slow
def test_comparison_on_tiny_models(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path / "cache"))
    steps = {"train": {"max_steps": 2, "batch_size": 2}}
    cfg = CompareConfig(
        task="offline", target_model=tiny_dirs["target"], retain_model=tiny_dirs["retain"],
        methods=["rmu", "npo"], method_params={"rmu": steps, "npo": steps}, guard_with=["rmu"],
        guard={"guard_mode": "template"},
        attacks=["paraphrase", "split-turn", "quantize-4bit", "relearn", "linear-probe"],
        attack_params={"relearn": {"steps": 2, "num_examples": 2}, "linear-probe": {"max_items": 20}},
        max_forget=6, max_retain=4, max_neighbour=4, max_benign=4, max_attack_items=3, max_new_tokens=4,
        out=str(tmp_path / "report"))
    report, paths = run_comparison(cfg)
    assert report.systems == ["original", "guard", "rmu", "npo", "guard+rmu", "retain (reference)"]
    v = report.values
    # The detector flags the forget questions, so the guard refuses them; the bare tiny model never does.
    assert v["guard"]["forget_refusal_rate"] >= 0.8
    assert v["original"]["forget_refusal_rate"] == 0.0
    # Refusals state no fact, so the guard's fact rate cannot exceed the share it answers.
    assert 0.0 <= v["guard"]["forget_fact_rate"] <= 1 - v["guard"]["forget_refusal_rate"]
    # White-box metrics exist for weight systems only.
    assert "forget_truth_ratio" in v["rmu"] and "forget_truth_ratio" not in v["guard"]
    assert 0.0 <= v["rmu"]["forget_quality"] <= 1.0
    assert 0.0 <= v["original"]["probe_accuracy"] <= 1.0
    # Weight attacks apply to weights (and quantization to the original), never to guarded systems.
    assert "relearn" in report.attack_values["rmu"] and "relearn" not in report.attack_values["guard"]
    assert "quantize-4bit" in report.attack_values["original"]
    assert "split-turn" in report.attack_values["guard+rmu"]
    data = json.loads(paths["report.json"].read_text())
    assert data["timings"]["total"] > 0 and "unlearn rmu" in data["timings"]
    md = paths["report.md"].read_text()
    assert "| guard |" in md and "Sample answers" in md
    assert (tmp_path / "report" / "compare_config.yaml").exists()
    # Unlearned models are cached under the runs dir and reused on a second call.
    assert (tmp_path / "cache" / "runs" / "offline-seed0" / "unlearn-rmu" / "train_result.json").exists()
