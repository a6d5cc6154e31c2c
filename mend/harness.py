"""The evaluation harness: every method, every mode and size, on the same base model and edits.

`run_harness` returns a plain dict (the report's measured part); `mend.report` writes it out as
JSON, a markdown table and plots. Deterministic given the seed: the seed picks the edits, and the
methods and metrics themselves draw no random numbers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass

from tqdm import tqdm

from mend.editing import EditMethod
from mend.errors import ConfigError
from mend.evaluation import Probe, evaluate_method, evaluate_sequential, pre_edit_metrics
from mend.records import EditRecord

log = logging.getLogger(__name__)
MODES = ("batch", "sequential")


@dataclass(frozen=True)
class HarnessConfig:
    modes: tuple[str, ...] = MODES
    sizes: tuple[int, ...] = (1, 10, 100)  # edits per update (batch) or per sequence (sequential)
    n_edits: int = 200  # edits drawn from the dataset; each (method, mode, size) uses all of them
    perplexity_samples: int = 2  # updates (batch) or sequences (sequential) whose perplexity is measured
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ConfigError(f"unknown eval mode(s) {sorted(unknown)}; use one or more of {list(MODES)}")
        if not self.sizes or min(self.sizes) < 1:
            raise ConfigError(f"eval sizes {list(self.sizes)} must be a non-empty list of integers >= 1")
        if self.n_edits < max(self.sizes):
            raise ConfigError(f"eval.n_edits ({self.n_edits}) is smaller than the largest size ({max(self.sizes)}): "
                              "raise n_edits or drop that size")
        if self.perplexity_samples < 0:
            raise ConfigError("eval.perplexity_samples must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def select_records(records: list[EditRecord], n: int, seed: int) -> list[EditRecord]:
    """`n` records in a seeded random order (all of them when there are fewer)."""
    if len(records) < n:
        log.warning("the dataset has %d records, fewer than eval.n_edits=%d: using all of them", len(records), n)
    return random.Random(seed).sample(records, min(n, len(records)))


def run_harness(model, tokenizer, methods: list[EditMethod], records: list[EditRecord], cfg: HarnessConfig,
                perplexity_of: Probe | None = None) -> dict:
    """{"pre": pre-edit metrics, "perplexity_pre": ..., "rows": one per (mode, size, method)}.

    `records` are used as given (see `select_records`). `perplexity_of(weights)` is held-out
    perplexity with `weights` overriding the model's parameters (None: the pristine model); each
    row's `perplexity_ratio` is its post-edit value over the pristine one (None without it)."""
    if len(records) < max(cfg.sizes):
        raise ConfigError(f"{len(records)} records cannot fill an update of {max(cfg.sizes)} edits: lower eval.sizes")
    probe = perplexity_of if cfg.perplexity_samples > 0 else None
    ppl_pre = probe(None) if probe is not None else None
    jobs = [(mode, size, method) for mode in cfg.modes for size in cfg.sizes for method in methods]
    rows = []
    for mode, size, method in tqdm(jobs, desc="eval", unit="run"):
        if mode == "batch":
            row = evaluate_method(model, tokenizer, method, records, size, probe, cfg.perplexity_samples)
        else:
            row = evaluate_sequential(model, tokenizer, method, records, size, probe, cfg.perplexity_samples)
        row["perplexity_ratio"] = row["perplexity"] / ppl_pre if row["perplexity"] is not None else None
        log.info("%s %s x%d: %s", mode, method.name, size,
                 " ".join(f"{k} {v:.3f}" for k, v in row["post"].items() if k.endswith("_em")))
        rows.append(row)
    return {"pre": pre_edit_metrics(model, tokenizer, records), "perplexity_pre": ppl_pre, "rows": rows}
