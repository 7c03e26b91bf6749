"""The comparison report: systems x metrics, systems x attacks, a Pareto plot and a heat map.

One :class:`Report` is written as ``report.json`` (the data), ``report.md`` and ``report.html``
(the same tables for people) and two PNGs (matplotlib): forget-vs-utility scatter with its Pareto
front, and the attack heat map.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from pydantic import BaseModel, Field

from core.io import atomic_write_bytes, atomic_write_text


class MetricSpec(BaseModel):
    """How to read a metric column: its direction, so a reader knows whether higher is better."""

    name: str
    higher_is_better: bool | None = None
    description: str = ""
    ideal: float | None = Field(None, description="Where closer is better (PrivLeak: 0); overrides the direction.")
    count: bool = Field(False, description="A count (shown without decimals), not a rate.")

    def direction(self) -> str:
        """How to read the column, for the legend."""
        if self.ideal is not None:
            return f"closer to {self.ideal:g} is better"
        if self.higher_is_better is None:
            return "a count" if self.count else "context"
        return "higher is better" if self.higher_is_better else "lower is better"

    def badness(self, value: float) -> float:
        """The value on a lower-is-better scale, for Pareto fronts: distance to ``ideal``, or the negated value."""
        if self.ideal is not None:
            return abs(value - self.ideal)
        return -value if self.higher_is_better else value


class Sample(BaseModel):
    """One prompt with each system's answer, shown in the report."""

    prompt: str
    reference: str = ""
    answers: dict[str, str] = Field(default_factory=dict)
    label: str = ""


class ReportTable(BaseModel):
    """A section's table already rendered to strings (header row first), with the legend that says how to read it."""

    title: str
    legend: str = ""
    rows: list[list[str]]


class Report(BaseModel):
    """Everything a comparison run measured; the tables and plots are views of this."""

    title: str = "unlearn-guard comparison"
    generator: str = Field("", description="What generated the systems' answers, e.g. 'vllm 0.32.0 (greedy, "
                                           "float32, ...)' or 'transformers 5.19.0 (greedy, ...)'.")
    systems: list[str]
    metrics: list[MetricSpec] = Field(default_factory=list)
    values: dict[str, dict[str, float | None]] = Field(default_factory=dict, description="system -> metric -> value")
    attacks: list[str] = Field(default_factory=list)
    attack_values: dict[str, dict[str, float | None]] = Field(default_factory=dict,
                                                              description="system -> attack -> forget metric under attack")
    attack_recovery: dict[str, dict[str, float | None]] = Field(default_factory=dict,
                                                                description="system -> attack -> recovery ratio")
    attack_metric: str = "forget_fact_rate"
    forget_axis: str = "forget_fact_rate_b"
    utility_axis: str = "utility_hm"
    details: dict = Field(default_factory=dict, description="Per-system and per-attack breakdowns (by group, ROUGE).")
    mixed: dict[str, dict[str, dict[str, float | None]]] = Field(
        default_factory=dict, description="system -> mixed-prompt kind (joint, step, neighbour, all) -> metric")
    tables: list[ReportTable] = Field(default_factory=list, description="Optional sections (robustness, worst case).")
    samples: list[Sample] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    split: dict = Field(default_factory=dict, description="Counts of the forget request and of each evaluated set.")
    parity: dict = Field(default_factory=dict, description="The information-parity check (overlaps must be 0).")
    config: dict = Field(default_factory=dict)

    def spec(self, name: str) -> MetricSpec:
        """The spec of a metric column (a lower-is-better spec for an unknown name)."""
        return next((m for m in self.metrics if m.name == name), MetricSpec(name=name, higher_is_better=False))


def _fmt(v: float | None, count: bool = False) -> str:
    """A cell: three decimals (a whole number for counts), or a dash for not-applicable or undefined."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.0f}" if count else f"{v:.3f}"


def _table(rows: list[str], cols: list[str], cell: dict[str, dict[str, float | None]], corner: str,
           counts: frozenset[str] = frozenset()) -> list[list[str]]:
    """A table as a list of string rows (header first)."""
    out = [[corner, *cols]]
    for r in rows:
        out.append([r, *[_fmt(cell.get(r, {}).get(c), c in counts) for c in cols]])
    return out


def _metric_tables(report: Report) -> list[tuple[str, list[list[str]]]]:
    """The systems x metrics table in readable groups: forget (a), (b), negatives (c), guard, white-box."""
    groups = [("Forget: the request's own questions (a)", lambda n: n.endswith("_a") and not n.startswith("guard")),
              ("Forget: held-out questions about the targets (b)", lambda n: n.endswith("_b") and not n.startswith("guard")),
              ("Utility on held-out negatives (c)", lambda n: n.endswith("_c") and not n.startswith("guard")
               or n in ("utility_hm", "tofu_model_utility", "gibberish_rate", "retain_mcq_acc")),
              ("Guard", lambda n: n.startswith("guard")),
              ("White-box", lambda n: True)]
    left = [m.name for m in report.metrics]
    counts = frozenset(m.name for m in report.metrics if m.count)
    out = []
    for title, pick in groups:
        cols = [n for n in left if pick(n)]
        left = [n for n in left if n not in cols]
        rows = [s for s in report.systems if any(report.values.get(s, {}).get(c) is not None for c in cols)]
        if cols and rows:
            out.append((title, _table(rows, cols, report.values, "system", counts)))
    return out


MIXED_LEGEND = ("a forget question and a benign part in one prompt. mixed_fact_rate: the forget fact stated (lower "
                "is better, 0 for the guard); benign_answered: the benign part answered (higher is better); "
                "benign_rouge: ROUGE-L recall against the bare model's answer to the benign part alone (higher is "
                "better); refusal_rate: answers that refuse anything; n: prompts; s_per_prompt: wall time per mixed prompt, batched, "
                "all systems in the same run (the whole stage, not one kind)")


def _mixed_tables(report: Report) -> list[tuple[str, list[list[str]]]]:
    """The mixed-prompt tables, one per kind (joint, step, neighbour, all): systems x the four scores."""
    kinds = list(dict.fromkeys(k for per in report.mixed.values() for k in per))
    out = []
    for kind in kinds:
        cell = {s: per.get(kind, {}) for s, per in report.mixed.items()}
        cols = list(dict.fromkeys(c for v in cell.values() for c in v))
        out.append((f"Mixed prompts: {kind}", _table(list(report.mixed), cols, cell, "system", frozenset({"n"}))))
    return out


def md_table(t: list[list[str]]) -> str:
    """Render a table as GitHub markdown."""
    lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(r) + " |" for r in t[1:]]
    return "\n".join(lines)


def _html_table(t: list[list[str]]) -> str:
    """Render a table as HTML with escaped cells."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Systems not dominated on (lower forget badness, higher utility), sorted by forget badness."""
    front = []
    for name, (f, u) in points.items():
        dominated = any((f2 <= f and u2 >= u) and (f2 < f or u2 > u) for n2, (f2, u2) in points.items() if n2 != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def pareto_points(report: Report) -> dict[str, tuple[float, float]]:
    """Each system's (forget badness, utility) on the report's axes, for systems that have both values.

    The forget axis is put on a lower-is-better scale by its spec (PrivLeak: the distance to 0), so the
    front is right whatever metric the axis shows.
    """
    spec = report.spec(report.forget_axis)
    pts = {}
    for s in report.systems:
        f, u = report.values.get(s, {}).get(report.forget_axis), report.values.get(s, {}).get(report.utility_axis)
        if f is not None and u is not None and not (math.isnan(f) or math.isnan(u)):
            pts[s] = (spec.badness(f), u)
    return pts


def _plots(report: Report, out: Path) -> list[str]:
    """Draw the Pareto scatter and the attack heat map; return the file names written."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pts = pareto_points(report)
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        front = pareto_front(pts)
        for s, (f, u) in pts.items():
            ax.scatter(f, u, s=60 if s in front else 40, marker="o" if s in front else "x")
            ax.annotate(s, (f, u), textcoords="offset points", xytext=(5, 4), fontsize=8)
        # The front as a staircase: every point right of and below it is dominated.
        fx, fy = [pts[s][0] for s in front], [pts[s][1] for s in front]
        ax.step(fx, fy, where="post", linestyle="--", color="grey", label=f"Pareto front ({len(front)} systems)")
        spec = report.spec(report.forget_axis)
        xlabel = (f"|{report.forget_axis} - {spec.ideal:g}| (closer to {spec.ideal:g} = better)" if spec.ideal is not None
                  else f"{report.forget_axis} (lower = more forgotten)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{report.utility_axis} (higher = more kept)")
        ax.set_title("Forget vs utility")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(out / "pareto.png", buf.getvalue())
        written.append("pareto.png")
    if report.attacks and report.attack_values:
        import numpy as np

        grid = np.array([[report.attack_values.get(s, {}).get(a) if report.attack_values.get(s, {}).get(a) is not None
                          else np.nan for a in report.attacks] for s in report.systems], dtype=float)
        fig, ax = plt.subplots(figsize=(1.1 + 0.75 * len(report.attacks), 1.2 + 0.5 * len(report.systems)))
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="Reds", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(report.attacks)), report.attacks, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(report.systems)), report.systems, fontsize=8)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, label=f"{report.attack_metric} under attack")
        ax.set_title("Attacks: forget metric under attack (higher = more leaked)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(out / "attacks.png", buf.getvalue())
        written.append("attacks.png")
    return written


def render_markdown(report: Report, images: list[str] | None = None) -> str:
    """The report as markdown: tables, images, samples, timings and notes."""
    parts = [f"# {report.title}", ""]
    if report.generator:
        parts += [f"Generator: {report.generator}.", ""]
    parts += ["## Systems x metrics", ""]
    for title, table in _metric_tables(report):
        parts += [f"### {title}", "", md_table(table), ""]
    legend = [f"- `{m.name}`: {m.description} ({m.direction()})" for m in report.metrics]
    parts += legend + [""]
    if report.split:
        parts += ["## Forget request and held-out evaluation", "", "```", json.dumps(report.split, indent=1), "```", ""]
    if report.parity:
        parts += [f"Information parity: {sum(report.parity.get('checked', {}).values())} evaluated texts checked, "
                  f"{sum(n for per in report.parity.get('overlaps', {}).values() for n in per.values())} held by a "
                  "system.", ""]
    if report.attacks:
        parts += [f"## Systems x attacks ({report.attack_metric} under attack)", "",
                  md_table(_table(report.systems, report.attacks, report.attack_values, "system")), "",
                  "### Recovery ratio (attacked - plain) / (original under the same attack - plain)", "",
                  md_table(_table(report.systems, report.attacks, report.attack_recovery, "system")), ""]
    if report.mixed:
        parts += ["## Mixed prompts", "", MIXED_LEGEND + ".", ""]
        for title, table in _mixed_tables(report):
            parts += [f"### {title}", "", md_table(table), ""]
    for t in report.tables:
        parts += [f"## {t.title}", "", t.legend + ".", "", md_table(t.rows), ""]
    for img in images or []:
        parts += [f"![{img}]({img})", ""]
    if report.samples:
        parts += ["## Sample answers", ""]
        for s in report.samples:
            parts += [f"**{s.label or 'prompt'}**: {s.prompt}", "", f"- reference: {s.reference}"]
            parts += [f"- {name}: {ans!r}" for name, ans in s.answers.items()] + [""]
    if report.timings:
        parts += ["## Timings (s)", "", *[f"- {k}: {v:.1f}" for k, v in report.timings.items()], ""]
    if report.notes:
        parts += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    return "\n".join(parts)


def render_html(report: Report, images: list[str] | None = None) -> str:
    """The report as a standalone HTML page (images referenced beside it)."""
    body = [f"<h1>{html.escape(report.title)}</h1>"]
    if report.generator:
        body.append(f"<p>Generator: {html.escape(report.generator)}.</p>")
    body.append("<h2>Systems x metrics</h2>")
    for title, table in _metric_tables(report):
        body += [f"<h3>{html.escape(title)}</h3>", _html_table(table)]
    body.append("<ul>" + "".join(f"<li><code>{html.escape(m.name)}</code>: {html.escape(m.description)} "
                                 f"({html.escape(m.direction())})</li>" for m in report.metrics) + "</ul>")
    if report.attacks:
        body += [f"<h2>Systems x attacks ({html.escape(report.attack_metric)} under attack)</h2>",
                 _html_table(_table(report.systems, report.attacks, report.attack_values, "system")),
                 "<h3>Recovery ratio</h3>",
                 _html_table(_table(report.systems, report.attacks, report.attack_recovery, "system"))]
    if report.mixed:
        body += ["<h2>Mixed prompts</h2>", f"<p>{html.escape(MIXED_LEGEND)}.</p>"]
        for title, table in _mixed_tables(report):
            body += [f"<h3>{html.escape(title)}</h3>", _html_table(table)]
    for t in report.tables:
        body += [f"<h2>{html.escape(t.title)}</h2>", f"<p>{html.escape(t.legend)}.</p>", _html_table(t.rows)]
    body += [f'<p><img src="{html.escape(i)}" alt="{html.escape(i)}"></p>' for i in images or []]
    if report.samples:
        body.append("<h2>Sample answers</h2>")
        for s in report.samples:
            items = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(a)}</li>" for n, a in s.answers.items())
            body.append(f"<p><b>{html.escape(s.label)}</b>: {html.escape(s.prompt)}<br>reference: "
                        f"{html.escape(s.reference)}</p><ul>{items}</ul>")
    if report.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>" \
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>"


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the PNGs into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = _plots(report, out)
    atomic_write_text(out / "report.json", report.model_dump_json(indent=1))
    atomic_write_text(out / "report.md", render_markdown(report, images))
    atomic_write_text(out / "report.html", render_html(report, images))
    paths = {name: out / name for name in ("report.json", "report.md", "report.html")}
    paths.update({img: out / img for img in images})
    return paths
