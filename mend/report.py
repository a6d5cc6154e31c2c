"""Write a harness run: `report.json` (everything, machine-readable), `table.md` and PNG plots.

The report's measured part comes from `mend.harness.run_harness`; the entry point adds the config,
dataset, seed and `environment()` (versions, git commit) so that a run can be reproduced.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch
import transformers

from mend.plots import plot_mode, plot_retention

METRIC_COLUMNS = ["reliability_em", "generality_em", "locality_em", "reliability_tf", "generality_tf", "locality_tf"]
SIZE_HEADER = {"batch": "edits/update", "sequential": "edits in sequence"}
MODE_TITLE = {
    "batch": "Batch: each update of N edits made on the pristine model",
    "sequential": "Sequential: T edits one after another on one model, then all T re-measured",
}


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    try:
        package = metadata.version("mend-service")
    except metadata.PackageNotFoundError:
        package = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "mend_service": package, "git_commit": _git_commit(), "platform": platform.platform()}


def json_safe(value):
    """NaN and inf become null: strict JSON readers (jq, browsers) refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ppl(row: dict) -> str:
    ppl = row["perplexity"]
    if ppl is None:
        return "-"
    return f"{ppl:.4g} ({row['perplexity_ratio']:.3g}x)" if math.isfinite(ppl) else "non-finite"


def markdown_table(report: dict, mode: str) -> str:
    """One row per (method, size) of `mode`; greedy exact match first, then teacher-forced."""
    sequential = mode == "sequential"
    extra = ["reliability em at edit"] if sequential else []
    head = ["method", SIZE_HEADER[mode], *(c.replace("_", " ") for c in METRIC_COLUMNS), *extra,
            "held-out ppl (x pre)", "latency s" + ("/edit" if sequential else "/update")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pre, ppl_pre = report["pre"], report.get("perplexity_pre")
    lines.append("| pre-edit | - | " + " | ".join(_fmt(pre[c]) for c in METRIC_COLUMNS) + " | "
                 + ("- | " if sequential else "") + ("-" if ppl_pre is None else f"{ppl_pre:.4g}") + " | - |")
    for r in (r for r in report["rows"] if r["mode"] == mode):
        cells = [r["method"], str(r["size"]), *(_fmt(r["post"][c]) for c in METRIC_COLUMNS)]
        if sequential:
            cells.append(_fmt(r["at_edit"]["reliability_em"]))
        cells += [_ppl(r), f"{r['latency_s']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    broken = [f"{r['method']} x{r['size']}: {r['nonfinite']}/{r.get('n_sequences', r['n_updates'])}"
              for r in report["rows"] if r["mode"] == mode and r.get("nonfinite")]
    if broken:
        lines.append("\nNon-finite (NaN/inf) edited weights in " + ", ".join(broken)
                     + (" updates." if mode == "batch" else " sequences."))
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    ds = report.get("dataset", {})
    title = f"# {ds.get('name', 'eval')}: {report['rows'][0]['n_edits'] if report['rows'] else 0} edits"
    modes = [m for m in ("batch", "sequential") if any(r["mode"] == m for r in report["rows"])]
    parts = [title, "Greedy exact match (em), then teacher-forced token accuracy (tf). Locality after an edit is "
             "agreement with the pristine model; pre-edit locality is its accuracy on the true answers."]
    for mode in modes:
        parts += [f"## {MODE_TITLE[mode]}", markdown_table(report, mode)]
    return "\n\n".join(parts) + "\n"


def write_run(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, table.md, one `<mode>.png` per mode and `retention.png`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.json", "table": out / "table.md"}
    paths["report"].write_text(json.dumps(json_safe(report), indent=1, default=str, allow_nan=False))
    paths["table"].write_text(markdown_report(report))
    for mode in ("batch", "sequential"):
        rows = [r for r in report["rows"] if r["mode"] == mode]
        if rows:
            paths[f"plot_{mode}"] = plot_mode(rows, MODE_TITLE[mode], out / f"{mode}.png")
        if mode == "sequential" and any(len(r["retention"]) > 1 for r in rows):
            paths["plot_retention"] = plot_retention(rows, out / "retention.png")
    return paths
