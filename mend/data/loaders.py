"""Load edit datasets into `EditRecord`s: the synthetic world, zsRE (MEND format) and CounterFact
(EasyEdit format). Every loader yields the same record type and a pool of unrelated true facts
(for locality terms in meta-training and for FT+KL)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from mend.data.world import World
from mend.errors import ConfigError
from mend.records import EditRecord, EditSplit, Fact
from mend.resources import WORLD

log = logging.getLogger(__name__)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # the default paths.shared_data
SHARED_FILES = {
    "counterfact": "counterfact/counterfact-train.json",
    "counterfact_val": "counterfact/counterfact-val.json",
    "zsre": "zsre/zsre_mend_train_1k.json",
    "wikitext": "wikitext/wikitext2_valid.txt",  # held-out text for perplexity
}


def shared_file(name: str, shared_data: str | Path = SHARED_DATA) -> str:
    return str(Path(shared_data) / SHARED_FILES[name])


def _read_json(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset file {path} not found")
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path} should hold a non-empty JSON list of records")
    return data


def _pool(records: list[EditRecord]) -> list[Fact]:
    """True facts found in the records: their own (prompt, ground_truth) and locality pairs."""
    facts = [Fact(r.prompt, r.ground_truth) for r in records if r.ground_truth.strip()]
    facts += [Fact(p, a) for r in records for p, a in zip(r.locality_prompt, r.locality_ground_truth) if a.strip()]
    return facts


def load_counterfact(path: str | Path) -> list[EditRecord]:
    return [EditRecord.from_dict(d) for d in _read_json(path)]


def load_zsre(path: str | Path) -> list[EditRecord]:
    """zsRE in MEND's format. Records whose new answer (`alt`) is empty cannot be edits and are
    skipped with a warning (the shared 1k file has a few)."""
    records, skipped = [], 0
    for i, d in enumerate(_read_json(path)):
        missing = {"src", "alt", "rephrase", "loc", "loc_ans"} - set(d)
        if missing:
            raise ConfigError(f"{path} record {i} lacks zsRE field(s) {sorted(missing)}; is this a MEND-format zsRE file?")
        if not d["alt"].strip():
            skipped += 1
            continue
        records.append(EditRecord(
            case_id=str(i), prompt=d["src"], target_new=d["alt"], subject=d.get("subject", ""),
            ground_truth=(d.get("answers") or [""])[0], rephrase_prompt=(d["rephrase"],),
            locality_prompt=(d["loc"],), locality_ground_truth=(d["loc_ans"],),
        ))
    if skipped:
        log.warning("%s: skipped %d record(s) with an empty new answer (alt)", path, skipped)
    return records


def dataset_path(dataset: str, split: str, path: str | None = None, shared_data: str | Path = SHARED_DATA) -> str:
    """The file `load_split` reads: `path` when given, else the dataset's default for the split in
    `shared_data` (CounterFact's test file is counterfact-val)."""
    if dataset not in ("synthetic", "counterfact", "zsre"):
        raise ConfigError(f"unknown dataset {dataset!r}; use one of synthetic, counterfact, zsre")
    if path:
        return str(path)
    if dataset == "synthetic":
        return str(WORLD)
    return shared_file("counterfact_val" if dataset == "counterfact" and split == "test" else dataset, shared_data)


def load_split(dataset: str, split: str, path: str | None = None, val_size: int = 200, seed: int = 0,
               shared_data: str | Path = SHARED_DATA, test_size: int = 0) -> EditSplit:
    """`split` is train, val or test, or several joined by "+" (test+val: both, in that order). For the
    synthetic world these are disjoint entity sets. For a file dataset, `train`/`val` are a seeded
    split of the file (val: `val_size` records) and `test` is the whole test file (CounterFact's is
    counterfact-val). Where the test file is the train file (the shared zsRE file), `test_size` > 0
    holds that many seeded records out as `test`, and neither train nor val contains them; a file of
    your own (`path`) is tested whole."""
    if "+" in split:
        parts = [load_split(dataset, part, path, val_size, seed, shared_data, test_size) for part in split.split("+")]
        return EditSplit.joined(parts)
    file = dataset_path(dataset, split, path, shared_data)
    if dataset == "synthetic":
        return World.load(file).edit_split(split)
    records = {"counterfact": load_counterfact, "zsre": load_zsre}[dataset](file)
    held = test_size if not path and file == dataset_path(dataset, "train", None, shared_data) else 0
    if split != "test" or held:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        wanted = {"test": order[:held], "val": order[held:held + val_size], "train": order[held + val_size:]}[split]
        records = [records[i] for i in sorted(wanted)]
    return EditSplit(records=records, locality_pool=_pool(records))


def dataset_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
