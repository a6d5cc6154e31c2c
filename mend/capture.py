"""Capture each target layer's input `u` and output gradient `δ` for an edit's loss.

For a linear layer y = W u, the gradient of the loss w.r.t. W is Σ_tokens u δᵀ (δ = ∂loss/∂y):
the rank-1 factors MEND's editor transforms. δ is taken w.r.t. the layers' outputs, so that product
(a (fan_in, fan_out) matrix per layer, most of a small model's backward) is never formed. Hooks
live only inside `capture` and are always removed; captured tensors are returned in a dict, never
stored on the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mend.batching import TargetBatch, logits, target_nll
from mend.targets import EditTarget


@dataclass
class Factors:
    u: torch.Tensor | None = None  # (B, T, fan_in) layer input
    output: torch.Tensor | None = None  # (B, T, fan_out) layer output, in the graph (grad mode only)


@contextmanager
def capture(model: torch.nn.Module, targets: list[EditTarget]):
    """Yield {param_name: Factors}, filled by the forward pass. In grad mode each target's output is
    kept to take gradients w.r.t. it; an output that nothing below requires grad for (the lowest
    target of a frozen model) becomes a leaf that does, so every target above it is in the graph."""
    store = {t.param_name: Factors() for t in targets}
    handles = []

    def hook_for(key: str):
        def forward_hook(module, inputs, output):
            store[key].u = inputs[0].detach()
            if torch.is_grad_enabled():
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                store[key].output = output
                return output

        return forward_hook

    try:
        for t in targets:
            handles.append(model.get_submodule(t.name).register_forward_hook(hook_for(t.param_name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def edit_factors(model, targets: list[EditTarget], batch: TargetBatch,
                 weights: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Token-level (u, δ) per target for the NLL of the batch's targets, flattened over non-pad
    tokens: {param_name: (u (N, fan_in), δ (N, fan_out))}.

    The loss sums each edit's mean target NLL, so δ for one edit does not shrink when it shares a
    batch with others. The model's parameters are never touched. `weights` overrides named
    parameters or buffers (the current edited weights, for an edit on top of earlier ones; the empty
    memories of the base model). The LM head runs at the target positions only.
    """
    with torch.enable_grad(), capture(model, targets) as store:
        loss = target_nll(logits(model, batch, weights or None, at=batch.target_mask), batch).sum()
        missing = [t.name for t in targets if store[t.param_name].output is None]
        if missing:
            raise RuntimeError(f"no input captured for {missing}: are they on the path to the output?")
        deltas = torch.autograd.grad(loss, [store[t.param_name].output for t in targets], allow_unused=True)
    keep = batch.attention_mask.bool()
    out = {}
    for t, delta in zip(targets, deltas):
        if delta is None:
            raise RuntimeError(f"no gradient reaches {t.name}: is it on the path to the output?")
        out[t.param_name] = (store[t.param_name].u[keep].float(), delta[keep].float())
    return out


@torch.no_grad()
def layer_inputs(model, targets: list[EditTarget], batch: TargetBatch, at_predictions: bool = False) -> dict[str, torch.Tensor]:
    """{param_name: (N, fan_in)}: each target layer's input at every non-pad token of `batch`, or only
    where the next token is a target token (`at_predictions`: the prompt's last token and the answer's)."""
    with capture(model, targets) as store:
        logits(model, batch)
    keep = batch.attention_mask.bool()
    if at_predictions:
        keep = torch.zeros_like(keep)
        keep[:, :-1] = batch.target_mask
    return {t.param_name: store[t.param_name].u[keep].float() for t in targets}
