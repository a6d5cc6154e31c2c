"""`mend.sites`: the keys are each matrix's real inputs at the prompt's last token, and transfer and
crosstalk are what a least-squares edit of that matrix really does there."""

from dataclasses import replace

import pytest
import torch

from mend.batching import encode, logits
from mend.models import load_model
from mend.sites import prediction_keys, site_report
from mend.targets import resolve_targets
from mend_cli.main import main


def _outputs(model, tok, target, prompts, weights=None):
    """The target module's output at each prompt's last token."""
    batch = encode(tok, prompts, ["x"] * len(prompts))
    last = batch.target_mask.float().argmax(1)
    out = {}
    module = dict(model.named_modules())[target.name]
    handle = module.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    try:
        logits(model, batch, weights)
    finally:
        handle.remove()
    return out["y"][torch.arange(len(prompts)), last].double()


def test_transfer_and_crosstalk_are_what_the_edit_writes(trained_gpt2_dir, world):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    target = resolve_targets(model, patterns=[r"transformer\.h\.1\.mlp\.c_proj"])[0]
    split = world.edit_split("val")
    record = split.records[0]
    pool = world.edit_split("train").locality_pool
    (row,) = site_report(model, tok, [target], [record], pool, ridge=1e-2)

    # the least-interfering update that writes d at the edit's key, applied to the real weights
    k0 = prediction_keys(model, tok, [target], [f.prompt for f in pool])[target.param_name]
    c0 = k0.T @ k0 / k0.shape[0]
    a = c0 + 1e-2 * c0.diagonal().mean() * torch.eye(c0.shape[0], dtype=c0.dtype)
    k_e = prediction_keys(model, tok, [target], [record.prompt])[target.param_name][0]
    v = torch.linalg.solve(a, k_e)
    d = torch.randn(target.fan_out, dtype=torch.float64)
    delta = torch.outer(v / (k_e @ v), d)  # (fan_in, fan_out)
    params = dict(model.named_parameters())
    weights = {target.param_name: params[target.param_name] + target.to_weight_layout(delta.float())}
    prompts = [record.prompt, *record.rephrase_prompt, *record.locality_prompt]
    change = _outputs(model, tok, target, prompts, weights) - _outputs(model, tok, target, prompts)
    ratios = change @ d / (d @ d)
    assert torch.allclose(change[0], d, rtol=1e-3, atol=1e-3 * d.abs().max().item())  # the edit gets exactly d
    n_para = len(record.rephrase_prompt)
    assert abs(ratios[1:1 + n_para].mean().item() - row["transfer"]) < 1e-3
    assert abs(ratios[1 + n_para:].abs().mean().item() - row["crosstalk"][1]) < 1e-3


def test_a_prompt_is_its_own_perfect_paraphrase_and_worst_neighbour(trained_gpt2_dir, world):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    targets = resolve_targets(model, n_last_blocks=2)
    record = world.edit_split("val").records[0]
    same = replace(record, rephrase_prompt=(record.prompt,), locality_prompt=(record.prompt,), locality_ground_truth=())
    rows = site_report(model, tok, targets, [same], world.edit_split("train").locality_pool)
    assert [r["matrix"] for r in rows] == [t.name for t in targets] + ["together"]
    for r in rows:
        assert abs(r["transfer"] - 1) < 1e-9 and abs(r["crosstalk"][1] - 1) < 1e-9


def test_sites_command_prints_every_mlp_matrix(trained_gpt2_dir, world_path, capsys):
    assert main(["sites", f"paths.base_model={trained_gpt2_dir}", f"paths.world={world_path}", "device=cpu",
                 "sites.sizes=[1,5]", "sites.pool=200"]) == 0
    out = capsys.readouterr().out
    for i in (0, 1):
        assert f"transformer.h.{i}.mlp.c_fc" in out and f"transformer.h.{i}.mlp.c_proj" in out
    assert "N=5" in out


def test_sites_refuses_more_edits_than_the_split_has(trained_gpt2_dir, world_path):
    with pytest.raises(SystemExit, match="sites.sizes .* asks for 500 edits"):
        main(["sites", f"paths.base_model={trained_gpt2_dir}", f"paths.world={world_path}", "device=cpu", "sites.sizes=[500]"])


def test_each_size_is_the_report_of_that_many_edits_alone(trained_gpt2_dir, world):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    targets = resolve_targets(model, n_last_blocks=1)
    records, pool = world.edit_split("val").records[:6], world.edit_split("train").locality_pool[:100]
    together = site_report(model, tok, targets, records, pool, sizes=(2, 6))
    for n in (2, 6):
        alone = site_report(model, tok, targets, records[:n], pool)
        assert [r["crosstalk"][n] for r in together] == pytest.approx([r["crosstalk"][n] for r in alone], rel=1e-9)
