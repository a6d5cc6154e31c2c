import dataclasses

import pytest
import torch

from mend.aggregation import memory_names, solve
from mend.batching import encode
from mend.capture import edit_factors
from mend.checkpoint import load_editor, save_editor
from mend.editing import MendMethod, edited_weights
from mend.editor import EditorConfig, MendEditor
from mend.errors import CheckpointMismatchError, ConfigError
from mend.records import EditRecord
from mend.targets import resolve_targets

EDIT = EditRecord(prompt="Alpha was born in", target_new="Drelkio")


def warmed_editor(model, tok, targets, step_init):
    """An untrained editor whose normalisation statistics have seen a few edits."""
    editor = MendEditor(targets, EditorConfig(rank=16, step_init=step_init)).train()
    batch = encode(tok, ["Alpha was born in", "Beta speaks", "Gamma plays the"], ["Drelkio", "Rosish", "harp"])
    editor(edit_factors(model, targets, batch))
    return editor.eval()


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_untrained_editor_is_identity(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    targets = resolve_targets(model, n_last_blocks=1)
    editor = warmed_editor(model, tok, targets, 1e-3)
    u = torch.randn(5, targets[0].fan_in)
    d = torch.randn(5, targets[0].fan_out)
    net = editor.nets[targets[0].shape_key]
    u_out, d_out = net(u, d, 0)
    assert torch.equal(u_out, u) and torch.equal(d_out, d)


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_zero_step_changes_nothing_and_nonzero_step_changes_predictions(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    targets = resolve_targets(model, n_last_blocks=2)
    batch = encode(tok, [EDIT.prompt], [EDIT.target_new])
    before = model(input_ids=batch.input_ids).logits

    zero = MendMethod(warmed_editor(model, tok, targets, 0.0)).deltas(model, tok, [EDIT])
    assert set(zero) == {n for t in targets for n in memory_names(t.name)}  # MEND edits the layers' memories
    assert all(float(zero[memory_names(t.name)[2]].abs().max()) == 0.0 for t in targets)  # values D = 0

    editor = warmed_editor(model, tok, targets, 1.0)
    deltas = MendMethod(editor).deltas(model, tok, [EDIT])
    for t in targets:
        h, own, values, scale, *_ = (deltas[n] for n in memory_names(t.name))
        assert h.shape == (t.fan_in, own.shape[0]) and values.shape[1] == t.fan_out
        assert own.shape[0] == values.shape[0] == scale.shape[0] >= 1
    after = torch.func.functional_call(model, edited_weights(model, deltas), (batch.input_ids,)).logits
    assert not torch.allclose(before, after)
    assert torch.equal(model(input_ids=batch.input_ids).logits, before)  # the model itself is unchanged


def test_checkpoint_round_trip_is_exact(gpt2, tmp_path):
    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=2)
    editor = warmed_editor(model, tok, targets, 1e-2)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # make it non-trivial
    save_editor(editor, tmp_path, model.config.model_type)
    loaded = load_editor(tmp_path, model)
    a, b = editor.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = MendMethod(editor).deltas(model, tok, [EDIT])
    y = MendMethod(loaded).deltas(model, tok, [EDIT])
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))  # no pickles


def test_mismatched_checkpoint_is_refused(gpt2, llama, tmp_path):
    model, tok = gpt2
    save_editor(warmed_editor(model, tok, resolve_targets(model, n_last_blocks=2), 1e-2), tmp_path, "gpt2")
    with pytest.raises(CheckpointMismatchError, match="trained for a gpt2 model, not llama"):
        load_editor(tmp_path, llama[0])
    with pytest.raises(CheckpointMismatchError, match="no editor checkpoint"):
        load_editor(tmp_path / "missing", model)
    other = resolve_targets(model, n_last_blocks=1)  # tensors of a different editor under the same json
    save_editor(warmed_editor(model, tok, other, 1e-2), tmp_path / "other", "gpt2")
    (tmp_path / "other" / "editor.safetensors").replace(tmp_path / "editor.safetensors")
    with pytest.raises(CheckpointMismatchError, match="do not match editor.json"):
        load_editor(tmp_path, model)


def test_a_batch_is_one_least_squares_update_over_every_edits_rows(gpt2):
    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=1)
    editor = warmed_editor(model, tok, targets, 1e-2)
    editor.cfg = dataclasses.replace(editor.cfg, keep=0.0)  # every token row: the plain least-squares update
    method = MendMethod(editor)
    second = EditRecord(prompt="Beta speaks", target_new="Rosish")
    both = method.deltas(model, tok, [EDIT, second])
    per_edit = method.per_edit_key_values(model, tok, [EDIT, second])
    alone = [method.per_edit_key_values(model, tok, [r])[0] for r in (EDIT, second)]
    for t in targets:
        name = t.param_name
        keys = torch.cat([kv[name][0] for kv in per_edit])
        values = torch.cat([kv[name][1] for kv in per_edit])
        for kv, single in zip(per_edit, alone):  # a batch splits exactly into each edit's own rows
            torch.testing.assert_close(kv[name][0], single[name][0])
            torch.testing.assert_close(kv[name][1], single[name][1], rtol=1e-4, atol=1e-9)
        s = solve(editor.base_eigen(name), keys, values).float()
        h, _, d, *_ = (both[n] for n in memory_names(t.name))
        torch.testing.assert_close(h @ d, s, rtol=1e-4, atol=1e-6)  # without the gate, the memory (H = P Uᵀ) writes x S
        assert torch.linalg.norm(keys @ s - values) < torch.linalg.norm(values)  # the solve moves outputs towards d


def test_the_update_solves_the_ridge_normal_equation(gpt2):
    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=1)
    editor = warmed_editor(model, tok, targets, 1e-2)
    (kv,) = MendMethod(editor).per_edit_key_values(model, tok, [EDIT])
    name = targets[0].param_name
    u, d = (x.double() for x in kv[name])
    s = solve(editor.base_eigen(name), u, d)
    lam = editor.log_ridge[0].exp().item()  # no preserved keys observed: A₀ = λ I
    torch.testing.assert_close((u.T @ u + lam * torch.eye(u.shape[1], dtype=torch.float64)) @ s, u.T @ d)


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_the_last_edited_block_can_have_its_own_gate(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    targets = resolve_targets(model, n_last_blocks=2)
    last = targets[-1].name.split(".mlp.")[0]  # "transformer.h.1" / "model.layers.1"
    gates = EditorConfig(gate=0.6, gate_last=0.45).gates(targets)
    assert {name for name, g in gates.items() if g == 0.45} == {t.name for t in targets if t.name.startswith(last + ".")}
    assert sorted(set(gates.values())) == [0.45, 0.6] and EditorConfig(gate=0.6).gates(targets) == dict.fromkeys(gates, 0.6)
    editor = warmed_editor(model, tok, targets, 1e-2)
    editor.cfg = dataclasses.replace(editor.cfg, gate=0.6, gate_last=0.45)
    MendMethod(editor).deltas(model, tok, [EDIT])  # attaches the memories with their gates
    modules = dict(model.named_modules())
    assert {t.name: modules[t.name].mend_gate for t in targets} == gates
    with pytest.raises(ConfigError, match="gate_last"):
        EditorConfig(gate_last=-1.0)
