"""The `mend` entry point end to end on a tiny model: config overrides reach the library."""

import json

import pytest

from mend.data.loaders import SHARED_DATA
from mend_cli.config import load_config
from mend_cli.main import _meta_train_split, _split, main


@pytest.mark.slow
def test_build_train_eval_bench_on_a_tiny_model(tmp_path, world_path, capsys):
    common = [f"paths.world={world_path}", f"paths.base_model={tmp_path}/base", f"paths.editor={tmp_path}/editor",
              f"paths.runs={tmp_path}/runs", "device=cpu"]
    tiny = ["base_model.n_layer=2", "base_model.n_embd=32", "base_model.n_head=2", "base_model.epochs=2",
            "base_model.eval_every_epochs=1", "base_model.eval_facts=20", "base_model.vocab_size=400"]
    assert main(["build-base", *common, *tiny]) == 0
    report = json.loads((tmp_path / "base" / "build_report.json").read_text())
    assert report["config"]["n_layer"] == 2 and len(report["history"]) == 2

    train = ["targets.n_last_blocks=1", "editor.rank=16", "train.steps=20", "train.val_every=10", "train.val_edits=10",
             "train.batch_sizes=[1,4]"]
    assert main(["train-editor", *common, *train]) == 0
    meta = json.loads((tmp_path / "editor" / "editor.json").read_text())
    assert [t["name"] for t in meta["targets"]] == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]

    batch = ["eval.n_edits=10", "mode=batch", "eval.sizes=[1,5]", "perplexity.max_tokens=512"]
    assert main(["eval", *common, *batch]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    report = json.loads((run / "report.json").read_text())
    rows = report["rows"]
    expected = [("batch", m, b) for b in (1, 5) for m in ("MEND", "FT", "FT+KL")]
    assert [(r["mode"], r["method"], r["size"]) for r in rows] == expected
    ft = next(r for r in rows if r["method"] == "FT" and r["size"] == 1)
    assert ft["post"]["reliability_tf"] > 0.5  # FT drives its edits to the target
    assert report["dataset"]["sha256"] and len(report["dataset"]["case_ids"]) == 10 and report["seed"] == 0
    assert (run / "batch.png").is_file() and (run / "table.md").is_file() and not (run / "sequential.png").exists()

    sequential = ["eval.n_edits=4", "mode=sequential", "method=ft", "eval.sizes=[2]", "perplexity.max_tokens=0"]
    assert main(["eval", *common, *sequential, "targets.n_last_blocks=1"]) == 0
    (run,) = set((tmp_path / "runs").iterdir()) - {run}
    report = json.loads((run / "report.json").read_text())
    assert [(r["mode"], r["method"], r["size"]) for r in report["rows"]] == [("sequential", "FT", 2)]
    assert report["perplexity_pre"] is None and (run / "sequential.png").is_file()

    assert main(["bench", *common, "bench.repeats=2", "bench.active_edits=20"]) == 0
    out = capsys.readouterr().out
    assert "forward+backward of the base model" in out and "start-up replay of the journal (20 active edits)" in out


def test_unknown_config_key_is_refused():
    with pytest.raises(SystemExit, match="unknown key"):
        main(["build-base", "+base_model.n_layers=2"])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (CounterFact, zsRE) is not beside the project")
def test_the_facts_editor_meta_trains_on_both_datasets_and_never_on_zsre_test_records():
    joined = _meta_train_split(load_config(["profile=facts"]))
    counterfact = _split(load_config(["profile=facts"]), "train").records
    zsre = load_config(["profile=facts", "dataset=zsre"])
    assert len(joined.records) == len(counterfact) + len(_split(zsre, "train").records)
    trained = {r.prompt for r in joined.records}
    assert not trained & {r.prompt for r in _split(zsre, "test").records}
    assert len(_split(zsre, "test").records) == zsre.dataset.test_size
    with pytest.raises(SystemExit, match="train_datasets names 'zsrE'"):
        _meta_train_split(load_config(["profile=facts", "train_datasets=[counterfact,zsrE]"]))
