"""Combine many edits into one update per layer: least squares (MALMEN) plus a gate.

Per edited layer, every token j of every edit gives a key u_j (the layer's input, fan_in wide) and
a wanted change of the layer's output for that key, d_j (fan_out wide; `MendEditor.key_values`).
Summed rank-1 updates interfere as their number grows; instead the update S of a layer
((fan_in, fan_out) layout) solves

    min_S  Σ_j ‖u_j S − d_j‖²  +  μ_l ‖K₀ S‖² / n₀  +  λ_l ‖S‖²      (K₀: n₀ keys of unedited text)
    S = (UᵀU + A₀)⁻¹ UᵀD,        A₀ = μ_l C₀ + λ_l I,        C₀ = K₀ᵀK₀ / n₀

MALMEN's ridge normal equation plus a preserved-knowledge term: C₀ is the mean outer product of the
layer's keys on unedited text (as in MEMIT and AlphaEdit), so the update leaves the outputs of
ordinary inputs alone. λ_l and μ_l are learned with the editor. Everything is float64: A sums
thousands of keys. `solve` computes S (meta-training; differentiable).

**The gate.** S writes at any input x the sum x S = c(x) D, c(x) = x G, G = (UᵀU + A₀)⁻¹Uᵀ: every
edit row j contributes c_j(x) d_j. At an unrelated input each row's share is a few hundredths of
what it writes at its own key, but N edits' small leaks add up (root-sum-square, ~√N): with 100
edits they changed a third of unrelated answers (`mend sites` measures these shares). An edited
layer therefore lets a row write only where it receives at least τ of its own share:

    y = x W₀ + Σ_j  c_j(x) · [|c_j(x)| ≥ τ c_j(u_j)] · d_j

A paraphrase receives ~0.9 of its edit's share, an unrelated input ~0.05. The threshold is relative
because rows crowd each other out: with a thousand edits a row's own share c_j(u_j) falls to a
fraction of what it is alone. Per edit only its strong rows are kept (value norm ≥ `keep` x the
edit's largest in that layer): the template words every prompt shares carry little of the change
and would only make the rows of different edits compete. With many edits a row's own share falls
below its share with its edit alone; each row's value is scaled by (alone / own share)^γ (`crowding`,
γ = `compensate`). With τ = 0, keep = 0 and γ = 0 this is S exactly.
The layer holds P = (UᵀU + A₀)⁻¹, U, c(u) and D in buffers (`attach_memory`) and computes
c(x) = (x P) Uᵀ itself: then adding an edit changes P and the shares c(u), never a (fan_in, R)
matrix. The base weights are never written.

A served model keeps `LayerMemory` per layer and adds or removes a group of k rows with one rank-k
Woodbury step, O(fan_in² k + fan_in k R) for R active rows, instead of a new O(fan_in³)
factorisation; the rows themselves are appended in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

KeyValues = dict[str, tuple[torch.Tensor, torch.Tensor]]  # param_name -> (keys U (k, fan_in), values D (k, fan_out))


def select_rows(keys: torch.Tensor, values: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One edit's rows of one layer whose value norm is at least `keep` times the largest (keep = 0: all)."""
    if keep <= 0 or values.shape[0] == 0:
        return keys, values
    norms = values.double().norm(dim=1)
    mask = norms >= keep * norms.max()
    return keys[mask], values[mask]


def solve(base: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """S = (UᵀU + A₀)⁻¹ UᵀD in float64 -> (n, m). base = (Q (n, n), w (n,)) with A₀ = Q diag(w) Qᵀ;
    keys (k, n), values (k, m)."""
    q, w = base
    u, d = keys.double(), values.double()
    if u.shape[0] < q.shape[0]:  # the dual form: a (k, k) system instead of an (n, n) one
        a0inv_ut = q @ ((q.T @ u.T) / w[:, None])  # (n, k)
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        return a0inv_ut @ torch.linalg.solve(eye + u @ a0inv_ut, d)
    return torch.linalg.solve((q * w) @ q.T + u.T @ u, u.T @ d)


def inverse_system(base: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, a0inv: torch.Tensor | None = None) -> torch.Tensor:
    """P = (A₀ + UᵀU)⁻¹ in float64 -> (n, n), differentiable; base = (Q, w) with A₀ = Q diag(w) Qᵀ,
    `a0inv` = A₀⁻¹ when already known."""
    q, w = base
    u = keys.double()
    if u.shape[0] < q.shape[0]:
        a0inv = (q / w) @ q.T if a0inv is None else a0inv  # Woodbury: a (k, k) system instead of an (n, n) one
        a0inv_ut = a0inv @ u.T  # (n, k)
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        return a0inv - a0inv_ut @ torch.linalg.solve(eye + u @ a0inv_ut, a0inv_ut.T)
    return torch.linalg.inv((q * w) @ q.T + u.T @ u)


def own_shares(keys: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """c_j(u_j) = u_j P u_jᵀ for each row (R,): what a row writes at its own key, as a share of d_j (> 0)."""
    u = keys.double()
    return ((u @ p) * u).sum(1)


def alone_shares(keys: torch.Tensor, owners, a0inv: torch.Tensor) -> torch.Tensor:
    """Each row's own share with only its own edit's rows active (R,) float64: diag(G M⁻¹) = 1 − diag(M⁻¹)
    per edit, G = Uₑ A₀⁻¹ Uₑᵀ, M = I + G. `owners`: each row's edit (an edit's rows are contiguous);
    `a0inv`: A₀⁻¹ in float32 (precise enough for a scale, and half the bytes to read)."""
    u = keys.detach().to(a0inv.dtype)
    out, start = [], 0
    for _, rows in groupby(owners):  # one product per edit: the same numbers whatever edits come with it
        size = len(list(rows))
        mine = u[start : start + size]
        m = (mine @ (a0inv @ mine.T)).double()  # A₀⁻¹ is symmetric; A₀⁻¹ Uₑᵀ is ~2x faster on CPU than Uₑ A₀⁻¹
        m.diagonal().add_(1)
        out.append(1 - torch.linalg.inv(m).diagonal())  # G M⁻¹ = (M − I) M⁻¹ = I − M⁻¹
        start += size
    return torch.cat(out) if out else keys.new_zeros(0, dtype=torch.float64)


def crowding(alone: torch.Tensor, own: torch.Tensor, compensate: float) -> torch.Tensor:
    """Each row's scale (alone / own)^γ (R,): with many edits a row's own share falls below what it
    is with its edit alone (rows crowd each other out) and the row writes less of its value at its
    own key; γ = `compensate` gives part of that back (0: none, 1: all of it; 1 with a single edit)."""
    if compensate == 0:
        return torch.ones_like(own)
    return (alone / own) ** compensate


@dataclass
class _Rows:
    """Append-only storage of one layer's rows, shared by successive `LayerMemory` versions: rows
    [0, R) are a memory's own, so a memory may append in place only while nothing was appended
    after its R (a sibling proposal copies instead). Appending k rows then costs O(k), not O(R)."""

    keys: torch.Tensor  # (capacity, n) float64
    keys32t: torch.Tensor  # (n, capacity) float32, transposed: what the layer reads (`keys32`)
    values: torch.Tensor  # (capacity, m) float32
    used: int = 0

    def keys32(self, r: int) -> torch.Tensor:
        """Rows [0, r) in float32, (r, n): a view whose transpose Uᵀ is row-major, which makes the
        layer's product (x P) Uᵀ ~20% faster on CPU than with U stored row by row."""
        return self.keys32t[:, :r].T

    @classmethod
    def of(cls, keys: torch.Tensor, keys32: torch.Tensor, values: torch.Tensor, capacity: int) -> "_Rows":
        r, n, m = keys.shape[0], keys.shape[1], values.shape[1]
        # uninitialised: only rows [0, used) are ever read (zero-filling the capacity took as long as the copy)
        out = cls(keys.new_empty(capacity, n, dtype=torch.float64), keys.new_empty(n, capacity, dtype=torch.float32),
                  values.new_empty(capacity, m, dtype=torch.float32), r)
        out.keys[:r], out.keys32t[:, :r], out.values[:r] = keys, keys32.T, values
        return out

    def appended(self, r: int, keys: torch.Tensor, values: torch.Tensor) -> "_Rows":
        """Storage whose rows [0, r) are these and [r, r + k) the given ones."""
        k = keys.shape[0]
        rows = self
        if self.used != r or r + k > self.keys.shape[0]:
            rows = _Rows.of(self.keys[:r], self.keys32(r), self.values[:r], max(64, 2 * (r + k)))
        rows.keys[r : r + k], rows.keys32t[:, r : r + k], rows.values[r : r + k] = keys.double(), keys.float().T, values.float()
        rows.used = r + k
        return rows


PENDING = 64  # columns of Woodbury corrections a memory may hold before folding them into its dense P


@dataclass(frozen=True)
class LayerMemory:
    """The edit memory of one layer for a set of edit rows: P = (A₀ + UᵀU)⁻¹, each row's own share
    c_j(u_j), and the rows' keys U and values D (in `rows`, in the order they came); `owners` names
    each row's edit.

    P is held as a dense part and the Woodbury corrections since it was last rewritten,
    P = F − A Bᵀ (A, B: (fan_in, r), r ≤ `PENDING`): an edit appends k columns instead of rewriting
    the (fan_in, fan_in) matrix, and the layer computes x P as x F − (x A) Bᵀ. Once the corrections
    would pass `PENDING` columns they are folded into F (one pass over it for many edits)."""

    dense: torch.Tensor  # F (fan_in, fan_in) float64
    dense32: torch.Tensor  # F in float32, as the layer reads it
    pending: tuple[torch.Tensor, torch.Tensor]  # (A, B) (fan_in, r) float64
    own: torch.Tensor  # (R,) float64
    alone: torch.Tensor  # (R,) float64: each row's own share with its edit alone (`alone_shares`)
    rows: _Rows
    owners: tuple[int, ...] = ()

    @property
    def P(self) -> torch.Tensor:  # (fan_in, fan_in) float64
        a, b = self.pending
        return torch.addmm(self.dense, a, b.T, alpha=-1) if a.shape[1] else self.dense

    @property
    def keys(self) -> torch.Tensor:  # (R, fan_in) float64
        return self.rows.keys[: len(self.owners)]

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """P x for x (fan_in, k), float64."""
        a, b = self.pending
        return self.dense @ x - a @ (b.T @ x) if a.shape[1] else self.dense @ x

    def buffers(self, compensate: float = 0.0) -> tuple[torch.Tensor, ...]:
        """What the layer holds (`gated`, in `MEMORY` order): F, U, c(u), D, the rows' `crowding` scales,
        A and B, in float32."""
        r = len(self.owners)
        return (self.dense32, self.rows.keys32(r), self.own.float(), self.rows.values[:r],
                crowding(self.alone, self.own, compensate).float(), *(x.float() for x in self.pending))

    @classmethod
    def fresh(cls, base: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, owners: tuple[int, ...] | None = None,
              alone: torch.Tensor | None = None) -> "LayerMemory":
        """From scratch: one Cholesky factorisation of A₀ + UᵀU (no rows: the base state, R = 0).
        `owners`: each row's edit (default: all rows one edit, 0); `alone`: the rows' `alone_shares`
        (default: their own shares, right when the rows are one edit)."""
        u = keys.double()
        owners = (0,) * u.shape[0] if owners is None else tuple(owners)
        if len(owners) != u.shape[0]:
            raise ValueError(f"{len(owners)} owners for {u.shape[0]} rows")
        chol = torch.linalg.cholesky(base + u.T @ u)
        # row-major P: cholesky_inverse returns it column-major, which makes every P @ Uᵀ ~15x slower
        p = torch.cholesky_inverse(chol).contiguous()
        own = own_shares(u, p)
        none = p.new_zeros(p.shape[0], 0)
        return cls(p, p.float(), (none, none), own, own.clone() if alone is None else alone.double(),
                   _Rows.of(u, keys.float(), values.float(), max(64, 2 * u.shape[0])), owners)

    def added(self, keys: torch.Tensor, values: torch.Tensor, owners: tuple[int, ...], alone: torch.Tensor) -> "LayerMemory":
        """With k more rows, by one Woodbury step (A' = A + UₖᵀUₖ):

            M = I + Uₖ P Uₖᵀ,  K = P Uₖᵀ M⁻¹,  P' = P − K Uₖ P,  c_j' = c_j − t_j M⁻¹ t_jᵀ,  t_j = u_j P Uₖᵀ

        and the new rows' own shares Uₖ P' Uₖᵀ = G M⁻¹ = I − M⁻¹ (G = M − I): no further pass over P.
        O(fan_in² k) for P Uₖᵀ plus O(fan_in R k) for the other rows' shares."""
        u = keys.double()
        pending, minv, pu = self._woodbury(u, +1)
        return self._with(pending, torch.cat([self._shares_without(minv, pu), 1 - minv.diagonal()]),
                          torch.cat([self.alone, alone.double()]), self.rows.appended(len(self.owners), keys, values),
                          self.owners + owners)

    def removed(self, gone: set[int]) -> "LayerMemory":
        """Without the rows of the edits in `gone`, by one Woodbury step (A' = A − UₖᵀUₖ, Uₖ their
        keys); the kept rows are copied to new storage."""
        kept = [i for i, o in enumerate(self.owners) if o not in gone]
        pending, minv, pu = self._woodbury(self.keys[[i for i, o in enumerate(self.owners) if o in gone]], -1)
        rows = _Rows.of(self.rows.keys[kept], self.rows.keys32t[:, kept].T, self.rows.values[kept], max(64, 2 * len(kept)))
        return self._with(pending, self._shares_without(minv, pu)[kept], self.alone[kept], rows,
                          tuple(self.owners[i] for i in kept))

    def _woodbury(self, u: torch.Tensor, sign: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(the corrections with this step's, M⁻¹, P Uₖᵀ) for A' = A + sign · UₖᵀUₖ: M = Uₖ P Uₖᵀ + sign · I,
        K = P Uₖᵀ M⁻¹, P' = P − K (P Uₖᵀ)ᵀ. M is k x k and symmetric: one inverse serves K and the share updates."""
        pu = self.times(u.T)  # (n, k)
        minv = torch.linalg.inv(u @ pu + sign * torch.eye(u.shape[0], dtype=u.dtype, device=u.device))
        a, b = self.pending
        return (torch.cat([a, pu @ minv], 1), torch.cat([b, pu], 1)), minv, pu

    def _with(self, pending, own, alone, rows, owners) -> "LayerMemory":
        """A memory with these corrections, folded into F when there are more than `PENDING` columns
        (addmm: one pass over F, ~15x faster on CPU than F − A @ Bᵀ)."""
        a, b = pending
        if a.shape[1] <= PENDING:
            return LayerMemory(self.dense, self.dense32, pending, own, alone, rows, owners)
        dense = torch.addmm(self.dense, a, b.T, alpha=-1)
        none = dense.new_zeros(dense.shape[0], 0)
        return LayerMemory(dense, dense.float(), (none, none), own, alone, rows, owners)

    def _shares_without(self, minv: torch.Tensor, pu: torch.Tensor) -> torch.Tensor:
        """This memory's rows' shares after P' = P − P Uₖᵀ M⁻¹ Uₖ P: c_j − t_j M⁻¹ t_jᵀ with t = U P Uₖᵀ,
        one pass over U."""
        t = self.keys @ pu  # (R, k)
        return self.own - ((t @ minv) * t).sum(1)


MEMORY = ("mend_p", "mend_keys", "mend_own", "mend_values", "mend_scale", "mend_pa", "mend_pb")  # buffer names on each edited layer


def memory_names(module_name: str) -> tuple[str, ...]:
    """The override names of a layer's memory for `functional_call`: P's dense part F (fan_in, fan_in),
    keys U (R, fan_in), own shares c(u) (R,), values D (R, fan_out), the rows' `crowding` scales (R,)
    and P's pending corrections A, B (fan_in, r): P = F − A Bᵀ (`LayerMemory`)."""
    return tuple(f"{module_name}.{attr}" for attr in MEMORY)


def gated(x: torch.Tensor, p: torch.Tensor, keys: torch.Tensor, own: torch.Tensor, values: torch.Tensor,
          threshold: float, scale: torch.Tensor | None = None,
          pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_j c_j [|c_j| ≥ τ c_j(u_j)] s_j d_j, c = x P Uᵀ, for inputs x (..., fan_in): what the memory adds to a
    layer's output (s: the rows' `crowding` scales, default 1; P = p − A Bᵀ with `pending` (A, B)).
    Only the rows that fire for some input enter the product with D (an unrelated input fires few)."""
    x = x.float()
    xp = x @ p
    if pending is not None and pending[0].shape[1]:
        xp = xp - (x @ pending[0]) @ pending[1].T
    c = xp @ keys.T  # (..., R)
    fired = c.abs() >= threshold * own
    live = fired.flatten(0, -2).any(0)
    written = c[..., live] * fired[..., live]
    return (written if scale is None else written * scale[live]) @ values[live]


def _memory_hook(module, inputs, output):
    if module.mend_keys.shape[0] == 0:
        return output
    return output + gated(inputs[0], module.mend_p, module.mend_keys, module.mend_own, module.mend_values,
                          module.mend_gate, module.mend_scale, (module.mend_pa, module.mend_pb)).to(output.dtype)


def empty_memory(fan_in: int, fan_out: int, device=None) -> tuple[torch.Tensor, ...]:
    """The buffers of a memory without rows (the base model)."""
    return (torch.zeros(0, 0, device=device), torch.zeros(0, fan_in, device=device), torch.zeros(0, device=device),
            torch.zeros(0, fan_out, device=device), torch.zeros(0, device=device), *no_pending(fan_in, device))


def no_pending(fan_in: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The corrections A, B of a memory whose P is all dense (fan_in, 0)."""
    return torch.zeros(fan_in, 0, device=device), torch.zeros(fan_in, 0, device=device)


def _attach(module: torch.nn.Module, fan_in: int, fan_out: int) -> None:
    if not hasattr(module, "mend_keys"):
        for attr, tensor in zip(MEMORY, empty_memory(fan_in, fan_out, module.weight.device)):
            module.register_buffer(attr, tensor, persistent=False)
        module.register_forward_hook(_memory_hook)


def attach_memory(model: torch.nn.Module, targets, threshold: float) -> None:
    """Give each target layer an empty edit memory: the buffers of `memory_names`, the threshold τ,
    and a forward hook that adds `gated` to its output. The buffers are not saved with
    the model (`persistent=False`; `save_memory` writes them beside it); `functional_call` overrides
    them like weights. Attaching again keeps the memory and sets τ."""
    modules = dict(model.named_modules())
    for t in targets:
        _attach(modules[t.name], t.fan_in, t.fan_out)
        modules[t.name].mend_gate = float(threshold)


def memories(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{override name: tensor} of every non-empty edit memory of `model`."""
    return {f"{name}.{attr}": getattr(m, attr) for name, m in model.named_modules()
            if getattr(m, "mend_keys", None) is not None and m.mend_keys.shape[0] > 0 for attr in MEMORY}


MEMORY_FILE = "edit_memory.safetensors"


def save_memory(model: torch.nn.Module, path: str | Path) -> None:
    """Write the model's non-empty edit memories (and each layer's τ) to path/edit_memory.safetensors,
    beside `save_pretrained`'s files; with none, remove an old file. `load_memory` reads it back."""
    file = Path(path) / MEMORY_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in memories(model).items()}
    if not tensors:
        file.unlink(missing_ok=True)
        return
    modules = dict(model.named_modules())
    gates = {name: modules[name].mend_gate for name in {k.rsplit(".", 1)[0] for k in tensors}}
    save_file(tensors, str(file), metadata={"gates": json.dumps(gates)})


def load_memory(model: torch.nn.Module, path: str | Path) -> bool:
    """Attach the edit memories saved at path/edit_memory.safetensors, if any (True when there were)."""
    file = Path(path) / MEMORY_FILE
    if not file.is_file():
        return False
    with safe_open(str(file), "pt") as f:
        gates = json.loads(f.metadata()["gates"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = dict(model.named_modules())
    for name, gate in gates.items():
        module = modules[name]
        _attach(module, tensors[f"{name}.mend_keys"].shape[1], tensors[f"{name}.mend_values"].shape[1])
        module.mend_gate = float(gate)
        if f"{name}.mend_scale" not in tensors:  # saved before the crowding scales: every row's is 1
            tensors[f"{name}.mend_scale"] = torch.ones(tensors[f"{name}.mend_own"].shape[0])
        if f"{name}.mend_pa" not in tensors:  # saved before P had pending corrections: all dense
            tensors[f"{name}.mend_pa"], tensors[f"{name}.mend_pb"] = no_pending(tensors[f"{name}.mend_keys"].shape[1])
        for attr in MEMORY:
            tensor = tensors[f"{name}.{attr}"].to(module.weight.device)
            # the keys in the served layout (`_Rows.keys32`): the same products, bit for bit, as before saving
            setattr(module, attr, tensor.T.contiguous().T if attr == "mend_keys" else tensor)
    return True
