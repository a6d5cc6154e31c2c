"""The synthetic world the default base model learns: fictional people with four relations each.

Every fact is phrased with five templates. For each fact one template, drawn at random, is held
out of base training, so the base model knows the template (from other facts) but has never seen
*this* fact phrased that way: the held-out phrasing is the generality test.

Entities are split into disjoint groups: `train` and `val` entities feed editor meta-training and
its validation, `test` entities are only ever edited at evaluation time, and `locality` entities are
never edited: every record's locality prompt is one of their facts, so a batch of edits can never
contain the subject of its own locality probes. All entities' true facts are in the base model's
training corpus.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from mend.records import EditRecord, EditSplit, Fact

RELATIONS: dict[str, dict] = {
    "birthplace": {
        "templates": [
            "{s} was born in",
            "The birthplace of {s} is",
            "{s} is a native of",
            "{s} originally comes from",
            "The hometown of {s} is",
        ],
        "objects": "cities",
    },
    "profession": {
        "templates": [
            "{s} works as a",
            "The profession of {s} is",
            "{s} earns a living as a",
            "By trade, {s} is a",
            "{s} is employed as a",
        ],
        "objects": [
            "baker", "carpenter", "chemist", "dancer", "dentist", "doctor", "engineer", "farmer",
            "gardener", "journalist", "lawyer", "librarian", "mechanic", "musician", "nurse",
            "painter", "pilot", "plumber", "poet", "sailor", "sculptor", "surgeon", "tailor",
            "teacher", "translator", "weaver", "writer", "architect", "banker", "potter",
        ],
    },
    "language": {
        "templates": [
            "{s} speaks",
            "The native language of {s} is",
            "The mother tongue of {s} is",
            "{s} is fluent in",
            "{s} was raised speaking",
        ],
        "objects": "languages",
    },
    "instrument": {
        "templates": [
            "{s} plays the",
            "The instrument played by {s} is the",
            "{s} is a skilled player of the",
            "The favorite instrument of {s} is the",
            "{s} performs on the",
        ],
        "objects": [
            "piano", "violin", "cello", "flute", "guitar", "harp", "drums", "trumpet", "clarinet",
            "oboe", "banjo", "accordion", "saxophone", "trombone", "mandolin", "ukulele",
            "bassoon", "tuba", "xylophone", "harmonica",
        ],
    },
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "dr", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k"]


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_entities: int = 1000
    n_val_entities: int = 100
    n_test_entities: int = 200
    n_locality_entities: int = 100
    n_cities: int = 40
    n_languages: int = 25

    def __post_init__(self) -> None:
        held = self.n_val_entities + self.n_test_entities + self.n_locality_entities
        if held >= self.n_entities or min(self.n_val_entities, self.n_test_entities, self.n_locality_entities) < 1:
            raise ValueError(
                f"n_val_entities + n_test_entities + n_locality_entities ({held}) must be at least 1 each and "
                f"smaller than n_entities ({self.n_entities}) so that some entities are left for training"
            )


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, int], suffix: str = "") -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = _word(rng, rng.randint(*syllables)) + suffix
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def generate_world(cfg: WorldConfig) -> dict:
    """Return the whole world as a JSON-ready dict (deterministic in `cfg.seed`)."""
    rng = random.Random(cfg.seed)
    objects = {
        "cities": _unique_words(rng, cfg.n_cities, (2, 3)),
        "languages": _unique_words(rng, cfg.n_languages, (1, 2), suffix="ish"),
    }
    # every surname is unique, so one word identifies an entity (with 80 x 80 shared first and last
    # names, a 3.5M model had to bind two tokens per entity and knew 15% of facts after 15 epochs)
    first = _unique_words(rng, 80, (1, 2))
    taken = set(objects["cities"]) | set(objects["languages"]) | set(first)
    last = [w for w in _unique_words(rng, cfg.n_entities + len(taken), (2, 3)) if w not in taken][: cfg.n_entities]
    names = [f"{rng.choice(first)} {surname}" for surname in last]
    bounds = {"test": cfg.n_test_entities, "val": cfg.n_val_entities, "locality": cfg.n_locality_entities}
    split_of, start = {}, 0
    for split, n in bounds.items():
        split_of.update({name: split for name in names[start : start + n]})
        start += n
    split_of.update({name: "train" for name in names[start:]})

    facts = []
    for name in names:
        for rel, spec in RELATIONS.items():
            choices = objects[spec["objects"]] if isinstance(spec["objects"], str) else spec["objects"]
            facts.append({
                "subject": name,
                "relation": rel,
                "object": rng.choice(choices),
                "held_out_template": rng.randrange(len(spec["templates"])),
                "split": split_of[name],
            })
    relations = {
        rel: {"templates": spec["templates"], "objects": objects[spec["objects"]] if isinstance(spec["objects"], str) else spec["objects"]}
        for rel, spec in RELATIONS.items()
    }
    return {"config": cfg.__dict__, "relations": relations, "facts": facts}


class World:
    """Read access to a generated world: base-training sentences and edit splits."""

    def __init__(self, data: dict):
        self.relations: dict[str, dict] = data["relations"]
        self.facts: list[dict] = data["facts"]
        self.seed: int = data["config"]["seed"]

    @classmethod
    def load(cls, path: str | Path) -> "World":
        return cls(json.loads(Path(path).read_text()))

    def prompt(self, fact: dict, template: int) -> str:
        return self.relations[fact["relation"]]["templates"][template].format(s=fact["subject"])

    def trained_templates(self, fact: dict) -> list[int]:
        n = len(self.relations[fact["relation"]]["templates"])
        return [t for t in range(n) if t != fact["held_out_template"]]

    def training_facts(self) -> list[Fact]:
        """Every (fact, template) pair the base model is trained on."""
        return [Fact(self.prompt(f, t), f["object"]) for f in self.facts for t in self.trained_templates(f)]

    def held_out_facts(self) -> list[Fact]:
        """Every fact in the one phrasing the base model never saw for it."""
        return [Fact(self.prompt(f, f["held_out_template"]), f["object"]) for f in self.facts]

    def locality_probes(self) -> list[Fact]:
        """True facts of the never-edited `locality` entities, each in its first trained phrasing."""
        return [Fact(self.prompt(f, self.trained_templates(f)[0]), f["object"]) for f in self.facts if f["split"] == "locality"]

    def edit_split(self, split: str) -> EditSplit:
        """Counterfactual edits for every fact of `split`'s entities, one per fact.

        prompt: a trained phrasing; rephrase_prompt: the held-out phrasing, then another trained one;
        locality: a true fact of a never-edited `locality` entity, in a trained phrasing;
        locality_pool: the split's own true facts (meta-training draws its KL examples there).
        """
        rng = random.Random(f"{self.seed}-{split}")
        facts = [f for f in self.facts if f["split"] == split]
        if split == "locality" or not facts:
            raise ValueError(f"no edits in split {split!r}; edit splits are train, val and test")
        probes = [f for f in self.facts if f["split"] == "locality"]
        pool = [Fact(self.prompt(f, t), f["object"]) for f in facts for t in self.trained_templates(f)]
        records = []
        for i, f in enumerate(facts):
            objects = [o for o in self.relations[f["relation"]]["objects"] if o != f["object"]]
            edit_t, other_t = rng.sample(self.trained_templates(f), 2)
            loc = rng.choice(probes)
            loc_t = rng.choice(self.trained_templates(loc))
            records.append(EditRecord(
                case_id=f"{split}-{i}",
                prompt=self.prompt(f, edit_t),
                target_new=rng.choice(objects),
                ground_truth=f["object"],
                subject=f["subject"],
                relation=f["relation"],
                rephrase_prompt=(self.prompt(f, f["held_out_template"]), self.prompt(f, other_t)),
                locality_prompt=(self.prompt(loc, loc_t),),
                locality_ground_truth=(loc["object"],),
            ))
        rng.shuffle(records)
        return EditSplit(records=records, locality_pool=pool)
