"""Perplexity on held-out text (WikiText-2 by default): how much an edit damages the model at large.

The text is tokenized once, cut to `max_tokens` tokens and into non-overlapping chunks of the
model's context length; every token but the first of each chunk is predicted. The default base
model has never seen English, so its WikiText perplexity is high: what matters is the change an
edit makes (post / pre), measured on the same tokens for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mend.errors import ConfigError


@dataclass(frozen=True)
class PerplexityConfig:
    path: str | None = None  # None: the WikiText-2 validation file in ../shared/data (skipped if absent)
    max_tokens: int = 16384  # bounded: one measurement is one forward pass over this many tokens; 0 skips
    batch_size: int = 8  # chunks per forward pass

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or self.batch_size < 1:
            raise ConfigError("perplexity needs max_tokens >= 0 (0 skips it) and batch_size >= 1")


def context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024)


@dataclass(frozen=True)
class HeldOutText:
    path: str
    chunks: torch.Tensor  # (n_chunks, chunk_len) token ids; the last chunk is dropped when short

    @property
    def n_tokens(self) -> int:
        return self.chunks.numel()

    @classmethod
    def load(cls, path: str | Path, tokenizer, model, cfg: PerplexityConfig = PerplexityConfig()) -> "HeldOutText":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"held-out text {path} not found: set perplexity.path, or perplexity.max_tokens=0 to skip it")
        chunk = min(context_length(model), cfg.max_tokens)
        # a token rarely spans more than 8 characters: tokenize only what can be used
        text = path.read_text(encoding="utf-8")[: cfg.max_tokens * 8]
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][: cfg.max_tokens]
        n = len(ids) // chunk
        if n == 0:
            raise ConfigError(f"{path} holds fewer than {chunk} tokens: give a longer held-out text")
        return cls(str(path), torch.tensor(ids[: n * chunk]).view(n, chunk))


@torch.no_grad()
def perplexity(model, text: HeldOutText, weights: dict[str, torch.Tensor] | None = None, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over the held-out chunks; `weights` overrides named parameters."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(text.chunks), batch_size):
        ids = text.chunks[i : i + batch_size].to(device)  # (B, T)
        out = functional_call(model, weights, args=(ids,)) if weights else model(ids)
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
