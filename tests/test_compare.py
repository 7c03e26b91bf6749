"""The comparison pipeline end to end on tiny models: every stage runs and the report adds up."""

from __future__ import annotations

import json

import pytest

from core.models import tiny_llm
from core.schema import ForgetTarget, ForgetTask, MCQItem, QAItem
from eval.attacks import attack_recovery
from eval.compare import CompareConfig, mia_units, run_comparison
from eval.metrics.columns import item_facts
from eval.systems import Response, System


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


class _EchoSystem(System):
    """A fake unguarded system that answers every question with its stored answer (or a fixed text)."""

    def __init__(self, answers: dict[str, str], default: str = "I don't know.") -> None:
        super().__init__(name="echo", kind="weights", llm=None)  # type: ignore[arg-type]
        self._answers, self._default = answers, default

    def respond(self, prompts, max_new_tokens=48, batch_size=32, desc=None):  # noqa: ANN001, ANN201
        return [Response(self._answers.get(p, self._default)) for p in prompts]


def test_plain_scores_use_the_attacked_items_only() -> None:
    from eval.compare import _Eval
    from eval.split import split_task
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark

    split = split_task(generate_benchmark(BenchmarkConfig(seed=0)))
    ev = _Eval(CompareConfig(), split)
    items = ev.sets["b:unseen_fact"][:3]
    knows = {q.question: q.answer for q in items}
    ev.generation_metrics(_EchoSystem(knows))
    assert ev.plain_scores("echo", items)["fact_rate"] == pytest.approx(1.0)
    knows[items[1].question] = "no idea"
    ev.generation_metrics(_EchoSystem(knows))
    assert ev.plain_scores("echo", items)["fact_rate"] == pytest.approx(2 / 3)
    assert ev.plain_scores("echo", items[2:])["fact_rate"] == pytest.approx(1.0)  # only the items asked about count
    # A question that was not evaluated plainly has no baseline: the recovery ratio is left undefined.
    other = QAItem(question="Who is nobody?", answer="Nobody.")
    assert ev.plain_scores("echo", [*items, other]) == {"fact_rate": None, "rouge": None}


def test_attack_recovery_only_where_something_was_forgotten() -> None:
    """Measured on 8 held-out facts: a system that states as many facts as the reference before the attack (or more)
    forgot nothing there, so an attack can recover nothing; the plain ratio would read 2.0 or -1.0."""
    assert attack_recovery(0.375, 0.125, 0.25) == pytest.approx(0.5)
    assert attack_recovery(0.375, 0.125, 0.0) == pytest.approx(-0.5)  # the attack made it forget more
    assert attack_recovery(0.375, 0.5, 0.25) is None and attack_recovery(0.375, 0.375, 0.5) is None
    assert attack_recovery(None, 0.1, 0.2) is None


def test_metrics_of_a_task_without_forget_questions_are_undefined_not_zero() -> None:
    from eval.compare import _Eval
    from eval.split import split_task

    mcq = [MCQItem(question=f"Which agent number {i}?", choices=["a", "b", "c", "d"], answer=0) for i in range(4)]
    task = ForgetTask(name="mcq-only", targets=[ForgetTarget(id="h", kind="hazard", names=["Hazard"], policy="p",
                                                             mcq=mcq)],
                      benign_questions=["What is the capital of Spain?", "How do I boil an egg?"])
    ev = _Eval(CompareConfig(), split_task(task))
    m = ev.generation_metrics(_EchoSystem({}))
    for k in ("forget_fact_rate_a", "forget_rouge_a", "forget_refusal_a", "forget_fact_rate_b", "forget_rouge_b"):
        assert m[k] is None, k
    assert m["over_refusal_c"] == 1.0  # "I don't know." to every held-out negative


def test_guarded_answers_are_counted_by_where_they_came_from() -> None:
    from guard.types import GuardTrace

    def resp(flagged, source, refusal=False, finish="stop"):  # noqa: ANN001, ANN202
        return Response("x", GuardTrace(flagged=flagged, instruction_source=source, requires_refusal=refusal), finish)

    assert resp(False, "none").source == "unflagged"
    assert resp(True, "llm").source == "cot"
    assert resp(True, "template").source == "template"
    assert resp(True, "llm", refusal=True).source == "refused"
    assert resp(True, "llm", finish="content_filter").source == "refused"  # the output check blocked it
    assert Response("x").source == "model"


@pytest.mark.slow
def test_comparison_on_tiny_models(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path / "cache"))
    steps = {"train": {"max_steps": 2, "batch_size": 2}}
    cfg = CompareConfig(
        task="offline", base_model=tiny_dirs["target"], target_model=tiny_dirs["target"],
        retain_model=tiny_dirs["retain"],
        methods=["rmu", "npo"], method_params={"rmu": steps, "npo": steps}, guard_with=["rmu"],
        guard={"guard_mode": "refuse"}, trained_guard=True,
        guard_sft={"model": tiny_dirs["target"], "max_length": 2048,  # the tiny tokenizer spends a token per byte
                   "train": {"max_steps": 2, "batch_size": 2, "save_every": 1},
                   "data": {"max_retain": 4, "max_benign": 4, "max_mixed": 4}},
        attacks=["paraphrase", "split-turn", "quantize-4bit", "relearn", "linear-probe"],
        attack_params={"relearn": {"steps": 2, "num_examples": 2}, "linear-probe": {"max_items": 20}},
        max_forget=6, max_heldout=4, max_retain=4, max_neighbour=4, max_benign=4, max_general=4, max_attack_items=3,
        max_mixed=3, max_new_tokens=4, out=str(tmp_path / "report"))
    report, paths = run_comparison(cfg)
    assert report.systems == ["original", "guard", "guard (trained)", "rmu", "npo", "guard+rmu", "retain (reference)",
                              "base (reference)"]
    v = report.values
    # The detector flags the request's and the held-out forget questions, so the guard refuses them (template
    # mode refuses every flagged prompt); the bare tiny model never does.
    assert v["guard"]["forget_refusal_a"] >= 0.8 and v["guard"]["guard_flag_rate_a"] >= 0.8
    assert v["guard"]["forget_refusal_b"] >= 0.5
    assert v["original"]["forget_refusal_a"] == 0.0
    assert v["guard"]["guard_refused"] >= 1 and v["guard"]["guard_answers_cot"] == 0
    # The guard's per-prompt FPR is measured on held-out negatives (unseen people and questions).
    assert 0.0 <= v["guard"]["guard_fpr_c"] <= 0.2
    # Refusals state no fact, so the guard's fact rate cannot exceed the share it answers.
    assert 0.0 <= v["guard"]["forget_fact_rate_a"] <= 1 - v["guard"]["forget_refusal_a"]
    # White-box metrics exist for weight systems only; the base row has general knowledge only.
    assert "truth_ratio_a" in v["rmu"] and "truth_ratio_a" not in v["guard"]
    assert 0.0 <= v["rmu"]["forget_quality_a"] <= 1.0
    assert 0.0 <= v["original"]["probe_accuracy"] <= 1.0
    assert set(v["base (reference)"]) == {"general_acc_c"}
    assert all(0.0 <= v[s]["general_acc_c"] <= 1.0 for s in report.systems)
    # Weight attacks apply to weights (and quantization to the original), never to guarded systems.
    assert "relearn" in report.attack_values["rmu"] and "relearn" not in report.attack_values["guard"]
    assert "quantize-4bit" in report.attack_values["original"]
    assert "split-turn" in report.attack_values["guard+rmu"]
    # Recovery of a prompt attack is measured against the original under the same attack.
    d = report.details["attacks"]
    assert d["rmu"]["paraphrase"]["upper_fact_rate"] == report.attack_values["original"]["paraphrase"]
    # Mixed prompts: every system plus the guard's other modes; refusing the flagged prompt loses the benign part.
    m = report.mixed
    assert set(m) == {"original", "guard", "guard (trained)", "guard (llm)", "guard (template)", "rmu", "npo",
                      "guard+rmu"}
    assert m["guard"]["all"]["n"] == 3 * 3 and set(m["guard"]) == {"joint", "step", "neighbour", "all"}
    assert m["guard"]["all"]["refusal_rate"] >= 0.5 and m["original"]["all"]["refusal_rate"] == 0.0
    assert m["guard"]["all"]["benign_answered"] <= m["original"]["all"]["benign_answered"] + 1e-9
    assert m["guard"]["all"]["mixed_fact_rate"] == 0.0
    rows = report.details["mixed"]
    assert len(rows) == 9 and all(set(r["answers"]) == set(m) for r in rows)
    data = json.loads(paths["report.json"].read_text())
    assert sum(data["parity"]["checked"].values()) >= 9 and "Mixed prompts: joint" in paths["report.md"].read_text()
    # One forget request for every system; nothing evaluated was held by any of them.
    assert data["parity"]["overlaps"] == {} and sum(data["parity"]["checked"].values()) > 100
    assert data["split"]["people"]["neighbour"] == {"request": 4, "evaluation": 4}
    assert data["timings"]["total"] > 0 and "unlearn rmu" in data["timings"] and "train guard" in data["timings"]
    md = paths["report.md"].read_text()
    assert "| guard |" in md and "Sample answers" in md
    assert (tmp_path / "report" / "compare_config.yaml").exists()
    # Unlearned models are cached under the runs dir and reused on a second call.
    assert (tmp_path / "cache" / "runs" / "offline-seed0" / "unlearn-rmu" / "train_result.json").exists()
    assert (tmp_path / "cache" / "runs" / "offline-seed0" / "guard-sft" / "config.json").exists()


@pytest.mark.slow
def test_comparison_runs_on_lume(tiny_dirs, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("UNLEARN_GUARD_CACHE", str(tmp_path / "cache"))
    lume = Path(__file__).parent / "fixtures" / "lume"
    steps = {"train": {"max_steps": 2, "batch_size": 2}}
    cfg = CompareConfig(
        task=f"lume@{lume}", base_model=tiny_dirs["target"], target_model=tiny_dirs["target"],
        retain_model=tiny_dirs["retain"], methods=["npo"], method_params={"npo": steps}, guard_with=[],
        guard={"guard_mode": "refuse"}, attacks=["paraphrase", "alias"], max_new_tokens=4,
        mixed_guard_modes=["refuse", "template"], mode_rows=True, out=str(tmp_path / "report"))
    report, paths = run_comparison(cfg)
    v = report.values
    # mode_rows: the other guard mode is a row of the main table and the prompt attacks, and is not run twice.
    assert report.systems[:4] == ["original", "guard", "guard (template)", "npo"]
    assert "forget_refusal_a" in v["guard (template)"] and "paraphrase" in report.attack_values["guard (template)"]
    assert set(report.mixed) == {"original", "guard", "guard (template)", "npo"}
    assert json.loads(paths["report.json"].read_text())["parity"]["overlaps"] == {}
    # LUME's sentence completions are not questions: (a) holds the request's fact questions only.
    from eval.split import split_task
    from eval.tasks.lume import load_lume

    sp = split_task(load_lume(lume), cfg.split)
    assert report.split["evaluated"]["a"] == sum(q.kind == "fact" for q in sp.in_request)
    assert 0.0 <= v["original"]["general_acc_c"] <= 1.0
