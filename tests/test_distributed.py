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


@pytest.mark.slow
def test_two_ddp_processes_train_the_editor_one_process_trains(tmp_path, trained_gpt2_dir, world_path):
    """Steps of 1, 3 and 8 edits (a rank with no edit of its own, then uneven shares), locality and C₀
    facts split between the ranks: the editor equals the single-process one to float32 rounding
    (the ranks sum losses, gradients and C₀ in another order: 1e-5 relative, measured ~1e-7)."""
    single = train(tmp_path / "single", trained_gpt2_dir, world_path, [sys.executable, "-m", "mend_cli.main"])
    torchrun = [shutil.which("torchrun") or f"{os.path.dirname(sys.executable)}/torchrun", "--standalone", "--nproc_per_node=2",
                "--no-python", shutil.which("mend") or f"{os.path.dirname(sys.executable)}/mend"]
    ddp = train(tmp_path / "ddp", trained_gpt2_dir, world_path, torchrun)
    assert "on 2 processes" in ddp.stdout and ddp.stdout.count("meta-training an editor") == 1  # rank 0 alone logs
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("single", "ddp"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-7), (k, (a[k].double() - b[k].double()).abs().max())
    moved = [k for k in a if "up." in k and a[k].abs().max() > 0]
    assert moved  # the networks trained: their output projections start at zero
    meta = {d: json.loads((tmp_path / d / "editor.json").read_text()) for d in ("single", "ddp")}
    assert (meta["single"]["processes"], meta["ddp"]["processes"]) == (1, 2)
    assert meta["single"]["validation"]["step"] == meta["ddp"]["validation"]["step"] == 6

    fsdp = train(tmp_path / "fsdp", trained_gpt2_dir, world_path, torchrun, "train.fsdp=true")  # the base model sharded too
    assert "base model sharded: FSDP" in fsdp.stdout
    c = load_file(tmp_path / "fsdp" / "editor.safetensors")
    for k in a:
        assert torch.allclose(a[k].double(), c[k].double(), rtol=1e-5, atol=1e-7), (k, (a[k].double() - c[k].double()).abs().max())
