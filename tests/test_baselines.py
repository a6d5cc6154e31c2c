import pytest
import torch

from mend.baselines import FineTune, FTConfig
from mend.editing import edited_weights
from mend.errors import ConfigError
from mend.metrics import locality_reference, measure
from mend.targets import resolve_targets


def test_ft_and_ft_kl_reach_the_target_on_target_layers_only(gpt2, world):
    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=2)
    record = world.edit_split("test").records[0]
    ref = locality_reference(model, tok, [record])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in (FineTune(targets, FTConfig(lr=1.0, max_steps=50)),
                   FineTune(targets, FTConfig(lr=1.0, max_steps=50, c_kl=1.0), kl_pool=world.edit_split("train").locality_pool)):
        deltas = method.deltas(model, tok, [record])
        assert set(deltas) == {t.param_name for t in targets}
        (m,) = measure(model, tok, [record], edited_weights(model, deltas), ref)
        assert m.reliability_em == 1.0, method.name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # deltas only, no writes


def test_ft_kl_without_a_pool_is_a_config_error(gpt2):
    with pytest.raises(ConfigError, match="pool of unrelated facts"):
        FineTune(resolve_targets(gpt2[0], n_last_blocks=2), FTConfig(c_kl=1.0))
