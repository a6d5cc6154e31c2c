import pytest
import torch

from mend.batching import encode, logits, target_nll
from mend.capture import capture, edit_factors
from mend.errors import TargetResolutionError
from mend.targets import resolve_targets


def test_gpt2_defaults_are_mlp_of_last_blocks(gpt2):
    model, _ = gpt2
    targets = resolve_targets(model, n_last_blocks=2)
    assert [t.name for t in targets] == [f"transformer.h.{i}.mlp.{m}" for i in (0, 1) for m in ("c_fc", "c_proj")]
    assert all(t.fan_in_fan_out for t in targets)  # Conv1D
    assert (targets[0].fan_in, targets[0].fan_out) == (32, 128)


def test_llama_defaults_and_patterns(llama):
    model, _ = llama
    targets = resolve_targets(model, n_last_blocks=1)
    assert [t.name for t in targets] == [f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    assert not any(t.fan_in_fan_out for t in targets)  # nn.Linear
    assert (targets[2].fan_in, targets[2].fan_out) == (64, 32)
    picked = resolve_targets(model, patterns=[r"model\.layers\.\d\.mlp\.down_proj"])
    assert [t.name for t in picked] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_unknown_target_is_a_clear_error(gpt2):
    model, _ = gpt2
    with pytest.raises(TargetResolutionError, match="no_such_layer.*matches no Linear"):
        resolve_targets(model, patterns=["no_such_layer"])
    with pytest.raises(TargetResolutionError, match="n_last_blocks=5"):
        resolve_targets(model, n_last_blocks=5)


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_factor_outer_product_in_weight_layout_is_the_weight_gradient(fixture, request):
    """Σ u δᵀ, put into the weight's layout, equals autograd's gradient: Conv1D and Linear alike."""
    model, tok = request.getfixturevalue(fixture)
    targets = resolve_targets(model, n_last_blocks=1)
    batch = encode(tok, ["Alpha was born in", "The hometown of Beta is"], ["Drelkio", "Tosmum"])
    factors = edit_factors(model, targets, batch)
    params = dict(model.named_parameters())
    weights = {t.param_name: params[t.param_name].detach().clone().requires_grad_(True) for t in targets}
    loss = target_nll(logits(model, batch, weights), batch).sum()
    grads = torch.autograd.grad(loss, list(weights.values()))
    for t, g in zip(targets, grads):
        u, delta = factors[t.param_name]
        assert g.shape == params[t.param_name].shape
        torch.testing.assert_close(t.to_weight_layout(u.T @ delta), g, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad for p in model.parameters())  # the model itself was not touched


def test_hooks_are_removed_even_when_the_body_fails(gpt2):
    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=2)
    modules = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, targets) as store:
            model(**{k: v for k, v in vars(encode(tok, ["a"], ["b"])).items() if k != "labels"})
            assert store[targets[0].param_name].u is not None
            assert len(modules[targets[0].name]._forward_hooks) == 1
            raise RuntimeError("boom")
    assert all(len(modules[t.name]._forward_hooks) == 0 for t in targets)
    edit_factors(model, targets, encode(tok, ["a"], ["b"]))
    assert all(len(modules[t.name]._forward_hooks) == 0 for t in targets)


def test_layer_inputs_at_prediction_positions_are_the_rows_that_predict_the_answer(gpt2):
    from mend.batching import encode
    from mend.capture import layer_inputs
    from mend.targets import resolve_targets

    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=1)
    batch = encode(tok, ["Alpha was born in", "Beta speaks"], ["Drelkio", "Rosish"])
    every, at = layer_inputs(model, targets, batch), layer_inputs(model, targets, batch, at_predictions=True)
    for name in every:
        assert every[name].shape[0] == int(batch.attention_mask.sum()) and at[name].shape[0] == int(batch.target_mask.sum())
        last_prompt = int(batch.target_mask[0].nonzero()[0])  # first row predicting edit 0's answer: its prompt's last token
        assert torch.equal(at[name][0], every[name][last_prompt])
