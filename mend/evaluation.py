"""Run edit methods over records and report the shared metrics, side by side.

Every method edits the same pristine model with the same records: `batch_size` edits at a time
make one combined update, measured before the next chunk starts again from the pristine weights.
"""

from __future__ import annotations

import statistics

from tqdm import tqdm

from mend.editing import EditMethod, edited_weights, timed_deltas
from mend.metrics import EditMetrics, locality_reference, measure, summarize
from mend.records import EditRecord


def evaluate_method(model, tokenizer, method: EditMethod, records: list[EditRecord], batch_size: int = 1) -> dict:
    """{"post": mean metrics after editing, "latency_s": median seconds per update, "per_edit": [...]}"""
    per_edit: list[EditMetrics] = []
    latencies = []
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    for chunk in tqdm(chunks, desc=f"{method.name} x{batch_size}", unit="update", mininterval=5, leave=False):
        reference = locality_reference(model, tokenizer, chunk)
        deltas, seconds = timed_deltas(method, model, tokenizer, chunk)
        latencies.append(seconds)
        per_edit += measure(model, tokenizer, chunk, edited_weights(model, deltas), reference)
    return {
        "method": method.name,
        "batch_size": batch_size,
        "n_edits": len(records),
        "post": summarize(per_edit),
        "latency_s": statistics.median(latencies),
        "per_edit": [m.as_dict() for m in per_edit],
    }


def pre_edit_metrics(model, tokenizer, records: list[EditRecord]) -> dict[str, float]:
    """The base model's own values: new targets before any edit, locality answers' accuracy."""
    return summarize(measure(model, tokenizer, records))


METRIC_COLUMNS = ["reliability_em", "generality_em", "locality_em", "reliability_tf", "generality_tf", "locality_tf"]


def markdown_table(rows: list[dict], pre: dict[str, float] | None = None) -> str:
    """One row per (method, batch size): greedy exact match first, then teacher-forced."""
    head = "| method | edits/update | " + " | ".join(c.replace("_", " ") for c in METRIC_COLUMNS) + " | latency s |"
    lines = [head, "|" + "---|" * (len(METRIC_COLUMNS) + 3)]
    if pre:
        lines.append("| pre-edit | - | " + " | ".join(f"{pre[c]:.3f}" for c in METRIC_COLUMNS) + " | - |")
    for r in rows:
        cells = " | ".join(f"{r['post'][c]:.3f}" for c in METRIC_COLUMNS)
        lines.append(f"| {r['method']} | {r['batch_size']} | {cells} | {r['latency_s']:.4f} |")
    return "\n".join(lines)
