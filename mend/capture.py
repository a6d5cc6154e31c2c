"""Capture each target layer's input `u` and output gradient `δ` for an edit's loss.

For a linear layer y = W u, the gradient of the loss w.r.t. W is Σ_tokens u δᵀ (δ = ∂loss/∂y):
the rank-1 factors MEND's editor transforms. Hooks live only inside `capture` and are always
removed; captured tensors are returned in a dict, never stored on the model.
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
    delta: torch.Tensor | None = None  # (B, T, fan_out) gradient of the loss w.r.t. the layer output


@contextmanager
def capture(model: torch.nn.Module, targets: list[EditTarget]):
    """Yield {param_name: Factors}, filled by the forward pass (u) and the backward pass (δ)."""
    store = {t.param_name: Factors() for t in targets}
    handles = []

    def hook_for(key: str):
        def forward_hook(module, inputs, output):
            store[key].u = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: setattr(store[key], "delta", grad.detach()))

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
    batch with others. Gradients are taken w.r.t. copies of the target weights; the model's own
    parameters are never touched. `weights` overrides named parameters (the current edited
    weights, for an edit on top of earlier ones). The LM head runs at the target positions only.
    """
    weights = weights or {}
    grad_weights = {t.param_name: (weights[t.param_name] if t.param_name in weights else model.get_parameter(t.param_name))
                    .detach().requires_grad_(True) for t in targets}
    with torch.enable_grad(), capture(model, targets) as store:
        loss = target_nll(logits(model, batch, {**weights, **grad_weights}, at=batch.target_mask), batch).sum()
        torch.autograd.grad(loss, list(grad_weights.values()))
    keep = batch.attention_mask.bool()
    out = {}
    for t in targets:
        f = store[t.param_name]
        if f.u is None or f.delta is None:
            raise RuntimeError(f"no input or gradient captured for {t.name}: is it on the path to the output?")
        out[t.param_name] = (f.u[keep].float(), f.delta[keep].float())
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
