"""`mend train-editor` under torchrun: 2 gloo processes on the CPU against one process on the same
global batches."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def train(out, trained_gpt2_dir, world_path, launcher, *extra):
    args = [*extra, f"paths.base_model={trained_gpt2_dir}", f"paths.world={world_path}", f"paths.editor={out}", "device=cpu",
            "targets.n_last_blocks=2", "editor.rank=16", "train.steps=6", "train.val_every=6", "train.val_edits=4",
            "train.batch_sizes=[1,3,8]", "train.locality_per_step=4", "train.preserved_facts=50", "train.scored_edits=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "train-editor", *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to within 1e-3 of the tensor's largest entry. The ranks sum keys, losses and gradients in
    another order, and the solve and Adam's first steps amplify those roundings: measured 1e-7
    relative on CPUs with AVX512, up to 1.6e-4 of a network weight's scale (and 3.5e-6 absolute in
    C₀'s near-zero entries) on an AVX2-only CPU. A distribution bug (a rank's rows missing from a
    sum, a gradient not averaged) moves them by tens of percent."""
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= 1e-3 * a.abs().max() + 1e-12).all())


@pytest.mark.slow
def test_two_ddp_processes_train_the_editor_one_process_trains(tmp_path, trained_gpt2_dir, world_path):
    """Steps of 1, 3 and 8 edits (a rank with no edit of its own, then uneven shares), locality and C₀
    facts split between the ranks: the editor equals the single-process one up to the rounding of
    another summation order (`close`)."""
    single = train(tmp_path / "single", trained_gpt2_dir, world_path, [sys.executable, "-m", "mend_cli.main"])
    torchrun = [shutil.which("torchrun") or f"{os.path.dirname(sys.executable)}/torchrun", "--standalone", "--nproc_per_node=2",
                "--no-python", shutil.which("mend") or f"{os.path.dirname(sys.executable)}/mend"]
    ddp = train(tmp_path / "ddp", trained_gpt2_dir, world_path, torchrun)
    assert "on 2 processes" in ddp.stdout and ddp.stdout.count("meta-training an editor") == 1  # rank 0 alone logs
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("single", "ddp"))
    assert a.keys() == b.keys()
    for k in a:
        assert close(a[k], b[k]), (k, (a[k].double() - b[k].double()).abs().max(), a[k].double().abs().max())
    moved = [k for k in a if "up." in k and a[k].abs().max() > 0]
    assert moved  # the networks trained: their output projections start at zero
    meta = {d: json.loads((tmp_path / d / "editor.json").read_text()) for d in ("single", "ddp")}
    assert (meta["single"]["processes"], meta["ddp"]["processes"]) == (1, 2)
    assert meta["single"]["validation"]["step"] == meta["ddp"]["validation"]["step"] == 6

    fsdp = train(tmp_path / "fsdp", trained_gpt2_dir, world_path, torchrun, "train.fsdp=true")  # the base model sharded too
    assert "base model sharded: FSDP" in fsdp.stdout
    c = load_file(tmp_path / "fsdp" / "editor.safetensors")
    for k in a:
        assert close(a[k], c[k]), (k, (a[k].double() - c[k].double()).abs().max(), a[k].double().abs().max())
