"""Edit methods share one interface: records in, weight deltas out. Nothing here writes weights.

`MendMethod` runs a trained editor and returns the edit memory of the edited layers (the buffers
of `mend.aggregation.attach_memory`); the FT baselines live in `mend.baselines` and return weight
deltas. `edited_weights` turns either into the override dict that `torch.func.functional_call`
(and the metrics) take.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from mend.aggregation import KeyValues, attach_memory
from mend.batching import encode
from mend.capture import edit_factors
from mend.editor import MendEditor
from mend.records import EditRecord

Deltas = dict[str, torch.Tensor]  # param_name -> ΔW in the weight's own layout, or memory buffer name -> its contents


class EditMethod(Protocol):
    name: str

    def deltas(self, model, tokenizer, records: list[EditRecord], weights: dict[str, torch.Tensor] | None = None) -> Deltas:
        """One combined update that makes the model give each record's `target_new`. `weights`
        (optional) overrides named parameters: the edit is computed on the already-edited model
        `functional_call(model, weights)`, as sequential editing needs; the model is never written."""


def edited_weights(model, deltas: Deltas, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{param_name: W + ΔW}, on top of `weights` (earlier edits) when given; a memory buffer's
    entry replaces the buffer. The model itself is unchanged."""
    params = {**dict(model.named_parameters()), **(weights or {})}
    buffers = dict(model.named_buffers())
    unknown = set(deltas) - set(params) - set(buffers)
    if unknown:
        raise KeyError(f"deltas for parameters the model does not have: {sorted(unknown)}")
    return {**(weights or {}), **{name: params[name] + d.to(params[name].dtype) if name in params else d for name, d in deltas.items()}}


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    """No NaN or inf in any tensor: an edit that breaks this must not be kept. Tested on each tensor's
    sum (NaN and inf carry through it; ~13x faster than testing every element), so values whose sum
    overflows count as non-finite too."""
    return all(bool(torch.isfinite(w.sum())) for w in weights.values())


class MendMethod:
    name = "MEND"

    def __init__(self, editor: MendEditor):
        self.editor = editor

    @torch.no_grad()
    def deltas(self, model, tokenizer, records: list[EditRecord], weights: dict[str, torch.Tensor] | None = None) -> Deltas:
        """The edit memory of `records` together (`mend.aggregation`): per edited layer P, the keys,
        own shares and values of their kept rows, as overrides of the layer's memory buffers. The
        memory holds these records alone: earlier edits in `weights` only shape the captured gradients."""
        batch, factors = self._factors(model, tokenizer, records, weights)
        attach_memory(model, self.editor.targets, self.editor.cfg.gates(self.editor.targets))
        return {k: v.detach() for k, v in self.editor.memory(factors, batch.attention_mask.sum(1).tolist()).items()}

    def _factors(self, model, tokenizer, records: list[EditRecord], weights=None):
        """(batch, captured (u, δ) per target) for the records' targets; the editor in eval mode."""
        if not records:
            raise ValueError("no edits given")
        device = next(model.parameters()).device
        batch = encode(tokenizer, [r.prompt for r in records], [r.target_new for r in records]).to(device)
        self.editor.eval()
        return batch, edit_factors(model, self.editor.targets, batch, weights)

    @torch.no_grad()
    def per_edit_key_values(self, model, tokenizer, records: list[EditRecord],
                            weights: dict[str, torch.Tensor] | None = None) -> list[KeyValues]:
        """For each record, {param_name: (keys (k, fan_in), values (k, fan_out))}, its k tokens' rows.

        The editor edits token rows independently, so one batch of records (one forward/backward
        pass) splits exactly into each edit's rows: every edit can be added to, or removed from, a
        least-squares update on its own. `weights` overrides parameters (the service passes the
        pristine target weights, so an edit never depends on the edits already applied).
        """
        batch, factors = self._factors(model, tokenizer, records, weights)
        rows = batch.attention_mask.sum(1).tolist()  # factors are flattened over each record's tokens
        split = {name: (u.split(rows), d.split(rows)) for name, (u, d) in self.editor.key_values(factors).items()}
        return [{name: (u[i].contiguous(), d[i].contiguous()) for name, (u, d) in split.items()} for i in range(len(records))]


def timed_deltas(method: EditMethod, model, tokenizer, records: list[EditRecord],
                 weights: dict[str, torch.Tensor] | None = None) -> tuple[Deltas, float]:
    """(deltas, seconds), synchronising CUDA so the time is the real one. `weights`: the current
    edited weights to edit on top of (only passed on when given, so methods without it still work)."""
    start = time.perf_counter()
    deltas = method.deltas(model, tokenizer, records) if weights is None else method.deltas(model, tokenizer, records, weights=weights)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return deltas, time.perf_counter() - start
