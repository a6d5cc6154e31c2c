"""Combine many edits into one update per layer by least squares (MALMEN), not by summing.

Per edited layer, every token j of every edit gives a key u_j (the layer's input, fan_in wide) and
a wanted change of the layer's output for that key, d_j (fan_out wide; `MendEditor.key_values`).
Summed rank-1 updates interfere as their number grows; instead the update S of a layer
((fan_in, fan_out) layout) solves

    min_S  Σ_j ‖u_j S − d_j‖²  +  μ_l ‖K₀ S‖² / n₀  +  λ_l ‖S‖²      (K₀: n₀ keys of unedited text)
    S = (UᵀU + A₀)⁻¹ UᵀD,        A₀ = μ_l C₀ + λ_l I,        C₀ = K₀ᵀK₀ / n₀

MALMEN's ridge normal equation plus a preserved-knowledge term: C₀ is the mean outer product of the
layer's keys on unedited text (as in MEMIT and AlphaEdit), so the update leaves the outputs of
ordinary inputs alone. λ_l and μ_l are learned with the editor. Everything is float64: A sums
thousands of keys.

`solve` computes S afresh (meta-training and batch evaluation; differentiable). With C₀ = Q Λ Qᵀ
factorised once, A₀⁻¹ = Q diag(1/(μ_l Λ + λ_l)) Qᵀ costs no factorisation, so with fewer keys than
the layer is wide it uses the dual form S = A₀⁻¹Uᵀ (I + U A₀⁻¹ Uᵀ)⁻¹ D (a k x k solve). A served model
keeps `LayerSolution` (P = A⁻¹ and S) per layer and adds or removes a group of edits with one rank-k
Woodbury step: O(fan_in² k) instead of a new O(fan_in³) factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KeyValues = dict[str, tuple[torch.Tensor, torch.Tensor]]  # param_name -> (keys U (k, fan_in), values D (k, fan_out))


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


@dataclass(frozen=True)
class LayerSolution:
    """The least-squares state of one layer for a set of edits: P = (A₀ + UᵀU)⁻¹ and S = P UᵀD."""

    P: torch.Tensor  # (fan_in, fan_in) float64
    S: torch.Tensor  # (fan_in, fan_out) float64

    @classmethod
    def fresh(cls, base: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> "LayerSolution":
        """From scratch: one Cholesky factorisation of A₀ + UᵀU (k may be 0: the base state, S = 0)."""
        u = keys.double()
        chol = torch.linalg.cholesky(base + u.T @ u)
        # row-major P: cholesky_inverse returns it column-major, which makes every P @ Uᵀ ~15x slower
        return cls(torch.cholesky_inverse(chol).contiguous(), torch.cholesky_solve(u.T @ values.double(), chol))

    def updated(self, keys: torch.Tensor, values: torch.Tensor, sign: int) -> "LayerSolution":
        """Add (sign=+1) or remove (sign=-1) k keys and their values with one Woodbury step:

            A' = A + s UᵀU,   K = P Uᵀ (s I + U P Uᵀ)⁻¹,   P' = P − K U P,   S' = S + K (D − U S)

        (the same S' formula holds for both signs because P' Uᵀ = s K)."""
        u, d = keys.double(), values.double()
        pu = self.P @ u.T  # (n, k)
        m = u @ pu + sign * torch.eye(u.shape[0], dtype=u.dtype, device=u.device)  # (k, k), symmetric
        k = torch.linalg.solve(m, pu.T).T  # (n, k) = P Uᵀ M⁻¹
        # addmm: one pass over the (n, n) matrix, ~15x faster on CPU than P - K @ PUᵀ
        return LayerSolution(torch.addmm(self.P, k, pu.T, alpha=-1), torch.addmm(self.S, k, d - u @ self.S))
