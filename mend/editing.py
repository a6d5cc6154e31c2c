"""Edit methods share one interface: records in, weight deltas out. Nothing here writes weights.

`MendMethod` runs a trained editor; the FT baselines live in `mend.baselines`. `edited_weights`
turns deltas into the override dict that `torch.func.functional_call` (and the metrics) take.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from mend.batching import encode
from mend.capture import edit_factors
from mend.editor import MendEditor
from mend.records import EditRecord

Deltas = dict[str, torch.Tensor]  # param_name -> ΔW in the weight's own layout


class EditMethod(Protocol):
    name: str

    def deltas(self, model, tokenizer, records: list[EditRecord]) -> Deltas:
        """One combined update that makes the model give each record's `target_new`."""


def edited_weights(model, deltas: Deltas) -> dict[str, torch.Tensor]:
    """{param_name: W + ΔW}; the model itself is unchanged."""
    params = dict(model.named_parameters())
    unknown = set(deltas) - set(params)
    if unknown:
        raise KeyError(f"deltas for parameters the model does not have: {sorted(unknown)}")
    return {name: params[name] + d.to(params[name].dtype) for name, d in deltas.items()}


class MendMethod:
    name = "MEND"

    def __init__(self, editor: MendEditor):
        self.editor = editor

    @torch.no_grad()
    def deltas(self, model, tokenizer, records: list[EditRecord]) -> Deltas:
        if not records:
            raise ValueError("no edits given")
        device = next(model.parameters()).device
        batch = encode(tokenizer, [r.prompt for r in records], [r.target_new for r in records]).to(device)
        factors = edit_factors(model, self.editor.targets, batch)
        self.editor.eval()
        return {k: v.detach() for k, v in self.editor(factors).items()}


def timed_deltas(method: EditMethod, model, tokenizer, records: list[EditRecord]) -> tuple[Deltas, float]:
    """(deltas, seconds), synchronising CUDA so the time is the real one."""
    start = time.perf_counter()
    deltas = method.deltas(model, tokenizer, records)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return deltas, time.perf_counter() - start
