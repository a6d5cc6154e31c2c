"""Plots of harness rows: metrics against the number of edits, one line per method.

Uses matplotlib's object API with the Agg canvas directly: no pyplot, no global backend state,
nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANELS = [  # (row key, metric, title); row key None: a top-level field of the row
    ("post", "reliability_em", "reliability (greedy EM)"),
    ("post", "generality_em", "generality (greedy EM)"),
    ("post", "locality_em", "locality (greedy EM)"),
    (None, "perplexity_ratio", "held-out perplexity / pre-edit"),
    ("post", "reliability_tf", "reliability (teacher-forced)"),
    ("post", "generality_tf", "generality (teacher-forced)"),
    ("post", "locality_tf", "locality (teacher-forced)"),
    (None, "latency_s", "latency per update (s)"),
]


def _value(row: dict, key: str | None, metric: str) -> float:
    value = row[key][metric] if key else row[metric]
    return float("nan") if value is None else value


def plot_mode(rows: list[dict], title: str, path: str | Path) -> Path:
    """A 2x4 grid of panels; x is the number of edits (log scale), one line per method."""
    fig = Figure(figsize=(16, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    for ax, (key, metric, panel_title) in zip(axes.flat, PANELS):
        for method in methods:
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["size"])
            ax.plot([r["size"] for r in mine], [_value(r, key, metric) for r in mine], marker="o", label=method)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("number of edits")
        if key == "post":
            ax.set_ylim(-0.03, 1.03)
        elif any(_value(r, key, metric) > 0 for r in rows):  # ratios and seconds span decades
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def plot_retention(rows: list[dict], path: str | Path) -> Path:
    """Sequential rows: reliability of each sequence's first edits against the number of edits made so
    far, one panel per sequence length, one line per method."""
    sizes = sorted({r["size"] for r in rows if len(r.get("retention", [])) > 1})
    fig = Figure(figsize=(5 * max(len(sizes), 1), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(sizes), 1), squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        for r in (r for r in rows if r["size"] == size):
            ax.plot([t for t, _ in r["retention"]], [v for _, v in r["retention"]], marker="o", label=r["method"])
        ax.set_title(f"sequences of {size} edits", fontsize=10)
        ax.set_xscale("log")
        points = sorted({t for r in rows if r["size"] == size for t, _ in r["retention"]})
        ax.set_xticks(points, [str(t) for t in points])
        ax.minorticks_off()
        ax.set_xlabel("edits made so far")
        ax.set_ylabel("reliability of the first edits (greedy EM)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Retention: do the first edits still hold as more are added?")
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path
