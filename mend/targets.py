"""Resolve which weight matrices an editor edits, once, into small records.

Defaults are a data table keyed by `config.model_type`: the MLP projections of the last blocks.
GPT-2-style `Conv1D` stores its weight as (fan_in, fan_out) and `nn.Linear` as (fan_out, fan_in);
`EditTarget.fan_in_fan_out` is the one flag that records which, and `to_weight_layout` the one
place that acts on it. Editors always compute deltas as (fan_in, fan_out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mend.errors import TargetResolutionError

# model_type -> (block name with {i}, MLP weight modules inside a block)
DEFAULT_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2": ("transformer.h.{i}", ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neo": ("transformer.h.{i}", ("mlp.c_fc", "mlp.c_proj")),
    "gptj": ("transformer.h.{i}", ("mlp.fc_in", "mlp.fc_out")),
    "llama": ("model.layers.{i}", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "qwen2": ("model.layers.{i}", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "mistral": ("model.layers.{i}", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}


@dataclass(frozen=True)
class EditTarget:
    name: str  # module name, e.g. "transformer.h.3.mlp.c_fc"
    fan_in: int
    fan_out: int
    fan_in_fan_out: bool  # True for Conv1D: weight is (fan_in, fan_out)

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def block(self) -> str:
        """The module's block: its name up to its last part that is a number ("transformer.h.3.mlp.c_fc"
        -> "transformer.h.3", "model.layers.27.mlp.down_proj" -> "model.layers.27"); the whole name
        when no part is."""
        parts = self.name.split(".")
        last = max((i for i, part in enumerate(parts) if part.isdigit()), default=len(parts) - 1)
        return ".".join(parts[: last + 1])

    @property
    def shape_key(self) -> str:
        """Targets with the same key share one editor network."""
        return f"{self.fan_in}x{self.fan_out}"

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """(fan_in, fan_out) delta -> the layout of this module's weight."""
        return delta if self.fan_in_fan_out else delta.T

    def to_dict(self) -> dict:
        return {"name": self.name, "fan_in": self.fan_in, "fan_out": self.fan_out, "fan_in_fan_out": self.fan_in_fan_out}


def _as_target(name: str, module: nn.Module) -> EditTarget:
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape
        return EditTarget(name, fan_in, fan_out, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        fan_out, fan_in = module.weight.shape
        return EditTarget(name, fan_in, fan_out, fan_in_fan_out=False)
    raise TargetResolutionError(f"{name} is a {type(module).__name__}; only Linear and GPT-2 Conv1D layers can be edited")


def default_target_names(model: nn.Module, n_last_blocks: int = 3) -> list[str]:
    model_type = model.config.model_type
    if model_type not in DEFAULT_TARGETS:
        raise TargetResolutionError(
            f"no default edit targets for model_type {model_type!r} (known: {sorted(DEFAULT_TARGETS)}); "
            "pass target patterns such as 'model.layers.(10|11).mlp.down_proj'"
        )
    block, mlp = DEFAULT_TARGETS[model_type]
    n_layers = model.config.num_hidden_layers
    if not 1 <= n_last_blocks <= n_layers:
        raise TargetResolutionError(f"n_last_blocks={n_last_blocks} but the model has {n_layers} blocks")
    return [f"{block.format(i=i)}.{m}" for i in range(n_layers - n_last_blocks, n_layers) for m in mlp]


def resolve_targets(model: nn.Module, patterns: list[str] | None = None, n_last_blocks: int = 3) -> list[EditTarget]:
    """Edit targets in model order. `patterns` are regular expressions matched against whole
    module names; each must match at least one Linear/Conv1D module. Without patterns, the
    per-`model_type` default: the MLP weights of the last `n_last_blocks` blocks."""
    modules = dict(model.named_modules())
    if patterns:
        names = []
        for pattern in patterns:
            hits = [n for n, m in modules.items() if re.fullmatch(pattern, n) and isinstance(m, (nn.Linear, Conv1D))]
            if not hits:
                examples = [n for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D))][-6:]
                raise TargetResolutionError(
                    f"edit target pattern {pattern!r} matches no Linear/Conv1D module; names look like {examples}"
                )
            names.extend(h for h in hits if h not in names)
        order = {n: i for i, n in enumerate(modules)}
        names.sort(key=order.__getitem__)
    else:
        names = default_target_names(model, n_last_blocks)
    missing = [n for n in names if n not in modules]
    if missing:
        raise TargetResolutionError(f"edit target(s) {missing} not found in the {model.config.model_type} model")
    return [_as_target(n, modules[n]) for n in names]
