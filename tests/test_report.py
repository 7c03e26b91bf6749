"""The comparison report: Pareto front, tables and files."""

from __future__ import annotations

import json
import math

from eval.report import MetricSpec, Report, Sample, pareto_front, render_markdown, write_report


def _report() -> Report:
    return Report(
        systems=["original", "guard", "rmu", "guard+rmu"],
        metrics=[MetricSpec(name="forget_rougeL_recall", higher_is_better=False, description="forget"),
                 MetricSpec(name="retain_rougeL_recall", higher_is_better=True, description="retain")],
        values={"original": {"forget_rougeL_recall": 0.9, "retain_rougeL_recall": 0.9},
                "guard": {"forget_rougeL_recall": 0.1, "retain_rougeL_recall": 0.88},
                "rmu": {"forget_rougeL_recall": 0.3, "retain_rougeL_recall": 0.7},
                "guard+rmu": {"forget_rougeL_recall": 0.05, "retain_rougeL_recall": None}},
        attacks=["paraphrase", "relearn"],
        attack_values={"guard": {"paraphrase": 0.2, "relearn": None}, "rmu": {"paraphrase": 0.4, "relearn": 0.8}},
        attack_recovery={"rmu": {"paraphrase": 1 / 6, "relearn": 5 / 6}},
        samples=[Sample(prompt="Where was A born?", reference="A was born in X.", answers={"guard": "I can't."})],
        forget_axis="forget_rougeL_recall", utility_axis="retain_rougeL_recall",
    )


def test_pareto_front_excludes_dominated_points():
    pts = {"a": (0.9, 0.9), "b": (0.1, 0.88), "c": (0.3, 0.7), "d": (0.1, 0.5)}
    assert pareto_front(pts) == ["b", "a"]  # c and d are dominated by b


def test_markdown_tables_and_dashes_for_missing():
    md = render_markdown(_report())
    assert "| guard | 0.100 | 0.880 |" in md
    assert "| guard+rmu | 0.050 | – |" in md
    assert "| rmu | 0.167 | 0.833 |" in md
    assert "I can't." in md


def test_write_report_files(tmp_path):
    paths = write_report(_report(), tmp_path)
    assert set(paths) == {"report.json", "report.md", "report.html", "pareto.png", "attacks.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["values"]["rmu"]["retain_rougeL_recall"] == 0.7
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (tmp_path / "report.html").read_text()
    assert not math.isnan(data["attack_recovery"]["rmu"]["relearn"])


def test_privleak_reads_closer_to_zero_in_legend_and_front():
    from eval.report import pareto_points

    rep = Report(systems=["a", "b", "c"],
                 metrics=[MetricSpec(name="privleak", ideal=0.0, description="PrivLeak %"),
                          MetricSpec(name="utility_hm", higher_is_better=True, description="utility"),
                          MetricSpec(name="guard_refused", count=True, description="refused")],
                 values={"a": {"privleak": -90.0, "utility_hm": 0.9, "guard_refused": 3.0},
                         "b": {"privleak": 5.0, "utility_hm": 0.8}, "c": {"privleak": 40.0, "utility_hm": 0.7}},
                 forget_axis="privleak", utility_axis="utility_hm")
    md = render_markdown(rep)
    assert "`privleak`: PrivLeak % (closer to 0 is better)" in md
    assert "| 3 |" in md  # a count has no decimals
    pts = pareto_points(rep)
    assert pts["a"] == (90.0, 0.9) and pts["b"] == (5.0, 0.8)
    # c (|40| and lower utility than b) is dominated; a and b trade off.
    assert pareto_front(pts) == ["b", "a"]


def test_metric_tables_are_grouped_by_evaluation_set():
    rep = Report(systems=["x"],
                 metrics=[MetricSpec(name="forget_fact_rate_a", higher_is_better=False),
                          MetricSpec(name="forget_fact_rate_b", higher_is_better=False),
                          MetricSpec(name="over_refusal_c", higher_is_better=False),
                          MetricSpec(name="guard_fpr_c", higher_is_better=False)],
                 values={"x": {"forget_fact_rate_a": 0.5, "forget_fact_rate_b": 0.25, "over_refusal_c": 0.0,
                               "guard_fpr_c": None}})
    md = render_markdown(rep)
    a, b, c = md.index("(a)"), md.index("(b)"), md.index("(c)")
    assert a < b < c
    assert "### Guard" not in md  # a group with no defined value is left out
