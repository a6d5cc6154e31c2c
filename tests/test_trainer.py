import json
import random

import pytest
import torch

from mend.aggregation import attach_memory
from mend.checkpoint import load_editor, read_meta
from mend.editor import EditorConfig, MendEditor
from mend.errors import ConfigError
from mend.models import load_model
from mend.targets import resolve_targets
from mend.trainer import TrainConfig, _locality_facts, calibrate_gates, meta_loss, train_editor


def held_out_meta_loss(model, tok, editor, split, cfg):
    """The meta-training objective on validation edits, with fixed locality draws."""
    rng = random.Random(1)
    total = 0.0
    for r in split.records[:16]:
        loc = _locality_facts(split.locality_pool, [r], 8, rng)
        with torch.no_grad():
            total += meta_loss(model, editor, tok, [r], loc, cfg)[0].item()
    return total / 16


@pytest.mark.slow
def test_short_meta_training_lowers_post_edit_loss(trained_gpt2_dir, world, tmp_path):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    report = json.loads((trained_gpt2_dir / "build_report.json").read_text())
    assert report["probes"]["train_facts"]["token_acc"] > 0.3  # the builder really taught the tiny model its facts
    targets = resolve_targets(model, n_last_blocks=2)
    train, val = world.edit_split("train"), world.edit_split("val")
    editor_cfg = EditorConfig(rank=32, step_init=1e-2)
    cfg = TrainConfig(steps=150, batch_sizes=(1, 4), lr=1e-3, step_lr=1e-3, val_every=50, val_edits=10, locality_per_step=8,
                      gate_pairs=((0.8, 0.8), (0.5, 0.3)), min_locality=0.0)

    untrained = MendEditor(targets, editor_cfg).train()
    for r in train.records[:20]:  # give the untrained editor the same kind of normalisation statistics
        meta_loss(model, untrained, tok, [r], train.locality_pool[:8], cfg)
    before = held_out_meta_loss(model, tok, untrained.eval(), val, cfg)

    report = train_editor(model, tok, targets, train, val, tmp_path, editor_cfg, cfg)
    after = held_out_meta_loss(model, tok, load_editor(tmp_path, model), val, cfg)
    assert after < 0.7 * before, (before, after)
    assert len(report["history"]) >= 1 and read_meta(tmp_path)["validation"]["step"] in (50, 100, 150)
    # the served gates are chosen on the validation records and written with the best checkpoint
    meta = read_meta(tmp_path)
    calibration = meta["calibration"]
    assert [(t["gate"], t["gate_last"]) for t in calibration["tried"]] == [(0.8, 0.8), (0.5, 0.3)]
    assert calibration["records"] == len(val.records)
    assert calibration["chosen"] == max(calibration["tried"], key=lambda t: (t["generality_em"], t["locality_em"]))
    assert (meta["editor"]["gate"], meta["editor"]["gate_last"]) == (calibration["chosen"]["gate"], calibration["chosen"]["gate_last"])


def test_calibration_keeps_the_locality_floor_or_leaves_the_gates_as_set(trained_gpt2_dir, tiny_editor_dir, world):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    editor = load_editor(tiny_editor_dir, model)
    configured, records = editor.cfg, world.edit_split("val").records[:20]
    pairs = [(0.0, 0.0), (1.0, 1.0), (0.5, 0.2)]
    chosen, tried = calibrate_gates(model, tok, editor, records, pairs, min_locality=0.0)
    assert [(t["gate"], t["gate_last"]) for t in tried] == pairs
    assert chosen == max(tried, key=lambda t: (t["generality_em"], t["locality_em"]))
    assert (editor.cfg.gate, editor.cfg.gate_last, editor.cfg.rank) == (chosen["gate"], chosen["gate_last"], configured.rank)
    floor = min(t["locality_em"] for t in tried if t["generality_em"] == chosen["generality_em"]) + 1e-6
    kept = [t for t in tried if t["locality_em"] >= floor]
    if kept:  # a stricter floor moves the choice to a pair that keeps it
        assert calibrate_gates(model, tok, editor, records, pairs, floor)[0] == max(kept, key=lambda t: (t["generality_em"], t["locality_em"]))
    editor.cfg = configured
    assert tried[0]["locality_em"] < 1.0  # ungated, 20 edits of the tiny model disturb some unrelated answer
    assert calibrate_gates(model, tok, editor, records, pairs[:1], min_locality=1.0) == (None, tried[:1])
    assert editor.cfg == configured
    with pytest.raises(ConfigError, match="gate_pairs"):
        TrainConfig(gate_pairs=((0.5,),))


def test_the_gated_meta_loss_is_the_plain_one_without_gate_and_trains_the_editor(trained_gpt2_dir, world):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    targets = resolve_targets(model, n_last_blocks=2)
    train = world.edit_split("train")
    records, loc = train.records[:3], train.locality_pool[:8]
    plain, gated = TrainConfig(), TrainConfig(gated=True)
    editor = MendEditor(targets, EditorConfig(rank=32, step_init=1e-2, gate=0.0, keep=0.0, compensate=0.0)).train()
    attach_memory(model, targets, 0.0)
    meta_loss(model, editor, tok, records, loc, plain)  # normalisation statistics
    editor.eval()  # no more statistics: both losses see the same editor
    a, _ = meta_loss(model, editor, tok, records, loc, plain)
    b, _ = meta_loss(model, editor, tok, records, loc, gated)  # ungated memory over every row: x P Uᵀ D = x S
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    editor.cfg = EditorConfig(rank=32, step_init=1e-2)  # the served gate and row selection
    attach_memory(model, targets, editor.cfg.gate)
    loss, _ = meta_loss(model, editor, tok, records, loc, gated)
    loss.backward()
    grads = [p.grad for p in editor.nets.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_c_rephrase_weights_the_paraphrases_in_the_edit_term(trained_gpt2_dir, world):
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    targets = resolve_targets(model, n_last_blocks=2)
    train = world.edit_split("train")
    records, loc = [r for r in train.records if r.rephrase_prompt][:3], train.locality_pool[:8]
    editor = MendEditor(targets, EditorConfig(rank=32, step_init=1e-2)).train()
    meta_loss(model, editor, tok, records, loc, TrainConfig())  # normalisation statistics
    editor.eval()
    with torch.no_grad():
        edit = {c: meta_loss(model, editor, tok, records, loc, TrainConfig(c_rephrase=c))[1]["edit"] for c in (0.0, 1.0, 3.0)}
    paraphrases = edit[1.0] - edit[0.0]  # the edit prompts' part is the same in all three
    assert paraphrases > 0 and edit[3.0] == pytest.approx(edit[0.0] + 3 * paraphrases, rel=1e-5)
    with pytest.raises(ConfigError, match="c_rephrase"):
        TrainConfig(c_rephrase=-1.0)
