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
The layer holds c(u), D, the scales and c's operator P Uᵀ (P = (UᵀU + A₀)⁻¹) in buffers
(`attach_memory`) and computes c(x) itself. The base weights are never written.

A served model keeps `LayerMemory` per layer and adds or removes a group of k rows with one rank-k
Woodbury step, O(fan_in² k + fan_in k R) for R active rows, instead of a new O(fan_in³)
factorisation. P is kept as a dense part F and the steps' low-rank corrections (P = F − A Bᵀ),
folded into F every `PENDING` columns, and the layer's operator as H = F Uᵀ and Bᵀ Uᵀ
(P Uᵀ = H − A Bᵀ Uᵀ): an edit appends its rows' columns of H and its corrections, and rewrites
neither the (fan_in, fan_in) P nor the (fan_in, R) H except at a fold.
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
class _Store:
    """Append-only storage of one layer's rows and of P's corrections, shared by successive
    `LayerMemory` versions with the same dense part F. A memory owns rows [0, R) and corrections
    [0, r), so it may append in place only while nothing was appended after them (a sibling proposal
    copies instead). Appending k rows and their k corrections then costs O(k (fan_in + R)), not O(fan_in R).
    H, A and B are stored transposed, a row per column, so that an append writes contiguous memory
    (a column of a row-major matrix touches a cache line per entry). The float32 copies are what
    the layer reads."""

    keys: torch.Tensor  # (rows capacity, n) float64
    values: torch.Tensor  # (rows capacity, m) float32
    ht: torch.Tensor  # Hᵀ (rows capacity, n) float64: u_j F, one row per row
    ht32: torch.Tensor  # (rows capacity, n) float32
    at: torch.Tensor  # Aᵀ (corrections capacity, n) float64
    bt: torch.Tensor  # Bᵀ (corrections capacity, n) float64
    at32: torch.Tensor  # (corrections capacity, n) float32
    bu: torch.Tensor  # Bᵀ Uᵀ (corrections capacity, rows capacity) float64
    bu32: torch.Tensor  # (corrections capacity, rows capacity) float32
    used: tuple[int, int] = (0, 0)  # (rows, corrections)

    @classmethod
    def of(cls, keys: torch.Tensor, values: torch.Tensor, ht: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None = None,
           bu: torch.Tensor | None = None, extra: int = 0) -> "_Store":
        """New storage holding these rows (Hᵀ: (rows, n)) and corrections (`pending` (A, B), `bu` Bᵀ Uᵀ),
        with room for at least `extra` more of each."""
        (rows, n), m = keys.shape, values.shape[1]
        a, b = pending if pending is not None else (ht.new_zeros(n, 0), ht.new_zeros(n, 0))
        r = a.shape[1]
        cap_rows, cap_r = max(64, 2 * (rows + extra)), max(2 * PENDING, 2 * (r + extra))
        # uninitialised: only [0, used) is ever read (zero-filling the capacity took as long as the copy)
        new = keys.new_empty
        out = cls(new(cap_rows, n, dtype=torch.float64), values.new_empty(cap_rows, m, dtype=torch.float32),
                  new(cap_rows, n, dtype=torch.float64), new(cap_rows, n, dtype=torch.float32),
                  new(cap_r, n, dtype=torch.float64), new(cap_r, n, dtype=torch.float64), new(cap_r, n, dtype=torch.float32),
                  new(cap_r, cap_rows, dtype=torch.float64), new(cap_r, cap_rows, dtype=torch.float32), (rows, r))
        out.keys[:rows], out.values[:rows], out.ht[:rows], out.ht32[:rows] = keys, values, ht, ht
        out.at[:r], out.bt[:r], out.at32[:r] = a.T, b.T, a.T
        if bu is not None:
            out.bu[:r, :rows], out.bu32[:r, :rows] = bu, bu
        return out

    def view(self, rows: int, r: int) -> tuple[torch.Tensor, ...]:
        """(keys, values, Hᵀ, (A, B), Bᵀ Uᵀ) of the first `rows` rows and `r` corrections, float64 but the values."""
        return (self.keys[:rows], self.values[:rows], self.ht[:rows], (self.at[:r].T, self.bt[:r].T), self.bu[:r, :rows])

    def appended(self, rows: int, r: int, keys: torch.Tensor, values: torch.Tensor, fu: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, btu: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> "_Store":
        """Storage whose first `rows` rows and `r` corrections are these, followed by k new rows (keys,
        values, their columns F Uₖᵀ of H) and k corrections (columns a, b of A, B), with the new parts of
        Bᵀ Uᵀ: Bᵀ Uₖᵀ (`btu`, r x k) beside the old rows' columns and the new corrections' rows
        (t = U P Uₖᵀ over the old rows, g = Uₖ P Uₖᵀ) below."""
        k = keys.shape[0]
        out = self
        if self.used != (rows, r) or rows + k > self.keys.shape[0] or r + k > self.at.shape[0]:
            out = _Store.of(*self.view(rows, r), extra=k)
        new_rows, new_r = slice(rows, rows + k), slice(r, r + k)
        out.keys[new_rows], out.values[new_rows], out.ht[new_rows], out.ht32[new_rows] = keys, values, fu.T, fu.T
        out.at[new_r], out.bt[new_r], out.at32[new_r] = a.T, b.T, a.T
        for bu in (out.bu, out.bu32):
            bu[:r, new_rows], bu[new_r, :rows], bu[new_r, new_rows] = btu, t.T, g.T
        out.used = (rows + k, r + k)
        return out


PENDING = 64  # columns of Woodbury corrections a memory may hold before folding them into its dense part


@dataclass(frozen=True)
class LayerMemory:
    """The edit memory of one layer for a set of edit rows: P = (A₀ + UᵀU)⁻¹, each row's own share
    c_j(u_j), and the rows' keys U and values D (in `store`, in the order they came); `owners` names
    each row's edit.

    P is held as a dense part and the Woodbury corrections since it was last rewritten,
    P = F − A Bᵀ (A, B: (fan_in, r), r ≤ `PENDING`): an edit appends k columns instead of rewriting
    the (fan_in, fan_in) matrix; past `PENDING` columns they are folded into F (one pass over it for
    many edits). The layer never reads P: it holds H = F Uᵀ (a column per row, appended with the row)
    and Bᵀ Uᵀ, and computes c(x) = x P Uᵀ = x H − (x A)(Bᵀ Uᵀ): one (fan_in, R) product per token
    instead of a (fan_in, fan_in) and a (fan_in, R) one."""

    dense: torch.Tensor  # F (fan_in, fan_in) float64
    store: _Store  # rows [0, R) and corrections [0, `corrections`) are this memory's
    corrections: int
    own: torch.Tensor  # (R,) float64
    alone: torch.Tensor  # (R,) float64: each row's own share with its edit alone (`alone_shares`)
    owners: tuple[int, ...] = ()

    @property
    def pending(self) -> tuple[torch.Tensor, torch.Tensor]:  # (A, B) (fan_in, r) float64
        return self.store.at[: self.corrections].T, self.store.bt[: self.corrections].T

    @property
    def bu(self) -> torch.Tensor:  # Bᵀ Uᵀ (r, R) float64
        return self.store.bu[: self.corrections, : len(self.owners)]

    @property
    def P(self) -> torch.Tensor:  # (fan_in, fan_in) float64
        a, b = self.pending
        return torch.addmm(self.dense, a, b.T, alpha=-1)

    @property
    def keys(self) -> torch.Tensor:  # (R, fan_in) float64
        return self.store.keys[: len(self.owners)]

    def buffers(self, compensate: float = 0.0) -> tuple[torch.Tensor, ...]:
        """What the layer holds (`gated`, in `MEMORY` order), float32: H, c(u), D, the rows' `crowding`
        scales, A and Bᵀ Uᵀ."""
        rows, r, s = len(self.owners), self.corrections, self.store
        return (s.ht32[:rows].T, self.own.float(), s.values[:rows], crowding(self.alone, self.own, compensate).float(),
                s.at32[:r].T, s.bu32[:r, :rows])

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
        return cls(p, _Store.of(u, values.float(), u @ p.T), 0, own, own.clone() if alone is None else alone.double(), owners)

    def added(self, keys: torch.Tensor, values: torch.Tensor, owners: tuple[int, ...], alone: torch.Tensor) -> "LayerMemory":
        """With k more rows, by one Woodbury step (A' = A + UₖᵀUₖ):

            M = I + Uₖ P Uₖᵀ,  K = P Uₖᵀ M⁻¹,  P' = P − K Uₖ P,  c_j' = c_j − t_j M⁻¹ t_jᵀ,  t_j = u_j P Uₖᵀ

        and the new rows' own shares Uₖ P' Uₖᵀ = G M⁻¹ = I − M⁻¹ (G = M − I). K and P Uₖᵀ join the
        corrections; the new rows' columns of H are F Uₖᵀ, a part of P Uₖᵀ. O(fan_in² k) for F Uₖᵀ plus
        O(fan_in R k) for the other rows' shares."""
        u = keys.double()
        fu, btu, pu, g, minv, t = self._step(u, +1)
        rows, r = len(self.owners), self.corrections
        store = self.store.appended(rows, r, keys, values, fu, pu @ minv, pu, btu, t, g)  # B'ᵀ U'ᵀ: no new product
        return self._with(store, r + u.shape[0], torch.cat([self.own - ((t @ minv) * t).sum(1), 1 - minv.diagonal()]),
                          torch.cat([self.alone, alone.double()]), self.owners + owners)

    def removed(self, gone: set[int]) -> "LayerMemory":
        """Without the rows of the edits in `gone`, by one Woodbury step (A' = A − UₖᵀUₖ, Uₖ their
        keys); the kept rows are copied to new storage."""
        kept = [i for i, o in enumerate(self.owners) if o not in gone]
        _, _, pu, _, minv, t = self._step(self.keys[[i for i, o in enumerate(self.owners) if o in gone]], -1)
        keys, values, ht, (a, b), bu = self.store.view(len(self.owners), self.corrections)
        store = _Store.of(keys[kept], values[kept], ht[kept], (torch.cat([a, pu @ minv], 1), torch.cat([b, pu], 1)),
                          torch.cat([bu[:, kept], t[kept].T]))
        return self._with(store, self.corrections + pu.shape[1], (self.own - ((t @ minv) * t).sum(1))[kept], self.alone[kept],
                          tuple(self.owners[i] for i in kept))

    def _step(self, u: torch.Tensor, sign: int):
        """The products of a Woodbury step A' = A + sign · UₖᵀUₖ: F Uₖᵀ, Bᵀ Uₖᵀ, P Uₖᵀ, G = Uₖ P Uₖᵀ,
        M⁻¹ = (G + sign · I)⁻¹ (k x k, symmetric: one inverse serves K and the share updates) and
        t = U P Uₖᵀ over this memory's rows (one pass over U)."""
        a, b = self.pending
        fu = self.dense @ u.T  # (n, k)
        btu = b.T @ u.T  # (r, k)
        pu = fu - a @ btu
        g = u @ pu
        minv = torch.linalg.inv(g + sign * torch.eye(u.shape[0], dtype=u.dtype, device=u.device))
        return fu, btu, pu, g, minv, self.keys @ pu

    def _with(self, store: _Store, corrections: int, own, alone, owners) -> "LayerMemory":
        """A memory on `store` with these corrections, folded when there are more than `PENDING`:
        F' = F − A Bᵀ and H'ᵀ = U F' = Hᵀ − (Bᵀ Uᵀ)ᵀ Aᵀ (addmm: one pass over each, ~15x faster on CPU
        than F − A @ Bᵀ), in new storage."""
        if corrections <= PENDING:
            return LayerMemory(self.dense, store, corrections, own, alone, owners)
        keys, values, ht, (a, b), bu = store.view(len(owners), corrections)
        dense = torch.addmm(self.dense, a, b.T, alpha=-1)
        return LayerMemory(dense, _Store.of(keys, values, torch.addmm(ht, bu.T, a.T, alpha=-1)), 0, own, alone, owners)


MEMORY = ("mend_h", "mend_own", "mend_values", "mend_scale", "mend_pa", "mend_pbu")  # buffer names on each edited layer


def memory_names(module_name: str) -> tuple[str, ...]:
    """The override names of a layer's memory for `functional_call`: H = F Uᵀ (fan_in, R), own shares
    c(u) (R,), values D (R, fan_out), the rows' `crowding` scales (R,), and P's pending corrections A
    (fan_in, r) with Bᵀ Uᵀ (r, R): c(x) = x P Uᵀ = x H − (x A)(Bᵀ Uᵀ) (`LayerMemory`)."""
    return tuple(f"{module_name}.{attr}" for attr in MEMORY)


def gated(x: torch.Tensor, h: torch.Tensor, own: torch.Tensor, values: torch.Tensor, threshold: float,
          scale: torch.Tensor | None = None, pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_j c_j [|c_j| ≥ τ c_j(u_j)] s_j d_j, c = x H − (x A)(Bᵀ Uᵀ) = x P Uᵀ, for inputs x (..., fan_in): what
    the memory adds to a layer's output (h: H = P Uᵀ when there are no corrections; `pending`: (A, Bᵀ Uᵀ);
    s: the rows' `crowding` scales, default 1). Only the rows that fire for some input enter the
    product with D (an unrelated input fires few)."""
    x = x.float()
    c = x @ h  # (..., R)
    if pending is not None and pending[0].shape[1]:
        c = c - (x @ pending[0]) @ pending[1]
    written = torch.where(c.abs() >= threshold * own, c, 0)  # a row that fires writes c_j (≠ 0), others nothing
    if scale is not None:
        written = written * scale
    live = written.flatten(0, -2).any(0).nonzero().squeeze(1)
    return written.index_select(-1, live) @ values.index_select(0, live)


def _memory_hook(module, inputs, output):
    if module.mend_own.shape[0] == 0:
        return output
    return output + gated(inputs[0], module.mend_h, module.mend_own, module.mend_values, module.mend_gate,
                          module.mend_scale, (module.mend_pa, module.mend_pbu)).to(output.dtype)


def empty_memory(fan_in: int, fan_out: int, device=None) -> tuple[torch.Tensor, ...]:
    """The buffers of a memory without rows (the base model)."""
    return (torch.zeros(fan_in, 0, device=device), torch.zeros(0, device=device), torch.zeros(0, fan_out, device=device),
            torch.zeros(0, device=device), *no_pending(fan_in, 0, device))


def no_pending(fan_in: int, rows: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The buffers A (fan_in, 0) and Bᵀ Uᵀ (0, rows) of a memory without pending corrections."""
    return torch.zeros(fan_in, 0, device=device, dtype=dtype), torch.zeros(0, rows, device=device, dtype=dtype)


def _attach(module: torch.nn.Module, fan_in: int, fan_out: int) -> None:
    if not hasattr(module, "mend_own"):
        for attr, tensor in zip(MEMORY, empty_memory(fan_in, fan_out, module.weight.device)):
            module.register_buffer(attr, tensor, persistent=False)
        module.register_forward_hook(_memory_hook)


def attach_memory(model: torch.nn.Module, targets, threshold: float | dict[str, float]) -> None:
    """Give each target layer an empty edit memory: the buffers of `memory_names`, the threshold τ
    (one for all, or per module name: `EditorConfig.gates`), and a forward hook that adds `gated` to
    its output. The buffers are not saved with the model (`persistent=False`; `save_memory` writes
    them beside it); `functional_call` overrides them like weights. Attaching again keeps the memory
    and sets τ."""
    modules = dict(model.named_modules())
    for t in targets:
        _attach(modules[t.name], t.fan_in, t.fan_out)
        modules[t.name].mend_gate = float(threshold[t.name] if isinstance(threshold, dict) else threshold)


def memories(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{override name: tensor} of every non-empty edit memory of `model`."""
    return {f"{name}.{attr}": getattr(m, attr) for name, m in model.named_modules()
            if getattr(m, "mend_own", None) is not None and m.mend_own.shape[0] > 0 for attr in MEMORY}


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
        t = {attr: tensors.get(f"{name}.{attr}") for attr in ("mend_p", "mend_keys", *MEMORY)}
        if t["mend_h"] is None:  # saved when the layer held P and the keys: H = P Uᵀ, no corrections
            t["mend_h"] = t["mend_p"] @ t["mend_keys"].T
            t["mend_pa"], t["mend_pbu"] = no_pending(*t["mend_h"].shape)
        if t["mend_scale"] is None:  # saved before the crowding scales: every row's is 1
            t["mend_scale"] = torch.ones(t["mend_own"].shape[0])
        _attach(module, t["mend_h"].shape[0], t["mend_values"].shape[1])
        module.mend_gate = float(gate)
        for attr in MEMORY:
            tensor = t[attr].to(module.weight.device)
            if attr in ("mend_h", "mend_pa"):  # as a live memory holds them (`_Store`): x H then runs the same kernel
                tensor = tensor.T.contiguous().T
            setattr(module, attr, tensor)
    return True

