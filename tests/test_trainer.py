import random

import pytest
import torch

from mend.checkpoint import load_editor, read_meta
from mend.editor import EditorConfig, MendEditor
from mend.targets import resolve_targets
from mend.trainer import TrainConfig, _locality_facts, meta_loss, train_editor


def post_edit_loss(model, tok, editor, split, cfg):
    rng = random.Random(1)
    parts = []
    for r in split.records[:8]:
        loc = _locality_facts(split.locality_pool, [r], 8, rng)
        with torch.no_grad():
            parts.append(meta_loss(model, editor, tok, [r], loc, cfg)[1]["edit"])
    return sum(parts) / len(parts)


@pytest.mark.slow
def test_short_meta_training_lowers_post_edit_loss(gpt2, world, tmp_path):
    model, tok = gpt2
    targets = resolve_targets(model, n_last_blocks=2)
    train, val = world.edit_split("train"), world.edit_split("val")
    editor_cfg = EditorConfig(rank=32, step_init=1e-2)
    cfg = TrainConfig(steps=120, batch_sizes=(1, 4), lr=1e-3, step_lr=1e-2, val_every=60, val_edits=10, locality_per_step=8)

    untrained = MendEditor(targets, editor_cfg).train()
    for r in train.records[:20]:  # give the untrained editor the same kind of normalisation statistics
        meta_loss(model, untrained, tok, [r], train.locality_pool[:8], cfg)
    untrained.eval()
    before = post_edit_loss(model, tok, untrained, val, cfg)

    report = train_editor(model, tok, targets, train, val, tmp_path, editor_cfg, cfg)
    trained = load_editor(tmp_path, model)
    after = post_edit_loss(model, tok, trained, val, cfg)
    assert after < 0.8 * before, (before, after)
    assert report["history"] and read_meta(tmp_path)["validation"]["step"] in (60, 120)
