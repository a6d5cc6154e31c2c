"""MEND editor networks: map gradient factors (u, δ) to edited factors (ũ, δ̃).

One network per distinct weight shape, shared by every target layer of that shape, with a
per-layer scale and shift of its hidden units. Each network is a stack of residual low-rank MLP
blocks on [u; δ] whose output projections start at zero, so an untrained editor is the identity.
u and δ are normalised per layer with running statistics (δ is ~1e-4 in scale and varies by
layer; without normalisation nothing trains). The weight update of a layer is

    ΔW = -α_l Σ_tokens ũ δ̃ᵀ        (fan_in, fan_out), α_l a learned per-layer step.

The editor only computes deltas; it never writes weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mend.errors import ConfigError
from mend.targets import EditTarget


@dataclass(frozen=True)
class EditorConfig:
    rank: int = 256  # hidden width of each residual block (low rank: [u; δ] is fan_in + fan_out wide)
    n_blocks: int = 2
    step_init: float = 1e-3  # initial α_l; the paper's 1e-4 edits nothing at step 0 on a 3.5M model
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.rank < 1 or self.n_blocks < 1:
            raise ConfigError(f"editor rank ({self.rank}) and n_blocks ({self.n_blocks}) must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


class RunningNorm(nn.Module):
    """Per-feature running mean/variance (Welford, merged batch by batch); updated only in training."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:  # x: (N, dim)
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        diff = batch_mean - self.mean
        self.mean += diff * n / total
        self.m2 += batch_m2 + diff**2 * self.count * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            raise RuntimeError("normalisation statistics are empty: meta-train the editor (or load a trained checkpoint) first")
        std = (self.m2 / (self.count - 1)).sqrt()
        return (x - self.mean) / (std + self.eps)


class ShapeEditor(nn.Module):
    """Editor network for every target of one (fan_in, fan_out) shape."""

    def __init__(self, fan_in: int, fan_out: int, n_layers: int, cfg: EditorConfig):
        super().__init__()
        dim = fan_in + fan_out
        self.fan_in = fan_in
        self.down = nn.ModuleList(nn.Linear(dim, cfg.rank) for _ in range(cfg.n_blocks))
        self.up = nn.ModuleList(nn.Linear(cfg.rank, dim) for _ in range(cfg.n_blocks))
        for up in self.up:  # identity at initialisation
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.scale = nn.Parameter(torch.ones(n_layers, cfg.n_blocks, cfg.rank))
        self.shift = nn.Parameter(torch.zeros(n_layers, cfg.n_blocks, cfg.rank))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, delta], -1)  # (N, fan_in + fan_out)
        for b, (down, up) in enumerate(zip(self.down, self.up)):
            h = down(x) * self.scale[layer, b] + self.shift[layer, b]  # (N, rank)
            x = x + up(torch.relu(h))
        return x[:, : self.fan_in], x[:, self.fan_in :]


class MendEditor(nn.Module):
    def __init__(self, targets: list[EditTarget], cfg: EditorConfig = EditorConfig()):
        super().__init__()
        if not targets:
            raise ConfigError("an editor needs at least one edit target")
        self.cfg = cfg
        self.targets = list(targets)
        shapes: dict[str, list[EditTarget]] = {}
        for t in targets:
            shapes.setdefault(t.shape_key, []).append(t)
        # the index of each target among the targets of its shape selects its scale/shift row
        self.layer_index = {t.param_name: group.index(t) for group in shapes.values() for t in group}
        self.nets = nn.ModuleDict({
            key: ShapeEditor(group[0].fan_in, group[0].fan_out, len(group), cfg) for key, group in shapes.items()
        })
        self.u_norms = nn.ModuleList(RunningNorm(t.fan_in, cfg.norm_eps) for t in targets)
        self.delta_norms = nn.ModuleList(RunningNorm(t.fan_out, cfg.norm_eps) for t in targets)
        self.steps = nn.Parameter(torch.full((len(targets),), cfg.step_init))

    def low_rank(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{param_name: (u (N, fan_in), δ (N, fan_out))} -> {param_name: (a, b)} with ΔW = aᵀ b in the
        (fan_in, fan_out) layout: a = -α_l ũ (N, fan_in), b = δ̃ (N, fan_out).

        In eval mode each token row is edited independently, so the factors of a batch split by
        rows into the factors of each edit: the service stores them per edit, 100x smaller than ΔW.
        """
        out = {}
        for i, t in enumerate(self.targets):
            u, delta = factors[t.param_name]
            if self.training:
                self.u_norms[i].update(u)
                self.delta_norms[i].update(delta)
            u_t, delta_t = self.nets[t.shape_key](self.u_norms[i](u), self.delta_norms[i](delta), self.layer_index[t.param_name])
            out[t.param_name] = (-self.steps[i] * u_t, delta_t)
        return out

    def forward(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{param_name: (u (N, fan_in), δ (N, fan_out))} -> {param_name: ΔW in the weight's layout}.

        Every token of every edit in `factors` contributes to one combined update per layer.
        """
        targets = {t.param_name: t for t in self.targets}
        return {name: targets[name].to_weight_layout(a.T @ b) for name, (a, b) in self.low_rank(factors).items()}
