"""Run one edit method over records and report the shared metrics, in two modes.

- **batch**: `size` edits make one combined update of the pristine model, measured before the next
  chunk starts again from the pristine weights (size 1: single edits).
- **sequential**: `size` edits are applied one after another, each computed on the weights the
  earlier ones left, then every edit of the sequence is measured again (locality against the
  pristine model's predictions). Each sequence starts from the pristine model; records that do not
  fill a whole sequence are left out.

Nothing writes the model: edited weights are override dicts (`mend.editing.edited_weights`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from tqdm import tqdm

from mend.editing import EditMethod, all_finite, edited_weights, timed_deltas
from mend.metrics import EditMetrics, locality_reference, measure, summarize, target_scores
from mend.records import EditRecord

Probe = Callable[[dict[str, torch.Tensor] | None], float]  # a number measured on (edited) weights: held-out perplexity


def _row(mode: str, method: EditMethod, size: int, per_edit: list[EditMetrics], latencies: list[float],
         probed: list[float], nonfinite: int) -> dict:
    return {
        "mode": mode,
        "method": method.name,
        "size": size,
        "n_edits": len(per_edit),
        "n_updates": len(latencies),
        "post": summarize(per_edit),
        "latency_s": statistics.median(latencies),  # per update: `size` edits in batch mode, one in sequential
        "perplexity": statistics.mean(probed) if probed else None,
        "nonfinite": nonfinite,  # updates (batch) / sequences (sequential) that left NaN or inf weights
        "per_edit": [m.as_dict() for m in per_edit],
    }


def evaluate_method(model, tokenizer, method: EditMethod, records: list[EditRecord], batch_size: int = 1,
                    probe: Probe | None = None, probe_updates: int = 0) -> dict:
    """Batch mode. {"post": mean metrics, "latency_s": median seconds per update, "per_edit": [...],
    "perplexity": mean of `probe` on the edited weights of the first `probe_updates` updates}."""
    per_edit: list[EditMetrics] = []
    latencies, probed, nonfinite = [], [], 0
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    bar = tqdm(chunks, desc=f"{method.name} batch x{batch_size}", unit="update", mininterval=2, leave=False)
    for i, chunk in enumerate(bar):
        reference = locality_reference(model, tokenizer, chunk)
        deltas, seconds = timed_deltas(method, model, tokenizer, chunk)
        latencies.append(seconds)
        weights = edited_weights(model, deltas)
        nonfinite += not all_finite(weights)
        per_edit += measure(model, tokenizer, chunk, weights, reference)
        if probe is not None and i < probe_updates:
            probed.append(probe(weights))
    return _row("batch", method, batch_size, per_edit, latencies, probed, nonfinite)


def evaluate_sequential(model, tokenizer, method: EditMethod, records: list[EditRecord], length: int,
                        probe: Probe | None = None, probe_sequences: int = 0) -> dict:
    """Sequential mode: `len(records) // length` sequences of `length` edits. Besides the batch-mode
    fields, "at_edit" holds the mean reliability of each edit right after it was made, so
    `post` / `at_edit` is how much of it survives the later edits (retention)."""
    n_seq = len(records) // length
    if n_seq == 0:
        raise ValueError(f"{len(records)} records cannot fill one sequence of {length} edits")
    per_edit: list[EditMetrics] = []
    latencies, probed, at_edit, nonfinite = [], [], [], 0
    bar = tqdm(total=n_seq * length, desc=f"{method.name} sequential x{length}", unit="edit", mininterval=2, leave=False)
    for s in range(n_seq):
        sequence = records[s * length : (s + 1) * length]
        reference = locality_reference(model, tokenizer, sequence)  # the pristine model's predictions
        weights = None
        for r in sequence:
            deltas, seconds = timed_deltas(method, model, tokenizer, [r], weights)
            latencies.append(seconds)
            weights = edited_weights(model, deltas, weights)
            at_edit += target_scores(model, tokenizer, [r.prompt], [r.target_new], weights)
            bar.update()
        nonfinite += not all_finite(weights)
        per_edit += measure(model, tokenizer, sequence, weights, reference)
        if probe is not None and s < probe_sequences:
            probed.append(probe(weights))
    bar.close()
    row = _row("sequential", method, length, per_edit, latencies, probed, nonfinite)
    row["n_sequences"] = n_seq
    row["at_edit"] = {"reliability_tf": statistics.mean(x[0] for x in at_edit),
                      "reliability_em": statistics.mean(x[1] for x in at_edit)}
    return row


def pre_edit_metrics(model, tokenizer, records: list[EditRecord]) -> dict[str, float]:
    """The base model's own values: new targets before any edit, locality answers' accuracy."""
    return summarize(measure(model, tokenizer, records))
