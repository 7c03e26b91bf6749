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
