"""The evaluation harness on a tiny trained model: its numbers are the metrics module's numbers for
the same edits (batch and sequential), runs are deterministic, and a run directory holds the JSON
report, the markdown table and the plots."""

import json
import math

import pytest
import torch

from mend.baselines import FineTune, FTConfig
from mend.batching import encode
from mend.capture import edit_factors
from mend.editing import MendMethod, edited_weights
from mend.editor import EditorConfig, MendEditor
from mend.errors import ConfigError
from mend.harness import HarnessConfig, run_harness, select_records
from mend.metrics import locality_reference, measure, summarize
from mend.models import load_model
from mend.perplexity import HeldOutText, PerplexityConfig, perplexity
from mend.report import environment, write_run
from mend.targets import resolve_targets
from mend.model_state import edited_state


@pytest.fixture(scope="module")
def setup(trained_gpt2_dir, world, tmp_path_factory):
    """(model, tokenizer, [MEND, FT], 6 test edits, held-out text)."""
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    targets = resolve_targets(model, n_last_blocks=1)
    editor = MendEditor(targets, EditorConfig(rank=8, step_init=1e-2)).train()  # untrained: identity networks
    train = world.edit_split("train").records[:10]
    editor(edit_factors(model, targets, encode(tok, [r.prompt for r in train], [r.target_new for r in train])))
    methods = [MendMethod(editor.eval()), FineTune(targets, FTConfig(lr=1.0, max_steps=10))]
    records = select_records(world.edit_split("test").records, 6, seed=0)
    text_path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    text_path.write_text(" ".join(f"{f.prompt} {f.answer}." for f in world.training_facts()[:200]))
    text = HeldOutText.load(text_path, tok, model, PerplexityConfig(max_tokens=300))
    return model, tok, methods, records, text


CFG = HarnessConfig(modes=("batch", "sequential"), sizes=(1, 3), n_edits=6, perplexity_samples=1)


def _run(setup, cfg=CFG):
    model, tok, methods, records, text = setup
    return run_harness(model, tok, methods, records, cfg, lambda w: perplexity(model, text, w))


def _row(report, mode, method, size):
    (row,) = [r for r in report["rows"] if (r["mode"], r["method"], r["size"]) == (mode, method, size)]
    return row


def test_rows_match_the_metrics_module(setup):
    model, tok, methods, records, text = setup
    report = _run(setup)
    assert [(r["mode"], r["size"], r["method"]) for r in report["rows"]] == [
        (mode, size, m.name) for mode in ("batch", "sequential") for size in (1, 3) for m in methods]
    assert report["pre"] == summarize(measure(model, tok, records))
    assert report["perplexity_pre"] == perplexity(model, text)
    for method in methods:
        # batch of 3: two updates, each from the pristine weights
        direct, first = [], None
        for chunk in (records[:3], records[3:]):
            ref = locality_reference(model, tok, chunk)
            weights = edited_weights(model, method.deltas(model, tok, chunk))
            first = first or weights
            direct += measure(model, tok, chunk, weights, ref)
        row = _row(report, "batch", method.name, 3)
        assert row["post"] == summarize(direct) and row["n_updates"] == 2
        assert row["perplexity"] == perplexity(model, text, first)  # perplexity_samples=1: the first update
        assert row["perplexity_ratio"] == row["perplexity"] / report["perplexity_pre"]

        # sequences of 3: MEND through the service (every edit on the base weights, one least-squares
        # update of the active set: the batch update of the sequence); FT on the weights the earlier
        # edits left
        direct = []
        for sequence in (records[:3], records[3:]):
            ref = locality_reference(model, tok, sequence)  # pristine predictions
            if method.name == "MEND":
                weights = edited_weights(model, method.deltas(model, tok, sequence))
            else:
                weights = None
                for r in sequence:
                    weights = edited_weights(model, method.deltas(model, tok, [r], weights=weights), weights)
            direct += measure(model, tok, sequence, weights, ref)
        row = _row(report, "sequential", method.name, 3)
        assert row["post"] == summarize(direct) and row["n_updates"] == 6 and row["nonfinite"] == 0
        assert [m for m in row["per_edit"]] == [m.as_dict() for m in direct]
        assert [t for t, _ in row["retention"]] == [1, 2, 3]

    ft = _row(report, "sequential", "FT", 3)
    assert ft["at_edit"]["reliability_em"] == 1.0  # FT reaches every target when it is made


def test_sequential_baseline_edits_build_on_earlier_ones(setup):
    model, tok, methods, records, _ = setup
    for method in methods[1:]:
        first = edited_weights(model, method.deltas(model, tok, records[:1]))
        on_pristine = method.deltas(model, tok, records[1:2])
        empty = method.deltas(model, tok, records[1:2], weights={})
        assert all(torch.equal(on_pristine[k], empty[k]) for k in empty)
        on_edited = method.deltas(model, tok, records[1:2], weights=first)
        assert any(not torch.allclose(on_pristine[k], on_edited[k]) for k in on_edited), method.name
        both = edited_weights(model, on_edited, first)
        assert all(torch.equal(both[k], first[k] + on_edited[k]) for k in first)
    assert all(not p.requires_grad for p in model.parameters())


def test_a_sequential_run_leaves_the_model_as_it_was(setup):
    model, tok, methods, records, _ = setup
    before = edited_state(model)
    _run(setup, HarnessConfig(modes=("sequential",), sizes=(3,), n_edits=3, perplexity_samples=0))
    after = edited_state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in after.items())


def test_runs_are_deterministic_and_written_out(setup, tmp_path):
    a, b = _run(setup), _run(setup)
    strip = lambda rep: [{k: v for k, v in r.items() if k != "latency_s"} for r in rep["rows"]]  # noqa: E731
    assert strip(a) == strip(b) and a["pre"] == b["pre"]
    report = {"dataset": {"name": "tiny", "sha256": "x"}, "seed": 0, "versions": environment(),
              "harness": CFG.to_dict(), **a}
    paths = write_run(report, tmp_path / "run")
    loaded = json.loads(paths["report"].read_text())
    assert {"dataset", "seed", "versions", "harness", "pre", "perplexity_pre", "rows"} <= set(loaded)
    assert loaded["versions"]["torch"] == torch.__version__
    assert loaded["rows"][0]["post"] == a["rows"][0]["post"]
    for plot in ("batch", "sequential", "retention"):
        assert paths[f"plot_{plot}"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = paths["table"].read_text()
    assert "## Batch" in table and "## Sequential" in table and table.count("| MEND |") == 4


def test_perplexity_is_the_models_own_loss(setup):
    model, tok, _, _, text = setup
    assert text.chunks.shape[1] == model.config.n_positions and text.n_tokens <= 300
    with torch.no_grad():
        losses = [model(c[None], labels=c[None]).loss.item() for c in text.chunks]
    assert perplexity(model, text, batch_size=1) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="smaller than the largest size"):
        HarnessConfig(sizes=(1, 100), n_edits=50)
    with pytest.raises(ConfigError, match="unknown eval mode"):
        HarnessConfig(modes=("parallel",))


def test_record_selection_is_seeded(world):
    records = world.edit_split("test").records
    assert select_records(records, 5, 1) == select_records(records, 5, 1) != select_records(records, 5, 2)
