"""Latency of one edit per method next to one forward+backward pass of the base model.

A benchmark, not a test: it prints numbers. Each figure is the median over `repeats` runs, each
on a different record, after one warm-up run.
"""

from __future__ import annotations

import statistics
import time

import torch

from mend.batching import encode, logits, target_nll
from mend.editing import EditMethod, timed_deltas
from mend.records import EditRecord


def forward_backward_seconds(model, tokenizer, record: EditRecord) -> float:
    """One forward and backward pass of the whole base model on the edit example."""
    device = next(model.parameters()).device
    batch = encode(tokenizer, [record.prompt], [record.target_new]).to(device)
    params = dict(model.named_parameters())
    weights = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    start = time.perf_counter()
    with torch.enable_grad():
        loss = target_nll(logits(model, batch, weights), batch).sum()
        torch.autograd.grad(loss, list(weights.values()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_benchmark(model, tokenizer, methods: list[EditMethod], records: list[EditRecord], repeats: int = 20) -> dict:
    if len(records) < repeats + 1:
        raise ValueError(f"need {repeats + 1} records for {repeats} repeats, got {len(records)}")
    warm, timed = records[0], records[1 : repeats + 1]
    forward_backward_seconds(model, tokenizer, warm)
    result = {"forward_backward_s": statistics.median(forward_backward_seconds(model, tokenizer, r) for r in timed)}
    for method in methods:
        timed_deltas(method, model, tokenizer, [warm])
        result[f"{method.name}_s"] = statistics.median(timed_deltas(method, model, tokenizer, [r])[1] for r in timed)
        result[f"{method.name}_over_forward_backward"] = result[f"{method.name}_s"] / result["forward_backward_s"]
    return result


def service_benchmark(open_service, forward_backward, timed: list[EditRecord], active: list[EditRecord],
                      chunk: int = 100) -> dict:
    """The served edit with 0 and with len(active) active edits. Two services run side by side, one
    empty and one holding `active` (loaded by ApplyEdits of `chunk`: `apply_chunk_s`), and every
    measurement alternates between them record by record, so that both see the same machine speed
    (on shared CPUs it drifts by tens of percent over minutes). Per label "0" and str(len(active)):
    `bare_edit_s` (keys and values on the base weights, the change of every layer's memory and its
    new buffers, as ApplyEdit makes them), `apply_edit_s` (a whole ApplyEdit: metrics, journal and
    write; each is rolled back untimed), `apply_edit_no_metrics_s` (the same without metrics, as for
    bulk loads). `forward_backward(record) -> seconds` (on the base model) is timed right before each
    bare edit: `forward_backward_s` and `bare_over_forward_backward`, the median of the per-edit
    ratios. `apply_ratio`: the median over records of ApplyEdit with len(active) / with 0.
    `replay_s`: reopening the journal of len(active) edits. `open_service(name)` opens the service on
    the scratch journal `name` ("empty" or "loaded"); `timed` and `active` are distinct facts."""
    n = str(len(active))
    empty, loaded = open_service("empty"), open_service("loaded")

    def bare(service, r: EditRecord) -> float:
        """Seconds of one edit's keys, values and change of the memory, as ApplyEdit makes it (then
        written and taken back, untimed: the next edit is again proposed on the committed state)."""
        state, seq = service.state, service.journal.next_seq()
        with state.lock.write():
            start = time.perf_counter()
            (kv,) = service.method.per_edit_key_values(service.model, service.tokenizer, [r], state.pristine)
            change = state.propose([], {seq: kv})
            weights = state.weights(change)
            elapsed = time.perf_counter() - start
            state.commit(change, weights)
            state.commit(state.propose([seq], {}))
        return elapsed

    def applied(service, r: EditRecord, metrics: bool) -> float:
        start = time.perf_counter()
        (edit,) = service.apply([r], metrics=metrics).edits
        elapsed = time.perf_counter() - start
        service.rollback_edit(edit.edit_id)
        return elapsed

    result = {}
    try:
        start = time.perf_counter()
        for i in range(0, len(active), chunk):
            loaded.apply(active[i : i + chunk])
        result["apply_chunk_s"] = (time.perf_counter() - start) / -(-len(active) // chunk)
        for r in timed[:2]:  # warm-up
            for service in (empty, loaded):
                bare(service, r)
                applied(service, r, True)
        beside: dict[str, list[tuple[float, float]]] = {"0": [], n: []}  # (forward+backward, bare edit) seconds
        for r in timed:
            for label, service in (("0", empty), (n, loaded)):
                beside[label].append((forward_backward(r), bare(service, r)))
        for label, timings in beside.items():
            result[f"bare_edit_s@{label}"] = statistics.median(e for _, e in timings)
            result[f"forward_backward_s@{label}"] = statistics.median(f for f, _ in timings)
            result[f"bare_over_forward_backward@{label}"] = statistics.median(e / f for f, e in timings)
        for metrics, key in ((True, "apply_edit_s"), (False, "apply_edit_no_metrics_s")):
            pairs = [(applied(empty, r, metrics), applied(loaded, r, metrics)) for r in timed]
            result[f"{key}@0"] = statistics.median(a for a, _ in pairs)
            result[f"{key}@{n}"] = statistics.median(b for _, b in pairs)
            if metrics:
                result["apply_ratio"] = statistics.median(b / a for a, b in pairs)
    finally:
        empty.close()
        loaded.close()
    start = time.perf_counter()
    reopened = open_service("loaded")
    result["replay_s"] = time.perf_counter() - start
    result["replayed_active"] = reopened.n_active
    reopened.close()
    return result
