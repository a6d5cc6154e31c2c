"""The shipped defaults (data/default, made by `mend ship`): they match the hashes their provenance
records, load, and edit held-out facts as recorded; commands use them unless something was built."""

import hashlib
import json
from pathlib import Path

import pytest

from mend.checkpoint import load_editor
from mend.data.world import World
from mend.editing import MendMethod
from mend.evaluation import evaluate_method
from mend.models import load_model
from mend.resources import SHIPPED as SHIPPED_DIR
from mend_cli.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict:
    return json.loads((SHIPPED_DIR / "PROVENANCE.json").read_text())


def test_shipped_files_match_their_recorded_hashes_and_size_limit():
    recorded = provenance()["sha256"]
    files = {str(f.relative_to(SHIPPED_DIR)): f for f in SHIPPED_DIR.rglob("*") if f.is_file() and f.name != "PROVENANCE.json"}
    assert set(files) == set(recorded)
    assert all(hashlib.sha256(f.read_bytes()).hexdigest() == recorded[name] for name, f in files.items())
    assert sum(f.stat().st_size for f in files.values()) <= 40 * 2**20


@pytest.mark.slow
def test_shipped_model_and_editor_edit_as_recorded():
    model, tok = load_model(SHIPPED_DIR / "base-model", device="cpu")
    method = MendMethod(load_editor(SHIPPED_DIR / "editor", model))
    recorded = provenance()["val_edits_greedy_em"]
    records = World.load(ROOT / "data" / "synthetic_world.json").edit_split("val").records[: recorded["records"]]
    got = evaluate_method(model, tok, method, records, batch_size=1)["post"]
    expected = recorded["shipped"]["1 per update"]
    # the same edits on another CPU may round differently; one edit in 50 either way
    assert all(abs(got[k] - v) <= 0.02 for k, v in expected.items()), (got, expected)
    assert got["reliability_em"] >= 0.9 and got["locality_em"] >= 0.9


def test_paths_default_to_the_home_then_the_shipped_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # nothing is looked up in the current directory
    cfg = load_config([])
    assert (cfg.paths.base_model, cfg.paths.editor) == (str(SHIPPED_DIR / "base-model"), str(SHIPPED_DIR / "editor"))
    assert (cfg.paths.runs, cfg.paths.journal) == (str(tmp_path / "home" / "runs"), str(tmp_path / "home" / "journal"))
    assert load_config([], builds=("base_model",)).paths.base_model == str(tmp_path / "home" / "base-model")  # build-base writes there
    (tmp_path / "home" / "editor").mkdir(parents=True)
    (tmp_path / "home" / "editor" / "editor.json").write_text("{}")
    cfg = load_config(["profile=facts"])
    assert cfg.paths.editor == str(tmp_path / "home" / "facts" / "editor")
    cfg = load_config(["paths.base_model=mine", "paths.journal=postgresql://db/mend"])
    assert (cfg.paths.base_model, cfg.paths.editor, cfg.paths.journal) == ("mine", str(tmp_path / "home" / "editor"), "postgresql://db/mend")
    monkeypatch.delenv("MEND_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert load_config([]).paths.home == str(tmp_path / "xdg" / "mend")


def test_a_user_config_dir_replaces_the_shipped_files_of_the_same_name(tmp_path, capsys):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "default.yaml").write_text("port: 7000\nlimits: {}\n")
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "mine.yaml").write_text("# @package _global_\nseed: 7\n")
    cfg = load_config(["profile=mine"], config_dir=str(tmp_path))
    assert (cfg.seed, cfg.server.port, cfg.train.steps) == (7, 7000, load_config([]).train.steps)
    with pytest.raises(SystemExit, match="not a directory"):
        load_config([], config_dir=str(tmp_path / "nowhere"))
