"""Run one edit method over records and report the shared metrics, in two modes.

- **batch**: `size` edits make one combined update of the pristine model, measured before the next
  chunk starts again from the pristine weights (size 1: single edits).
- **sequential**: `size` edits are applied one after another, then every edit of the sequence is
  measured again (locality against the pristine model's predictions). MEND goes through the
  editing service itself (`EditService.apply`, one edit per call, on a scratch journal), so these
  are the server's numbers; the baselines compute each edit on the weights the earlier ones left.
  Each sequence starts from the pristine model; records that do not fill a whole sequence are left
  out. `retention` follows the reliability of the sequence's first edits as more are added.

Batch mode and the baselines never write the model (edited weights are override dicts,
`mend.editing.edited_weights`); the service writes it and is rolled back to the pristine weights
(bit for bit) after each sequence.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from mend.editing import EditMethod, MendMethod, all_finite, edited_weights, timed_deltas
from mend.journal import EditJournal
from mend.metrics import EditMetrics, locality_reference, measure, summarize, target_scores
from mend.records import EditRecord
from mend.service import EditService

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


RETENTION_FIRST = 10  # retention follows the reliability of this many first edits of a sequence (fewer when short)


def retention_points(length: int) -> list[int]:
    """Numbers of edits after which retention is measured: the first edits' count, then 1-2-5 steps."""
    first = min(RETENTION_FIRST, max(1, length // 2))
    steps = [m * 10**e for e in range(7) for m in (1, 2, 5)]
    return sorted({first, length, *(t for t in steps if first < t < length)})


class _Sequence:
    """Apply edits one at a time: MEND through one `EditService` on a scratch journal, any other method
    on override weights. `weights` is None for the service (the model itself is edited). `reset`
    goes back to the pristine weights for the next sequence (bit for bit: RollbackTo(0))."""

    def __init__(self, model, tokenizer, method: EditMethod):
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.weights: dict[str, torch.Tensor] | None = None
        self.service = None
        if isinstance(method, MendMethod):
            self._dir = tempfile.TemporaryDirectory(prefix="mend-sequence-")
            self.service = EditService(model, tokenizer, EditJournal(self._dir.name, "harness"), method.editor.targets,
                                       method.editor)

    def apply(self, record: EditRecord) -> tuple[float, float]:
        """(seconds, greedy reliability right after the edit)."""
        if self.service is not None:
            start = time.perf_counter()
            (edit,) = self.service.apply([record]).edits
            return time.perf_counter() - start, edit.post["reliability_em"]
        deltas, seconds = timed_deltas(self.method, self.model, self.tokenizer, [record], self.weights)
        self.weights = edited_weights(self.model, deltas, self.weights)
        return seconds, target_scores(self.model, self.tokenizer, [record.prompt], [record.target_new], self.weights)[0][1]

    def reset(self) -> None:
        self.weights = None
        if self.service is not None:
            self.service.rollback_to(0)

    def close(self) -> None:
        self.reset()
        if self.service is not None:
            self.service.close()
            self._dir.cleanup()


def evaluate_sequential(model, tokenizer, method: EditMethod, records: list[EditRecord], length: int,
                        probe: Probe | None = None, probe_sequences: int = 0) -> dict:
    """Sequential mode: `len(records) // length` sequences of `length` edits. Besides the batch-mode
    fields, "at_edit" holds the mean reliability of each edit right after it was made, and
    "retention" the mean reliability of each sequence's first edits after t edits, [(t, value)]."""
    n_seq = len(records) // length
    if n_seq == 0:
        raise ValueError(f"{len(records)} records cannot fill one sequence of {length} edits")
    per_edit: list[EditMetrics] = []
    latencies, probed, at_edit, nonfinite = [], [], [], 0
    points = retention_points(length)
    retained: dict[int, list[float]] = {t: [] for t in points}
    bar = tqdm(total=n_seq * length, desc=f"{method.name} sequential x{length}", unit="edit", mininterval=2, leave=False)
    run = _Sequence(model, tokenizer, method)
    try:
        for s in range(n_seq):
            sequence = records[s * length : (s + 1) * length]
            first = sequence[: points[0]]
            reference = locality_reference(model, tokenizer, sequence)  # the pristine model's predictions
            for t, r in enumerate(sequence, 1):
                seconds, reliable = run.apply(r)
                latencies.append(seconds)
                at_edit.append(reliable)
                if t in retained:
                    scores = target_scores(model, tokenizer, [x.prompt for x in first], [x.target_new for x in first], run.weights)
                    retained[t].append(statistics.mean(x[1] for x in scores))
                bar.update()
            nonfinite += not all_finite(run.weights or dict(model.named_parameters()))
            per_edit += measure(model, tokenizer, sequence, run.weights, reference)
            if probe is not None and s < probe_sequences:
                probed.append(probe(run.weights))
            run.reset()
    finally:
        run.close()
    bar.close()
    row = _row("sequential", method, length, per_edit, latencies, probed, nonfinite)
    row["n_sequences"] = n_seq
    row["at_edit"] = {"reliability_em": statistics.mean(at_edit)}
    row["retention"] = [[t, statistics.mean(v)] for t, v in retained.items()]
    return row


def pre_edit_metrics(model, tokenizer, records: list[EditRecord]) -> dict[str, float]:
    """The base model's own values: new targets before any edit, locality answers' accuracy."""
    return summarize(measure(model, tokenizer, records))
