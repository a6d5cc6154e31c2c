"""What a base model is trained on: true statements ("prompt answer") and, optionally, running text.

Two corpora (or `none`: the extra fact files alone):
- `synthetic`: the embedded world's facts (the default base model, self-contained);
- `facts`: true statements from the real CounterFact and zsRE files in the shared data folder
  (each record's prompt, paraphrase and locality prompt with their true answers) and running
  English from WikiText-2, so that edits of real facts can be measured on a model that knows them.

Either corpus takes extra fact files in CounterFact (EasyEdit) or zsRE (MEND) format, checked
record by record before anything is trained. The corpus recipe (files, sha256, counts) is kept with
the built model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mend.data.loaders import SHARED_FILES, dataset_hash
from mend.data.world import World
from mend.errors import ConfigError
from mend.records import Fact


@dataclass
class Corpus:
    statements: list[Fact]  # trained as "prompt answer"
    text: list[str] = field(default_factory=list)  # running-text paragraphs
    probes: dict[str, list[Fact]] = field(default_factory=dict)  # named fact sets whose accuracy is reported
    recipe: dict = field(default_factory=dict)

    def add(self, source: str, path: Path, groups: dict[str, list[Fact]]) -> None:
        """Add one file's facts: every group is trained on and is a probe named `source/group`."""
        for name, facts in groups.items():
            self.statements += facts
            self.probes.setdefault(f"{source}/{name}", []).extend(facts)
        self.recipe.setdefault("files", []).append({
            "source": source, "path": str(path), "sha256": dataset_hash(path),
            "statements": {name: len(facts) for name, facts in groups.items()},
        })


def _text(value, path: Path, i: int, key: str, required: bool = True) -> list[str]:
    """A record field that is a string or a list of strings, as a list of non-empty strings."""
    values = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{path} record {i}: {key!r} should be a string or a list of strings, not {value!r}")
    values = [v.strip() for v in values if v.strip()]
    if required and not values:
        raise ConfigError(f"{path} record {i}: {key!r} is missing or empty")
    return values


# each format's fields: prompt, its true answer(s), paraphrase(s), locality prompt(s), their answers
FIELDS = {"counterfact": ("prompt", "ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"),
          "zsre": ("src", "answers", "rephrase", "loc", "loc_ans")}


def read_fact_file(path: str | Path) -> tuple[str, dict[str, list[Fact]]]:
    """(format, {group: facts}) of a CounterFact (EasyEdit: prompt, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth) or zsRE (MEND: src, answers, rephrase, loc, loc_ans) file.
    True statements only: `target_new` / `alt` (the counterfactual) is never trained on. A
    malformed record is an error naming the file and the record number."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"fact file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON file: {e}") from e
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path} should hold a non-empty JSON list of CounterFact or zsRE records")
    if not isinstance(data[0], dict) or not ({"src", "prompt"} & set(data[0])):
        raise ConfigError(f"{path} record 0 has neither 'prompt' (CounterFact) nor 'src' (zsRE): unknown format")
    fmt = "zsre" if "src" in data[0] else "counterfact"
    prompt_key, answer_key, rephrase_key, loc_key, loc_ans_key = FIELDS[fmt]
    groups: dict[str, list[Fact]] = {"prompts": [], "paraphrases": [], "locality": []}
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ConfigError(f"{path} record {i} is not a JSON object")
        prompt, answer = _text(d.get(prompt_key), path, i, prompt_key), _text(d.get(answer_key), path, i, answer_key)
        rephrase = _text(d.get(rephrase_key), path, i, rephrase_key, required=False)
        loc = _text(d.get(loc_key), path, i, loc_key, required=False)
        loc_ans = _text(d.get(loc_ans_key), path, i, loc_ans_key, required=bool(loc))
        if len(loc) != len(loc_ans):
            raise ConfigError(f"{path} record {i}: {len(loc)} locality prompts but {len(loc_ans)} answers")
        groups["prompts"] += [Fact(p, answer[0]) for p in prompt]
        groups["paraphrases"] += [Fact(p, answer[0]) for p in rephrase]
        groups["locality"] += [Fact(p, a) for p, a in zip(loc, loc_ans)]
    return fmt, groups


def synthetic_corpus(world_path: str | Path) -> Corpus:
    world = World.load(world_path)
    facts = world.training_facts()
    return Corpus(statements=facts, probes={"train_facts": facts, "held_out_phrasing": world.held_out_facts()},
                  recipe={"world": {"path": str(world_path), "sha256": dataset_hash(world_path)}})


FACT_FILES = tuple(SHARED_FILES[name] for name in ("counterfact", "counterfact_val", "zsre"))
WIKITEXT = SHARED_FILES["wikitext"]


def facts_corpus(shared_data: str | Path, text_holdout_chars: int) -> Corpus:
    """True statements of the shared CounterFact and zsRE files, and WikiText-2 (valid) minus its
    first `text_holdout_chars` characters, which stay held out for perplexity."""
    root = Path(shared_data)
    missing = [name for name in (*FACT_FILES, WIKITEXT) if not (root / name).is_file()]
    if missing:
        raise ConfigError(f"the facts corpus needs {missing} under {root} (set paths.shared_data to the shared data folder)")
    corpus = Corpus(statements=[])
    for name in FACT_FILES:
        fmt, groups = read_fact_file(root / name)
        corpus.add(fmt, root / name, groups)
    wiki = root / WIKITEXT
    lines = wiki.read_text(encoding="utf-8")[text_holdout_chars:].splitlines()
    corpus.text = [line.strip() for line in lines[1:] if line.strip()]  # the first line may be cut
    corpus.recipe["text"] = {"path": str(wiki), "sha256": dataset_hash(wiki), "held_out_chars": text_holdout_chars,
                             "paragraphs": len(corpus.text)}
    return corpus


def build_corpus(kind: str, world_path: str | Path, shared_data: str | Path, extra_facts: tuple[str, ...],
                 text_holdout_chars: int) -> Corpus:
    """The corpus `kind` (synthetic | facts) plus `extra_facts` files; every file is read and checked first."""
    extras = [(Path(p), *read_fact_file(p)) for p in extra_facts]
    if kind == "none":
        if not extras:
            raise ConfigError("base_model.corpus=none trains on base_model.extra_facts alone: give at least one file")
        corpus = Corpus(statements=[])
    elif kind == "synthetic":
        corpus = synthetic_corpus(world_path)
    elif kind == "facts":
        corpus = facts_corpus(shared_data, text_holdout_chars)
    else:
        raise ConfigError(f"unknown base_model.corpus {kind!r}; use synthetic, facts or none (extra_facts only)")
    for path, fmt, groups in extras:
        corpus.add(f"extra:{path.name}", path, groups)
    unique = list(dict.fromkeys(corpus.statements))  # a fact given by several files is trained once per epoch
    corpus.recipe["counts"] = {"statements": len(corpus.statements), "distinct_statements": len(unique),
                               "text_paragraphs": len(corpus.text)}
    corpus.statements = unique
    return corpus
