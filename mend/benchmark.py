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
