"""The least-squares combination: incremental Woodbury steps agree with a fresh factorisation."""

import torch

from mend.aggregation import LayerSolution, solve


def problem(n=24, m=8, rows=(5, 7, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(200, n, generator=g, dtype=torch.float64)
    base = 0.5 * k0.T @ k0 / 200 + 0.1 * torch.eye(n, dtype=torch.float64)
    edits = [(torch.randn(r, n, generator=g), torch.randn(r, m, generator=g)) for r in rows]
    return base, edits


def eigen(base):
    evals, evecs = torch.linalg.eigh(base)
    return evecs, evals


def stacked(edits):
    return torch.cat([u for u, _ in edits]), torch.cat([d for _, d in edits])


def test_fresh_solution_solves_the_normal_equation():
    base, edits = problem()
    u, d = (x.double() for x in stacked(edits))
    sol = LayerSolution.fresh(base, u, d)
    torch.testing.assert_close((base + u.T @ u) @ sol.S, u.T @ d)
    torch.testing.assert_close(sol.P @ (base + u.T @ u), torch.eye(base.shape[0], dtype=torch.float64))
    torch.testing.assert_close(sol.S, solve(eigen(base), u, d))  # the primal form (k >= n)
    few = LayerSolution.fresh(base, u[:10], d[:10])
    torch.testing.assert_close(few.S, solve(eigen(base), u[:10], d[:10]))  # the dual form (k < n)


def test_adding_and_removing_edits_one_by_one_matches_a_fresh_solve_in_any_order():
    base, edits = problem()
    empty = LayerSolution.fresh(base, torch.zeros(0, 24), torch.zeros(0, 8))
    assert torch.equal(empty.S, torch.zeros(24, 8, dtype=torch.float64))
    forward, backward = empty, empty
    for u, d in edits:
        forward = forward.updated(u, d, +1)
    for u, d in reversed(edits):
        backward = backward.updated(u, d, +1)
    fresh = LayerSolution.fresh(base, *stacked(edits))
    torch.testing.assert_close(forward.S, fresh.S, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(backward.S, fresh.S, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward.P, fresh.P, rtol=1e-10, atol=1e-12)
    without_first = forward.updated(*edits[0], sign=-1)  # "as if it had never been applied"
    torch.testing.assert_close(without_first.S, LayerSolution.fresh(base, *stacked(edits[1:])).S, rtol=1e-10, atol=1e-12)
