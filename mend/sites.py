"""Where to write edits: how well a linear edit of each candidate matrix singles out one fact.

Nothing is trained; this reads the base model's keys (each matrix's input where the model predicts
an answer: the prompt's last token). The update of a matrix that changes its output at an edit's
key k_e and least disturbs the keys of preserved text (the solve of `mend.aggregation` with C₀ of
`pool`'s keys and a ridge λ) changes its output at any other key x by

    r(x) = xᵀ A⁻¹ k_e / k_eᵀ A⁻¹ k_e   times the change at k_e,     A = C₀ + λ·mean(diag C₀)·I.

- transfer: the mean r over each edit's rephrasings (1: every paraphrase gets the whole edit);
- crosstalk: for N edits written at once, the mean over unrelated prompts (the records' locality
  prompts) of sqrt(Σ_e r(x)²): what N edits write into an unrelated prompt's output, relative to
  one edit's own change. For keys that are nearly orthogonal it grows as sqrt(N / d), d the
  number of key directions the matrix really uses: the capacity of that matrix as an edit memory.

A matrix whose transfer is near 1 and whose crosstalk stays well below 1 at the number of edits
you need holds them; `mend sites` prints both for every candidate, and for the candidates together
(the edit written in equal shares: consecutive blocks' keys are correlated, so spreading helps less
than independent leaks would).
"""

from __future__ import annotations

import torch

from mend.batching import encode, logits
from mend.capture import capture
from mend.records import EditRecord, Fact
from mend.targets import EditTarget


@torch.no_grad()
def prediction_keys(model, tokenizer, targets: list[EditTarget], prompts: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{param_name: (len(prompts), fan_in) float64}: each target's input at each prompt's last token."""
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {t.param_name: [] for t in targets}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = encode(tokenizer, chunk, ["x"] * len(chunk)).to(device)  # the answer is never read
        last = batch.target_mask.float().argmax(1)  # the position that predicts the answer's first token
        with capture(model, targets) as store:
            logits(model, batch)
        rows = torch.arange(len(chunk), device=device)
        for t in targets:
            out[t.param_name].append(store[t.param_name].u[rows, last].double().cpu())
    return {name: torch.cat(keys) for name, keys in out.items()}


def site_report(model, tokenizer, targets: list[EditTarget], records: list[EditRecord], pool: list[Fact],
                ridge: float = 1e-2, sizes: tuple[int, ...] | None = None) -> list[dict]:
    """One row per target: {"matrix", "fan_in", "transfer", "crosstalk": {N: value}}; transfer over all
    `records`' rephrasings, crosstalk of the first N records written at once over their locality
    prompts, for each N in `sizes` (default: all of them), C₀ from `pool`'s prompts. With several
    targets, a last row "together": each edit's change written in equal shares by every target (the
    shares add up in the residual stream, so their leaks add too)."""
    if not records or not pool:
        raise ValueError("site_report needs edit records and a pool of preserved prompts")
    sizes = sizes or (len(records),)
    if max(sizes) > len(records) or min(sizes) < 1:
        raise ValueError(f"sizes {list(sizes)} must lie between 1 and the {len(records)} records given")
    paraphrases = [(i, p) for i, r in enumerate(records) for p in r.rephrase_prompt]
    probes = [(i, p) for i, r in enumerate(records) for p in r.locality_prompt]
    if not paraphrases or not probes:
        raise ValueError("site_report needs records with rephrase and locality prompts")
    keys = {kind: prediction_keys(model, tokenizer, targets, prompts) for kind, prompts in (
        ("pool", [f.prompt for f in pool]), ("edit", [r.prompt for r in records]),
        ("para", [p for _, p in paraphrases]), ("probe", [p for _, p in probes]))}
    para_owner = torch.tensor([i for i, _ in paraphrases])
    probe_owner = torch.tensor([i for i, _ in probes])
    measured = []  # (target name, fan_in, transfer per paraphrase, leak (probes, edits))
    for t in targets:
        k0 = keys["pool"][t.param_name]
        c0 = k0.T @ k0 / k0.shape[0]
        a = c0 + ridge * c0.diagonal().mean() * torch.eye(c0.shape[0], dtype=c0.dtype)
        k_e = keys["edit"][t.param_name]
        v = torch.linalg.solve(a, k_e.T).T  # (edits, fan_in): A⁻¹ k_e
        own = (k_e * v).sum(1)
        transfer = (keys["para"][t.param_name] * v[para_owner]).sum(1) / own[para_owner]
        measured.append((t.name, t.fan_in, transfer, keys["probe"][t.param_name] @ v.T / own))
    if len(measured) > 1:
        measured.append(("together", sum(m[1] for m in measured), sum(m[2] for m in measured) / len(measured),
                         sum(m[3] for m in measured) / len(measured)))

    def crosstalk(leak: torch.Tensor, n: int) -> float:  # the first n edits, the first n records' probes
        return leak[probe_owner < n, :n].pow(2).sum(1).sqrt().mean().item()

    return [{"matrix": name, "fan_in": fan_in, "transfer": transfer.mean().item(),
             "crosstalk": {n: crosstalk(leak, n) for n in sizes}} for name, fan_in, transfer, leak in measured]
