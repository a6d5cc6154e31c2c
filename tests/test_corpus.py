"""Base-model corpora: fact files of both formats, their checks, the recipe, and a tiny build that learns them."""

import json

import pytest

from mend.base_model import BaseModelConfig, build_base_model
from mend.data.corpus import build_corpus, read_fact_file
from mend.data.loaders import SHARED_DATA
from mend.errors import ConfigError

COUNTERFACT = [
    {"case_id": 1, "prompt": "The capital of Velmora is", "target_new": "Oslo", "subject": "Velmora", "ground_truth": "Tarrin",
     "rephrase_prompt": "Velmora has its capital in", "locality_prompt": "The capital of Quendor is", "locality_ground_truth": "Mibble"},
    {"case_id": 2, "prompt": "Anka Drowe plays the", "target_new": "flute", "subject": "Anka Drowe", "ground_truth": "oboe",
     "rephrase_prompt": ["Anka Drowe is a player of the"], "locality_prompt": [], "locality_ground_truth": []},
]
ZSRE = [
    {"subject": "Korlux", "src": "Which company makes Korlux?", "pred": "Ventrac", "rephrase": "Who manufactures Korlux?",
     "alt": "Nimbus", "answers": ["Ventrac"], "loc": "nq question: who painted the blue door", "loc_ans": "Ella Stroud"},
]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_both_formats_load_true_statements_only(tmp_path):
    fmt, groups = read_fact_file(write(tmp_path, "cf.json", COUNTERFACT))
    assert fmt == "counterfact"
    assert [(f.prompt, f.answer) for f in groups["prompts"]] == [("The capital of Velmora is", "Tarrin"), ("Anka Drowe plays the", "oboe")]
    assert [f.prompt for f in groups["paraphrases"]] == ["Velmora has its capital in", "Anka Drowe is a player of the"]
    assert [(f.prompt, f.answer) for f in groups["locality"]] == [("The capital of Quendor is", "Mibble")]
    fmt, groups = read_fact_file(write(tmp_path, "zsre.json", ZSRE))
    assert fmt == "zsre"
    assert {(f.prompt, f.answer) for g in groups.values() for f in g} == {
        ("Which company makes Korlux?", "Ventrac"), ("Who manufactures Korlux?", "Ventrac"),
        ("nq question: who painted the blue door", "Ella Stroud")}
    for g in groups.values():  # the counterfactual answer is never trained on
        assert all(f.answer != "Nimbus" for f in g)


@pytest.mark.parametrize("data, match", [
    (COUNTERFACT + [{"prompt": "X is", "rephrase_prompt": "X was"}], r"bad\.json record 2: 'ground_truth' is missing"),
    ([ZSRE[0], {**ZSRE[0], "answers": []}], r"bad\.json record 1: 'answers' is missing"),
    ([COUNTERFACT[0], {**COUNTERFACT[0], "locality_ground_truth": ["a", "b"]}], r"bad\.json record 1: 1 locality prompts but 2"),
    ([COUNTERFACT[0], {**COUNTERFACT[0], "prompt": 7}], r"bad\.json record 1: 'prompt' should be a string"),
    ({"prompt": "X"}, r"bad\.json should hold a non-empty JSON list"),
    ([{"question": "X"}], r"bad\.json record 0 has neither 'prompt'"),
])
def test_a_malformed_file_names_the_file_and_record_and_builds_nothing(tmp_path, data, match):
    bad = write(tmp_path, "bad.json", data)
    with pytest.raises(ConfigError, match=match):
        read_fact_file(bad)
    out = tmp_path / "model"
    cfg = BaseModelConfig(corpus="none", extra_facts=(str(write(tmp_path, "cf.json", COUNTERFACT)), str(bad)), device="cpu")
    with pytest.raises(ConfigError, match=match):
        build_base_model(cfg, out)
    assert not out.exists()


def test_a_tiny_build_learns_its_facts_and_writes_the_recipe(tmp_path):
    cf, zsre = write(tmp_path, "cf.json", COUNTERFACT), write(tmp_path, "zsre.json", ZSRE)
    cfg = BaseModelConfig(corpus="none", extra_facts=(str(cf), str(zsre)), vocab_size=300, n_layer=2, n_embd=32, n_head=2,
                          n_positions=64, batch_size=4, epochs=150, lr=5e-3, warmup_steps=10, eval_every_epochs=150,
                          statement_loss="answer",
                          device="cpu")
    report = build_base_model(cfg, tmp_path / "model")
    assert set(report["probes"]) == {f"extra:{n}/{g}" for n in ("cf.json", "zsre.json") for g in ("prompts", "paraphrases", "locality")}
    assert all(p["exact_match"] == 1.0 for p in report["probes"].values()), report["probes"]
    recipe = json.loads((tmp_path / "model" / "corpus_recipe.json").read_text())
    assert [(f["path"], f["statements"]) for f in recipe["files"]] == [
        (str(cf), {"prompts": 2, "paraphrases": 2, "locality": 1}), (str(zsre), {"prompts": 1, "paraphrases": 1, "locality": 1})]
    assert len(recipe["files"][0]["sha256"]) == 64 and recipe["counts"]["distinct_statements"] == 8


@pytest.mark.parametrize("field, value", [("dropout", 1.0), ("dropout", -0.1), ("embedding_lr", 0.0)])
def test_a_bad_training_setting_is_refused_before_anything_is_read(field, value):
    with pytest.raises(ConfigError, match=field):
        BaseModelConfig(**{field: value})


def test_a_statement_whose_answer_cannot_fit_the_context_is_left_out_and_counted(tmp_path):
    long = {**COUNTERFACT[0], "prompt": "The anthem of Velmora goes", "ground_truth": " ".join(["la"] * 40)}
    cfg = BaseModelConfig(corpus="none", extra_facts=(str(write(tmp_path, "cf.json", [long, COUNTERFACT[1]])),), vocab_size=300,
                          n_layer=1, n_embd=16, n_head=2, n_positions=16, epochs=1, eval_every_epochs=1, device="cpu")
    report = build_base_model(cfg, tmp_path / "model")
    recipe = json.loads((tmp_path / "model" / "corpus_recipe.json").read_text())
    # the long answer is its prompt's and its paraphrase's: both are left out
    assert recipe["counts"]["left_out_too_long"] == 2 and recipe["counts"]["distinct_statements"] == 5
    assert len(report["probes"]["extra:cf.json/prompts"]) == 2  # token_acc and exact_match, over the prompt that fits


@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason=f"the shared data folder {SHARED_DATA} is absent")
def test_the_facts_corpus_reads_the_shared_data_and_holds_out_perplexity_text(tmp_path):
    extra = write(tmp_path, "mine.json", COUNTERFACT)
    corpus = build_corpus("facts", "", SHARED_DATA, (str(extra),), text_holdout_chars=131072)
    files = [f["path"] for f in corpus.recipe["files"]]
    assert [p.rsplit("/", 1)[-1] for p in files] == ["counterfact-train.json", "counterfact-val.json", "zsre_mend_train_1k.json", "mine.json"]
    assert len(corpus.probes["counterfact/prompts"]) == 11919 and len(corpus.probes["zsre/prompts"]) == 1000
    held_out = (SHARED_DATA / "wikitext" / "wikitext2_valid.txt").read_text()[:131072]
    assert corpus.text and not any(p in held_out for p in corpus.text[:50] if len(p) > 200)
    assert len(corpus.statements) == corpus.recipe["counts"]["distinct_statements"] == len(set(corpus.statements))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "counterfact").is_dir(), reason=f"the shared data folder {SHARED_DATA} is absent")
def test_the_documented_facts_build_command_with_an_extra_file(tmp_path):
    from mend_cli.main import main

    extra = write(tmp_path, "mine.json", COUNTERFACT)
    tiny = ["base_model.n_layer=1", "base_model.n_embd=16", "base_model.n_head=2", "base_model.epochs=1",
            "base_model.batch_size=512", "base_model.text_chunks_per_epoch=64", "base_model.eval_facts=20",
            "base_model.vocab_size=600", "device=cpu"]
    assert main(["build-base", "profile=facts", f"base_model.extra_facts=[{extra}]", f"paths.base_model={tmp_path}/m", *tiny]) == 0
    recipe = json.loads((tmp_path / "m" / "corpus_recipe.json").read_text())
    assert recipe["files"][-1]["path"] == str(extra) and recipe["text"]["held_out_chars"] == 131072
    report = json.loads((tmp_path / "m" / "build_report.json").read_text())
    assert "extra:mine.json/prompts" in report["probes"] and report["config"]["corpus"] == "facts"
