"""MEND editor networks: map gradient factors (u, δ) to edited factors (ũ, δ̃).

One network per distinct weight shape, shared by every target layer of that shape, with a
per-layer scale and shift of its hidden units. Each network is a stack of residual low-rank MLP
blocks on [u; δ] whose output projections start at zero, so an untrained editor is the identity.
u and δ are normalised per layer with running statistics (δ is ~1e-4 in scale and varies by
layer; without normalisation nothing trains). MEND's own update of a layer would be the sum

    ΔW = Σ_tokens a_jᵀ b_j,   a_j = -α_l ũ_j,  b_j = δ̃_j        (fan_in, fan_out), α_l a learned step.

Summing breaks down for many edits, so each token instead becomes a key u_j (its layer input) and
the change its own rank-1 term makes to that key's output, d_j = (u_j · a_j) b_j (MALMEN), and the
update is the least-squares solution over all keys (`mend.aggregation`) with a learned ridge λ_l, a
learned weight μ_l of the preserved-knowledge covariance C₀ of the layer's keys on unedited text.

The editor only computes deltas; it never writes weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mend.aggregation import KeyValues, alone_shares, crowding, inverse_system, memory_names, no_pending, own_shares, select_rows, solve
from mend.errors import ConfigError
from mend.targets import EditTarget


@dataclass(frozen=True)
class EditorConfig:
    rank: int = 256  # hidden width of each residual block (low rank: [u; δ] is fan_in + fan_out wide)
    n_blocks: int = 2
    step_init: float = 1e-3  # initial α_l; the paper's 1e-4 edits nothing at step 0 on a 3.5M model
    ridge_init: float = 1.0  # initial λ_l of the least-squares combination
    preserve_init: float = 300.0  # initial μ_l, the weight of the preserved keys' covariance C₀
    norm_eps: float = 1e-5
    # the served combination (`mend.aggregation`), chosen on val edits of the default model: τ, the
    # share of its own change an edit row must give an input to write there; keep, the share of an
    # edit's largest value norm a token row needs to be kept (0, 0 and compensate 0: the plain least-squares update)
    gate: float = 0.5
    gate_last: float | None = None  # τ of the last edited block's layers (None: `gate`); see `gates`
    keep: float = 0.7
    # γ: with many active edits each row writes (its share alone / its share now)^γ x its value at its own
    # key, giving back part of what crowding by the other rows takes (`mend.aggregation.crowding`);
    # chosen on train and val edits of the default model (1,000 train edits: reliability 0.888 -> 0.917)
    compensate: float = 0.3

    def __post_init__(self) -> None:
        if self.rank < 1 or self.n_blocks < 1:
            raise ConfigError(f"editor rank ({self.rank}) and n_blocks ({self.n_blocks}) must be >= 1")
        if self.ridge_init <= 0 or self.preserve_init < 0:
            raise ConfigError(f"ridge_init ({self.ridge_init}) must be > 0 and preserve_init ({self.preserve_init}) >= 0")
        if self.gate < 0 or (self.gate_last is not None and self.gate_last < 0) or not 0 <= self.keep <= 1 or self.compensate < 0:
            raise ConfigError(f"gate ({self.gate}), gate_last ({self.gate_last}) and compensate ({self.compensate}) must be >= 0 "
                              f"and keep ({self.keep}) in [0, 1]")

    def gates(self, targets) -> dict[str, float]:
        """τ per target module: `gate_last` for the targets of the last edited block (`EditTarget.block`),
        `gate` for the rest. A lower τ there bought generality at less locality than a lower τ
        everywhere (README, profile=facts)."""
        last = targets[-1].block if targets else None
        return {t.name: self.gate_last if self.gate_last is not None and t.block == last else self.gate for t in targets}

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


class KeyCovariance(nn.Module):
    """C₀: the mean outer product of a layer's keys on unedited text, accumulated in float64."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("total", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, keys: torch.Tensor) -> None:  # keys: (N, dim)
        k = keys.double()
        self.total += k.T @ k
        self.count += k.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


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

    def forward(self, u: torch.Tensor, delta: torch.Tensor, layer: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`: the index of the rows' layer among this shape's targets, or one per row (N,)."""
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
        self.index = {t.param_name: i for i, t in enumerate(targets)}
        self.nets = nn.ModuleDict({
            key: ShapeEditor(group[0].fan_in, group[0].fan_out, len(group), cfg) for key, group in shapes.items()
        })
        self.u_norms = nn.ModuleList(RunningNorm(t.fan_in, cfg.norm_eps) for t in targets)
        self.delta_norms = nn.ModuleList(RunningNorm(t.fan_out, cfg.norm_eps) for t in targets)
        self.steps = nn.Parameter(torch.full((len(targets),), cfg.step_init))
        self.log_ridge = nn.Parameter(torch.full((len(targets),), math.log(cfg.ridge_init)))
        self.log_preserve = nn.Parameter(torch.full((len(targets),), math.log(max(cfg.preserve_init, 1e-30))))
        self.preserved = nn.ModuleList(KeyCovariance(t.fan_in) for t in targets)
        self._eigen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # target index -> C₀'s (eigenvectors, eigenvalues)
        self._inverse: dict[int, tuple[tuple[float, float], torch.Tensor]] = {}  # target index -> ((log μ, log λ), A₀⁻¹)
        self.register_load_state_dict_post_hook(lambda module, _: module._forget())

    def low_rank(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], gather=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{param_name: (u (N, fan_in), δ (N, fan_out))} -> {param_name: (a, b)}, MEND's per-token
        rank-1 updates a_jᵀ b_j in the (fan_in, fan_out) layout: a = -α_l ũ, b = δ̃. In eval mode each
        token row is edited independently. In training the normalisation statistics take in the
        rows, all ranks' rows under torchrun (`gather`: `mend.distributed.Shard.gather`).
        The rows of all targets of one shape go through their network together: one product with
        each weight matrix instead of one per layer (a single edit's editor pass 13.8 -> 7.7 ms on CPU)."""
        out = {}
        for key, net in self.nets.items():
            group = [(i, t) for i, t in enumerate(self.targets) if t.shape_key == key]
            us, deltas, layers = [], [], []
            for i, t in group:
                u, delta = factors[t.param_name]
                if self.training:
                    self.u_norms[i].update(u if gather is None else gather(u.detach()))
                    self.delta_norms[i].update(delta if gather is None else gather(delta.detach()))
                us.append(self.u_norms[i](u))
                deltas.append(self.delta_norms[i](delta))
                layers.append(torch.full((u.shape[0],), self.layer_index[t.param_name], device=u.device))
            u_t, delta_t = net(torch.cat(us), torch.cat(deltas), torch.cat(layers))
            sizes = [u.shape[0] for u in us]
            for (i, t), a, b in zip(group, u_t.split(sizes), delta_t.split(sizes)):
                out[t.param_name] = (-self.steps[i] * a, b)
        return {t.param_name: out[t.param_name] for t in self.targets}

    def key_values(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], gather=None) -> KeyValues:
        """{param_name: (keys u (N, fan_in), values d (N, fan_out))}: each token's key and the change of
        the layer's output its own rank-1 update makes there, d_j = (u_j · a_j) b_j. Rows are
        independent in eval mode, so a batch's keys and values split exactly into each edit's."""
        out = {}
        for name, (a, b) in self.low_rank(factors, gather).items():
            u = factors[name][0]
            out[name] = (u, (u * a).sum(-1, keepdim=True) * b)
        return out

    def memory(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: list[int]) -> dict[str, torch.Tensor]:
        """The gated edit memory of one update (`mend.aggregation`): {override name: tensor} of every
        target (H = P Uᵀ, c(u), D over each edit's kept rows, their crowding scales, no corrections);
        `rows`: the number of token rows of each edit, in order. Differentiable in the editor, λ_l and
        μ_l (meta-training with `train.gated`)."""
        out, kv = {}, self.key_values(factors)
        for t in self.targets:
            u, d = kv[t.param_name]
            kept = [select_rows(a, b, self.cfg.keep) for a, b in zip(u.split(rows), d.split(rows))]
            owners = [i for i, (a, _) in enumerate(kept) for _ in range(a.shape[0])]
            u, d = torch.cat([a for a, _ in kept]), torch.cat([b for _, b in kept])
            a0inv = self._base_inverse(t.param_name)
            p = inverse_system(self.base_eigen(t.param_name), u, None if torch.is_grad_enabled() else a0inv)
            own = own_shares(u, p)
            alone = alone_shares(u, owners, a0inv.float()) if self.cfg.compensate else own  # unread with γ = 0
            scale = crowding(alone, own, self.cfg.compensate)
            out.update(zip(memory_names(t.name), ((p @ u.double().T).to(u.dtype), own.to(u.dtype), d, scale.to(u.dtype),
                                                  *no_pending(u.shape[1], u.shape[0], u.device, u.dtype))))
        return out

    def base_eigen(self, param_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, w) with A₀ = μ_l C₀ + λ_l I = Q diag(w) Qᵀ, float64: the normal equation's matrix with no
        edit. C₀'s eigendecomposition is computed once; w stays differentiable in μ_l and λ_l."""
        i = self.index[param_name]
        if i not in self._eigen:
            evals, evecs = torch.linalg.eigh(self.preserved[i].mean)
            self._eigen[i] = (evecs, evals.clamp(min=0))
        q, evals = self._eigen[i]
        return q, self.log_preserve[i].exp().double() * evals + self.log_ridge[i].exp().double()

    def _base_inverse(self, param_name: str) -> torch.Tensor:
        """A₀⁻¹ (n, n) float64 for the current λ_l and μ_l, computed once for them (not differentiable)."""
        i = self.index[param_name]
        key = (float(self.log_preserve[i].detach()), float(self.log_ridge[i].detach()))
        if i not in self._inverse or self._inverse[i][0] != key:
            q, w = self.base_eigen(param_name)
            self._inverse[i] = (key, (q / w.detach()) @ q.T)
        return self._inverse[i][1]

    def base_system(self, param_name: str) -> torch.Tensor:
        """A₀ (fan_in, fan_in) float64."""
        q, w = self.base_eigen(param_name)
        return (q * w) @ q.T

    @torch.no_grad()
    def observe_preserved(self, keys: dict[str, torch.Tensor]) -> None:
        """Add keys of unedited text ({param_name: (N, fan_in)}) to each layer's C₀."""
        for name, k in keys.items():
            self.preserved[self.index[name]].update(k)
        self._forget()

    @torch.no_grad()
    def merge_preserved(self, total) -> None:
        """Replace each C₀'s sums by `total(sums)`: under torchrun, the sums over every rank's keys."""
        for cov in self.preserved:
            cov.total.copy_(total(cov.total))
            cov.count.copy_(total(cov.count))
        self._forget()

    def _forget(self) -> None:
        """Drop what is cached from C₀, λ_l and μ_l (they changed)."""
        self._eigen.clear()
        self._inverse.clear()

    def _apply(self, fn, *args, **kwargs):  # .to(device) and friends: the cached eigendecompositions move too
        self._eigen, self._inverse = {}, {}
        return super()._apply(fn, *args, **kwargs)

    def forward(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], gather=None) -> dict[str, torch.Tensor]:
        """{param_name: (u (N, fan_in), δ (N, fan_out))} -> {param_name: ΔW in the weight's layout}:
        one least-squares update per layer over every token of every edit in `factors`, and under
        torchrun of every rank's edits (`gather` collects all ranks' keys and values)."""
        targets = {t.param_name: t for t in self.targets}
        gather = gather or (lambda rows: rows)
        return {name: targets[name].to_weight_layout(solve(self.base_eigen(name), gather(u), gather(d)).to(u.dtype))
                for name, (u, d) in self.key_values(factors, gather).items()}
