import pytest
import torch

from mend.errors import ConfigError
from mend.models import bf16_autocast, load_model, resolve_device


def test_loads_local_gpt2_and_llama_frozen_in_eval_mode(gpt2, llama):
    for model, tok in (gpt2, llama):
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
        assert tok.pad_token_id is not None
        out = model(**tok(["Alpha was born in"], return_tensors="pt"))
        assert out.logits.shape[-1] == model.config.vocab_size


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no model at .*mend build-base"):
        load_model(tmp_path / "nothing")


def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_autocast_is_explicit_or_measured():
    cpu = torch.device("cpu")
    assert bf16_autocast(True, cpu) is True and bf16_autocast("false", cpu) is False
    auto = bf16_autocast("auto", cpu)  # measured on this CPU: faster bf16 matmuls (AVX512-BF16 / AMX) or not
    assert auto in (True, False) and bf16_autocast("auto", cpu) is auto
    with pytest.raises(ConfigError, match="true, false or auto"):
        bf16_autocast("fast", cpu)
