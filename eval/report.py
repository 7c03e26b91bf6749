"""The comparison report: systems x metrics, systems x attacks, a Pareto plot and a heat map.

One :class:`Report` is written as ``report.json`` (the data), ``report.md`` and ``report.html``
(the same tables for people) and two PNGs (matplotlib): forget-vs-utility scatter with its Pareto
front, and the attack heat map.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from pydantic import BaseModel, Field

from core.io import atomic_write_bytes, atomic_write_text


class MetricSpec(BaseModel):
    """How to read a metric column: its direction, so a reader knows whether higher is better."""

    name: str
    higher_is_better: bool | None = None
    description: str = ""


class Sample(BaseModel):
    """One prompt with each system's answer, shown in the report."""

    prompt: str
    reference: str = ""
    answers: dict[str, str] = Field(default_factory=dict)
    label: str = ""


class Report(BaseModel):
    """Everything a comparison run measured; the tables and plots are views of this."""

    title: str = "unlearn-guard comparison"
    systems: list[str]
    metrics: list[MetricSpec] = Field(default_factory=list)
    values: dict[str, dict[str, float | None]] = Field(default_factory=dict, description="system -> metric -> value")
    attacks: list[str] = Field(default_factory=list)
    attack_values: dict[str, dict[str, float | None]] = Field(default_factory=dict,
                                                              description="system -> attack -> forget metric under attack")
    attack_recovery: dict[str, dict[str, float | None]] = Field(default_factory=dict,
                                                                description="system -> attack -> recovery ratio")
    attack_metric: str = "forget_rougeL_recall"
    forget_axis: str = "forget_rougeL_recall"
    utility_axis: str = "retain_rougeL_recall"
    samples: list[Sample] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    config: dict = Field(default_factory=dict)


def _fmt(v: float | None) -> str:
    """A cell: three decimals, or a dash for not-applicable."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}"


def _table(rows: list[str], cols: list[str], cell: dict[str, dict[str, float | None]], corner: str) -> list[list[str]]:
    """A table as a list of string rows (header first)."""
    out = [[corner, *cols]]
    for r in rows:
        out.append([r, *[_fmt(cell.get(r, {}).get(c)) for c in cols]])
    return out


def _md_table(t: list[list[str]]) -> str:
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
    """Systems not dominated on (lower forget, higher utility), sorted by forget score."""
    front = []
    for name, (f, u) in points.items():
        dominated = any((f2 <= f and u2 >= u) and (f2 < f or u2 > u) for n2, (f2, u2) in points.items() if n2 != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def _plots(report: Report, out: Path) -> list[str]:
    """Draw the Pareto scatter and the attack heat map; return the file names written."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pts = {s: (report.values.get(s, {}).get(report.forget_axis), report.values.get(s, {}).get(report.utility_axis))
           for s in report.systems}
    pts = {s: (f, u) for s, (f, u) in pts.items() if f is not None and u is not None}
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for s, (f, u) in pts.items():
            ax.scatter(f, u, s=50)
            ax.annotate(s, (f, u), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = pareto_front(pts)
        ax.plot([pts[s][0] for s in front], [pts[s][1] for s in front], "--", color="grey", label="Pareto front")
        ax.set_xlabel(f"{report.forget_axis} (lower = more forgotten)")
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
    metric_names = [m.name for m in report.metrics]
    parts += ["## Systems x metrics", "", _md_table(_table(report.systems, metric_names, report.values, "system")), ""]
    legend = [f"- `{m.name}`: {m.description} ({'higher' if m.higher_is_better else 'lower'} is better)"
              for m in report.metrics if m.higher_is_better is not None]
    parts += legend + [""]
    if report.attacks:
        parts += [f"## Systems x attacks ({report.attack_metric} under attack)", "",
                  _md_table(_table(report.systems, report.attacks, report.attack_values, "system")), "",
                  "### Recovery ratio (attacked - unlearned) / (original - unlearned)", "",
                  _md_table(_table(report.systems, report.attacks, report.attack_recovery, "system")), ""]
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
    metric_names = [m.name for m in report.metrics]
    body = [f"<h1>{html.escape(report.title)}</h1>", "<h2>Systems x metrics</h2>",
            _html_table(_table(report.systems, metric_names, report.values, "system"))]
    if report.attacks:
        body += [f"<h2>Systems x attacks ({html.escape(report.attack_metric)} under attack)</h2>",
                 _html_table(_table(report.systems, report.attacks, report.attack_values, "system")),
                 "<h3>Recovery ratio</h3>",
                 _html_table(_table(report.systems, report.attacks, report.attack_recovery, "system"))]
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
