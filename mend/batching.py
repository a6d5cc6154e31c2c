"""Turn (prompt, target) text pairs into padded tensors, and run a model on them.

One convention everywhere: the target follows the prompt after one space, and only target tokens
carry labels, so every loss and metric scores exactly the answer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.func import functional_call

from mend.errors import InvalidEditError

IGNORE = -100


@dataclass
class TargetBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) next-token labels aligned with input_ids; IGNORE outside targets

    def to(self, device) -> "TargetBatch":
        return TargetBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def target_mask(self) -> torch.Tensor:  # (B, T-1) positions whose prediction is a target token
        return self.labels[:, 1:] != IGNORE


def encode(tokenizer, prompts: list[str], targets: list[str], max_length: int | None = None) -> TargetBatch:
    """Tokenize `prompt + " " + target` pairs; labels mark the target tokens only."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return encode_ids(tokenizer, *tokenize_pairs(tokenizer, prompts, targets), max_length)


def tokenize_pairs(tokenizer, prompts: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of each target with its leading space."""
    for prompt, target in zip(prompts, targets):
        if not target.strip():
            raise InvalidEditError(f"empty target for prompt {prompt!r}: give the answer text")
    prompt_ids = [tokenizer(p.rstrip(), add_special_tokens=False)["input_ids"] for p in prompts]
    target_ids = [tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"] for t in targets]
    return prompt_ids, target_ids


def encode_ids(tokenizer, prompt_ids: list[list[int]], target_ids: list[list[int]], max_length: int | None = None) -> TargetBatch:
    """Pad token-id pairs into a batch. A sequence longer than `max_length` loses prompt tokens from
    the left, so the target and the words right before it always survive."""
    if not prompt_ids:
        raise ValueError("nothing to encode: give at least one (prompt, target) pair")
    max_length = min(max_length or getattr(tokenizer, "model_max_length", None) or 1024, 100_000)
    rows, label_rows = [], []
    for p_ids, t_ids in zip(prompt_ids, target_ids):
        if not t_ids:
            raise InvalidEditError("empty target: give the answer text")
        if len(t_ids) >= max_length:
            raise InvalidEditError(f"target is {len(t_ids)} tokens; the model takes at most {max_length - 1}")
        p_ids = p_ids[-(max_length - len(t_ids)):]
        if not p_ids:
            raise InvalidEditError("prompt is empty after tokenization: give text before the target")
        rows.append(list(p_ids) + list(t_ids))
        label_rows.append([IGNORE] * len(p_ids) + list(t_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return TargetBatch(input_ids, mask, labels)


def logits(model, batch: TargetBatch, weights: dict[str, torch.Tensor] | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T-1, V) next-token logits; `weights` overrides named parameters without touching the model.
    With `at`, a (B, T-1) bool mask (e.g. `batch.target_mask`), only those positions' logits, (n, V) in
    row-major order: the LM head, most of a small model's compute, then runs only there."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    keep_only = at is not None and _takes_logits_to_keep(model)
    if keep_only:  # transformers' slicing before the LM head; positions in input coordinates
        kwargs["logits_to_keep"] = torch.cat([at, at.new_zeros(at.shape[0], 1)], 1)
    out = functional_call(model, weights, args=(), kwargs=kwargs) if weights else model(**kwargs)
    if keep_only:
        return out.logits.float()
    return out.logits[:, :-1].float() if at is None else out.logits[:, :-1][at].float()


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def target_nll(logits_: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each example's target tokens; `logits_` (B, T-1, V), or
    (n, V) at the target positions only (`logits(..., at=batch.target_mask)`)."""
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE
    if logits_.dim() == 2:
        nll = -torch.log_softmax(logits_, -1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        per_example = nll.new_zeros(mask.shape[0]).index_add(0, mask.nonzero()[:, 0], nll)
        return per_example / mask.sum(-1).clamp(min=1)
    logp = torch.log_softmax(logits_, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def masked_kl(pre_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over masked positions of KL(pre || post), the locality penalty; divided by `count` instead
    of the number of masked positions when given (a share of a larger batch)."""
    pre_logp = torch.log_softmax(pre_logits, -1)
    post_logp = torch.log_softmax(post_logits, -1)
    kl = (pre_logp.exp() * (pre_logp - post_logp)).sum(-1)  # (B, T-1)
    return (kl * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)
