"""The combination of edits: the least-squares memory, its incremental Woodbury steps, and the gate."""

import pytest
import torch

from mend import aggregation
from mend.aggregation import (LayerMemory, alone_shares, attach_memory, crowding, gated, inverse_system, memory_names, save_memory,
                              select_rows, solve)
from mend.models import load_model
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


def added(mem, base, u, d, seq):
    """`mem` with one more edit, its rows' alone shares from A₀⁻¹ as the served model computes them."""
    own = owners([(u, d)], [seq])
    return mem.added(u, d, own, alone_shares(u, own, torch.linalg.inv(base).float()))


def fresh(base, edits, seqs):
    u, d = stacked(edits)
    own = owners(edits, seqs)
    return LayerMemory.fresh(base, u, d, own, alone_shares(u, own, torch.linalg.inv(base).float()))


def test_the_memory_is_the_least_squares_update_split_into_rows():
    base, edits = problem()
    u, d = (x.double() for x in stacked(edits))
    mem = LayerMemory.fresh(base, u, d)
    torch.testing.assert_close(mem.P @ (base + u.T @ u), torch.eye(base.shape[0], dtype=torch.float64))
    torch.testing.assert_close(mem.P @ u.T @ d, solve(eigen(base), u, d))  # x P Uᵀ D = x S: without the gate, S itself
    torch.testing.assert_close(inverse_system(eigen(base), u), mem.P)  # k >= n
    few = LayerMemory.fresh(base, u[:10], d[:10])
    torch.testing.assert_close(inverse_system(eigen(base), u[:10]), few.P)  # Woodbury (k < n)
    torch.testing.assert_close(mem.own, torch.diagonal(u @ mem.P @ u.T))


@pytest.mark.parametrize("pending", [64, 4])  # corrections kept beside P / folded into it at almost every step
def test_adding_and_removing_edits_one_by_one_matches_a_fresh_memory_in_any_order(pending, monkeypatch):
    monkeypatch.setattr(aggregation, "PENDING", pending)
    base, edits = problem()
    empty = LayerMemory.fresh(base, torch.zeros(0, 24), torch.zeros(0, 8))
    assert empty.keys.shape == (0, 24) and empty.own.shape == (0,)
    forward, backward = empty, empty
    for s, (u, d) in enumerate(edits):
        forward = added(forward, base, u, d, s)
    for s, (u, d) in reversed(list(enumerate(edits))):
        backward = added(backward, base, u, d, s)
    everything = fresh(base, edits, range(3))
    for mem in (forward, backward):
        torch.testing.assert_close(mem.P, everything.P, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forward.own, everything.own, rtol=1e-10, atol=1e-12)
    assert torch.equal(forward.keys, everything.keys) and torch.equal(forward.buffers()[3], everything.buffers()[3])
    assert torch.equal(forward.alone, everything.alone)  # an edit's alone shares depend on that edit only
    order = [i for s in range(3) for i, o in enumerate(backward.owners) if o == s]  # backward holds the rows in the order they came
    torch.testing.assert_close(backward.own[order], everything.own, rtol=1e-10, atol=1e-12)
    without_first = forward.removed({0})  # "as if it had never been applied"
    again = fresh(base, edits[1:], [1, 2])
    assert torch.equal(without_first.alone, again.alone)
    assert without_first.owners == again.owners and torch.equal(without_first.keys, again.keys)
    torch.testing.assert_close(without_first.P, again.P, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(without_first.own, again.own, rtol=1e-10, atol=1e-12)
    assert forward.pending[0].shape[1] == (25 if pending == 64 else 0)  # 5 + 7 + 13 rows; with at most 4 every step folds
    # the layer reads H = F Uᵀ and the corrections: what it writes is what P Uᵀ writes
    h, own, values, scale, a, bu = forward.buffers()
    x = torch.randn(4, 24)  # float32 paths, outputs up to ~2.4: round-off reaches 3e-5 for some x (300 draws); a wrong correction is O(1)
    torch.testing.assert_close(gated(x, h, own, values, 0.5, scale, (a, bu)),
                               gated(x, (forward.P @ forward.keys.T).float(), own, values, 0.5, scale), rtol=1e-4, atol=1e-4)


def test_crowded_rows_write_more_of_their_value_than_the_solve_leaves_them():
    base, edits = problem()
    alone = fresh(base, edits[:1], [0])
    torch.testing.assert_close(alone.alone, alone.own, rtol=1e-5, atol=0)  # one edit: its shares are its alone shares
    torch.testing.assert_close(alone.buffers(0.3)[3], torch.ones(5), rtol=1e-5, atol=0)  # so it writes as before
    crowded = fresh(base, edits, range(3))
    assert bool((crowded.own < crowded.alone).all())  # the other edits' rows take part of each row's share
    scale = crowded.buffers(0.3)[3]
    torch.testing.assert_close(scale.double(), (crowded.alone / crowded.own) ** 0.3)
    assert bool((scale > 1).all()) and torch.equal(crowded.buffers(0.0)[3], torch.ones(25))
    x = crowded.keys[:1].float()
    h, own, values, *_ = crowded.buffers()
    torch.testing.assert_close(gated(x, h, own, values, 0.5, scale), gated(x, h, own, values * scale[:, None], 0.5))
    torch.testing.assert_close(crowding(crowded.alone, crowded.own, 1.0) * crowded.own, crowded.alone)


def test_a_proposal_from_an_older_memory_does_not_overwrite_a_newer_ones_rows():
    base, edits = problem()
    first = LayerMemory.fresh(base, *edits[0], owners(edits[:1], [0]))
    a = added(first, base, *edits[1], 1)  # appended in place
    b = added(first, base, *edits[2], 2)  # a sibling: must not reuse a's slots
    assert torch.equal(a.keys, torch.cat([edits[0][0], edits[1][0]]).double())
    assert torch.equal(b.keys, torch.cat([edits[0][0], edits[2][0]]).double())


def test_the_gate_writes_only_rows_whose_share_reaches_the_threshold():
    h = torch.eye(4)[:, :3]  # P = I, three rows whose coefficients at x are x's first three coordinates, own share 1
    own = torch.ones(3)
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[0.9, -0.5, 0.1, 7.0]])
    torch.testing.assert_close(gated(x, h, own, values, 0.0), x[:, :3] @ values)  # no gate: the linear update
    torch.testing.assert_close(gated(x, h, own, values, 0.3), torch.tensor([[0.9, -0.5]]))  # row 3 (0.1) stays silent
    torch.testing.assert_close(gated(x, h, 0.1 * own, values, 0.3), x[:, :3] @ values)  # relative to the row's own share


def test_select_rows_keeps_each_edits_strong_rows():
    u, d = torch.randn(4, 3), torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 4.0], [0.0, 0.1]])
    kept_u, kept_d = select_rows(u, d, 0.7)
    assert torch.equal(kept_d, d[[0, 2]]) and torch.equal(kept_u, u[[0, 2]])  # norms 5, 1, 4, 0.1 against 0.7 x 5
    assert select_rows(u, d, 0.0)[0] is u


def test_an_attached_memory_edits_the_layer_output_through_functional_call_and_saves_beside_the_model(gpt2, tmp_path):
    model, tok = gpt2
    (target,) = resolve_targets(model, patterns=[r"transformer\.h\.1\.mlp\.c_proj"])
    attach_memory(model, [target], threshold=0.0)
    batch = tok(["a b c"], return_tensors="pt")
    base = model(**batch).logits
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, target.fan_in, generator=g)
    mem = LayerMemory.fresh(torch.eye(target.fan_in, dtype=torch.float64), u, torch.randn(3, target.fan_out, generator=g))
    overrides = dict(zip(memory_names(target.name), mem.buffers()))
    edited = torch.func.functional_call(model, edited_weights(model, overrides), (), dict(batch)).logits
    assert not torch.allclose(edited, base)
    assert torch.equal(model(**batch).logits, base)  # the model itself keeps its empty memory
    assert not any("mend_" in k for k in model.state_dict())  # and save_pretrained does not save it
    for name, tensor in overrides.items():  # written into the model: what `mend edit` saves beside the weights
        setattr(dict(model.named_modules())[target.name], name.rsplit(".", 1)[1], tensor)
    model.save_pretrained(tmp_path)
    save_memory(model, tmp_path)
    loaded, _ = load_model(tmp_path, device="cpu")
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)
