"""Fine-tuning baselines on the same target layers as MEND.

FT: gradient steps on the edit prompts' target NLL until every target is the greedy answer, or
`max_steps`. FT+KL adds `c_kl · KL(pre || post)` on unrelated prompts (a pool distinct from the
prompts locality is measured on), the usual way to keep fine-tuning local.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mend.batching import TargetBatch, encode, logits, masked_kl, target_nll
from mend.errors import ConfigError
from mend.records import EditRecord, Fact
from mend.targets import EditTarget


@dataclass(frozen=True)
class FTConfig:
    lr: float = 1.0  # plain SGD; 1.0 reaches the target in ~2 steps on the default model
    max_steps: int = 25
    c_kl: float = 0.0  # > 0 makes it FT+KL
    kl_prompts: int = 16  # unrelated prompts per KL term

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.max_steps < 1 or self.c_kl < 0:
            raise ConfigError("FT needs lr > 0, max_steps >= 1 and c_kl >= 0")


class FineTune:
    def __init__(self, targets: list[EditTarget], cfg: FTConfig = FTConfig(), kl_pool: list[Fact] | None = None):
        if cfg.c_kl > 0 and not kl_pool:
            raise ConfigError("FT+KL needs a pool of unrelated facts for its KL term")
        self.targets, self.cfg, self.kl_pool = targets, cfg, kl_pool or []
        self.name = "FT+KL" if cfg.c_kl > 0 else "FT"

    def _kl_batch(self, tokenizer, records: list[EditRecord]) -> TargetBatch:
        subjects = {r.subject for r in records if r.subject}
        pool = [f for f in self.kl_pool if not any(s in f.prompt for s in subjects)]
        # a fixed, deterministic draw: the pool prompts spread evenly over the pool
        step = max(1, len(pool) // self.cfg.kl_prompts)
        chosen = pool[::step][: self.cfg.kl_prompts]
        return encode(tokenizer, [f.prompt for f in chosen], [f.answer for f in chosen])

    def deltas(self, model, tokenizer, records: list[EditRecord],
               weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`weights` (optional): the current edited weights to fine-tune from (sequential editing);
        the KL term of FT+KL then keeps the model close to those, its state before this edit."""
        device = next(model.parameters()).device
        current = weights or {}
        params = {**dict(model.named_parameters()), **current}
        base = {t.param_name: params[t.param_name].detach() for t in self.targets}
        trained = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        opt = torch.optim.SGD(trained.values(), lr=self.cfg.lr)
        batch = encode(tokenizer, [r.prompt for r in records], [r.target_new for r in records]).to(device)
        kl_batch = pre = None
        if self.cfg.c_kl > 0:
            kl_batch = self._kl_batch(tokenizer, records).to(device)
            with torch.no_grad():
                pre = logits(model, kl_batch, current)
        with torch.enable_grad():
            for _ in range(self.cfg.max_steps):
                weights = {**current, **trained}
                out = logits(model, batch, weights)
                with torch.no_grad():
                    hit = (out.argmax(-1) == batch.labels[:, 1:]) | ~batch.target_mask
                if bool(hit.all()):
                    break
                loss = target_nll(out, batch).sum()
                if kl_batch is not None:
                    loss = loss + self.cfg.c_kl * masked_kl(pre, logits(model, kl_batch, weights), kl_batch.attention_mask[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return {k: (trained[k] - base[k]).detach() for k in base}
