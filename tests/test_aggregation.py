"""The combination of edits: the least-squares memory, its incremental Woodbury steps, and the gate."""

import torch

from mend.aggregation import LayerMemory, attach_memory, gate_matrix, gated, memory_names, normalised, select_rows, solve
from mend.editing import edited_weights
from mend.targets import resolve_targets


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


def owners(edits, seqs):
    return tuple(s for s, (u, _) in zip(seqs, edits) for _ in range(u.shape[0]))


def test_the_memory_is_the_least_squares_update_split_into_rows():
    base, edits = problem()
    u, d = (x.double() for x in stacked(edits))
    mem = LayerMemory.fresh(base, u, d)
    torch.testing.assert_close(mem.P @ (base + u.T @ u), torch.eye(base.shape[0], dtype=torch.float64))
    torch.testing.assert_close(mem.G @ mem.D, solve(eigen(base), u, d))  # x G D = x S: without the gate, S itself
    torch.testing.assert_close(mem.G, gate_matrix(eigen(base), u))  # the primal form (k >= n)
    few = LayerMemory.fresh(base, u[:10], d[:10])
    torch.testing.assert_close(few.G, gate_matrix(eigen(base), u[:10]))  # the dual form (k < n)


def test_adding_and_removing_edits_one_by_one_matches_a_fresh_memory_in_any_order():
    base, edits = problem()
    empty = LayerMemory.fresh(base, torch.zeros(0, 24), torch.zeros(0, 8))
    assert empty.G.shape == (24, 0) and empty.D.shape == (0, 8)
    forward, backward = empty, empty
    for s, (u, d) in enumerate(edits):
        forward = forward.added(u, d, owners([(u, d)], [s]))
    for s, (u, d) in reversed(list(enumerate(edits))):
        backward = backward.added(u, d, owners([(u, d)], [s]))
    fresh = LayerMemory.fresh(base, *stacked(edits), owners(edits, range(3)))
    torch.testing.assert_close(forward.G, fresh.G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward.P, fresh.P, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(backward.G @ backward.D, fresh.G @ fresh.D, rtol=1e-10, atol=1e-12)  # rows in another order
    without_first = forward.removed({0})  # "as if it had never been applied"
    again = LayerMemory.fresh(base, *stacked(edits[1:]), owners(edits[1:], [1, 2]))
    assert without_first.owners == again.owners
    torch.testing.assert_close(without_first.G, again.G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(without_first.D, again.D)
    torch.testing.assert_close(without_first.U, again.U)


def test_normalised_memory_gives_each_row_a_share_of_one_at_its_own_key():
    base, edits = problem()
    u, d = (x.double() for x in stacked(edits[:2]))
    mem = LayerMemory.fresh(base, u, d)
    g, dn = mem.buffers()
    torch.testing.assert_close(torch.diagonal(u @ g), torch.ones(u.shape[0], dtype=torch.float64))
    torch.testing.assert_close(g @ dn, mem.G @ mem.D)  # the same update without the gate


def test_the_gate_writes_only_rows_whose_coefficient_reaches_the_threshold():
    keys = torch.eye(4)[:, :3]  # three rows whose coefficients at x are x's first three coordinates
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[0.9, -0.5, 0.1, 7.0]])
    torch.testing.assert_close(gated(x, keys, values, 0.0), x[:, :3] @ values)  # no gate: the linear update
    torch.testing.assert_close(gated(x, keys, values, 0.3), torch.tensor([[0.9, -0.5]]))  # row 3 (0.1) stays silent


def test_select_rows_keeps_each_edits_strong_rows():
    u, d = torch.randn(4, 3), torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 4.0], [0.0, 0.1]])
    kept_u, kept_d = select_rows(u, d, 0.7)
    assert torch.equal(kept_d, d[[0, 2]]) and torch.equal(kept_u, u[[0, 2]])  # norms 5, 1, 4, 0.1 against 0.7 x 5
    assert select_rows(u, d, 0.0)[0] is u


def test_an_attached_memory_edits_the_layer_output_through_functional_call(gpt2):
    model, tok = gpt2
    (target,) = resolve_targets(model, n_last_blocks=1, patterns=[r"transformer\.h\.1\.mlp\.c_proj"])
    attach_memory(model, [target], threshold=0.0)
    batch = tok(["a b c"], return_tensors="pt")
    base = model(**batch).logits
    keys_name, values_name = memory_names(target.name)
    g = torch.Generator().manual_seed(0)
    memory = {keys_name: torch.randn(target.fan_in, 3, generator=g), values_name: torch.randn(3, target.fan_out, generator=g)}
    edited = torch.func.functional_call(model, edited_weights(model, memory), (), dict(batch)).logits
    assert not torch.allclose(edited, base)
    assert torch.equal(model(**batch).logits, base)  # the model itself keeps its empty memory
    assert "mend_keys" not in "".join(model.state_dict())  # and does not save it
