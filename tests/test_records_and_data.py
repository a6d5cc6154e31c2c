import json
from pathlib import Path

import pytest

from mend.batching import encode
from mend.data.loaders import SHARED_DATA, load_split
from mend.data.world import WorldConfig, generate_world
from mend.errors import InvalidEditError
from mend.records import EditRecord

FIELDS = {"prompt", "target_new", "ground_truth", "subject", "relation", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "case_id"}


def test_empty_prompt_or_target_is_refused(tokenizer):
    with pytest.raises(InvalidEditError, match="target_new is empty"):
        EditRecord(prompt="Alpha was born in", target_new="  ")
    with pytest.raises(InvalidEditError, match="prompt is empty"):
        EditRecord(prompt="", target_new="x")
    with pytest.raises(InvalidEditError, match="empty target"):
        encode(tokenizer, ["Alpha was born in"], [""])
    with pytest.raises(InvalidEditError, match="unknown edit field"):
        EditRecord.from_dict({"prompt": "a", "target_new": "b", "tagret": "c"})
    with pytest.raises(InvalidEditError, match="one answer per prompt"):
        EditRecord(prompt="a", target_new="b", locality_prompt=("x", "y"), locality_ground_truth=("z",))


def test_easyedit_dict_round_trip():
    d = {"prompt": "p", "target_new": "t", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "g"}
    r = EditRecord.from_dict(d)
    assert r.rephrase_prompt == ("r",) and EditRecord.from_dict(r.to_dict()) == r
    assert set(r.to_dict()) == FIELDS


def test_world_is_deterministic_and_splits_are_disjoint(world):
    cfg = WorldConfig(n_entities=60, n_val_entities=10, n_test_entities=10, n_locality_entities=10)
    assert generate_world(cfg) == generate_world(cfg)
    subjects = {s: {r.subject for r in world.edit_split(s).records} for s in ("train", "val", "test")}
    assert not (subjects["train"] & subjects["test"]) and not (subjects["val"] & subjects["test"])
    trained = {f.prompt for f in world.training_facts()}
    for r in world.edit_split("test").records:
        assert r.prompt in trained and r.rephrase_prompt[0] not in trained  # held-out phrasing never trained
        assert r.target_new != r.ground_truth and r.subject not in r.locality_prompt[0]


def test_committed_world_matches_its_generator():
    path = Path(__file__).parents[1] / "data" / "synthetic_world.json"
    data = json.loads(path.read_text())
    assert generate_world(WorldConfig(**data["config"])) == data


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (zsRE, CounterFact) is not beside the project")
@pytest.mark.parametrize("dataset", ["counterfact", "zsre"])
def test_real_datasets_load_into_the_same_records(dataset):
    for split in ("train", "val", "test"):
        s = load_split(dataset, split)
        assert s.records and s.locality_pool
        r = s.records[0]
        assert r.prompt and r.target_new and r.rephrase_prompt and r.locality_prompt and r.locality_ground_truth
    train, val = load_split(dataset, "train"), load_split(dataset, "val")
    assert not ({r.case_id for r in train.records} & {r.case_id for r in val.records})


def test_fact_keys_name_the_fact_an_edit_changes():
    a = EditRecord(prompt="Ann  was born\tin ", target_new="x", subject="Ann", relation="P19")
    assert ("prompt", "Ann was born in") in a.fact_keys() and ("fact", "Ann", "P19") in a.fact_keys()
    assert EditRecord(prompt="Ann was born in", target_new="y").fact_keys() == (("prompt", "Ann was born in"),)
    assert EditRecord.from_dict({"prompt": "p", "target_new": "t", "subject": "s", "relation": "r"}).relation == "r"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data (zsRE) is not beside the project")
def test_zsre_test_records_are_held_out_of_train_and_val_and_a_file_of_your_own_is_tested_whole(tmp_path):
    whole = load_split("zsre", "test").records
    splits = {s: load_split("zsre", s, val_size=100, test_size=200) for s in ("train", "val", "test")}
    ids = {s: {r.case_id for r in split.records} for s, split in splits.items()}
    assert (len(ids["test"]), len(ids["val"]), len(ids["train"])) == (200, 100, len(whole) - 300)
    assert not (ids["test"] & ids["train"]) and not (ids["test"] & ids["val"]) and not (ids["train"] & ids["val"])
    own = tmp_path / "my_zsre.json"
    own.write_text((SHARED_DATA / "zsre" / "zsre_mend_train_1k.json").read_text())
    assert len(load_split("zsre", "test", str(own), val_size=100, test_size=200).records) == len(whole)
