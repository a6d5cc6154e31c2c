"""Edit metrics, the same for the library, the server and the harness.

Each metric is reported two ways:
- teacher-forced token accuracy (`*_tf`, the EasyEdit convention): the share of target tokens that
  are the model's top-1 prediction given the true previous tokens;
- greedy exact match (`*_em`): greedy decoding reproduces the whole target. Greedy decoding emits
  token k+1 after exactly the target's first k tokens whenever those were all emitted, so greedy
  exact match equals "every teacher-forced position is top-1" and is computed from the same
  forward pass (tests check this against real greedy decoding).

Locality compares the edited model with the model before the edit on unrelated prompts:
`locality_tf` is the share of the pre-edit top-1 tokens (teacher-forced on the true answer) that
are unchanged; `locality_em` is whether greedy decoding of as many tokens as the true answer has
gives the same tokens as before. Before an edit, `locality_*` instead report the base model's
accuracy on the locality answers, so a reader sees how well it knew them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from mend.batching import encode_ids, logits, tokenize_pairs
from mend.records import EditRecord

Weights = dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class EditMetrics:
    reliability_tf: float
    reliability_em: float
    generality_tf: float  # NaN when the record has no paraphrase
    generality_em: float
    locality_tf: float  # NaN when the record has no locality prompt
    locality_em: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class LocalityReference:
    """The pre-edit predictions that locality is measured against, one entry per locality prompt."""

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]  # tokens of the true answer (teacher-forcing context)
    top1: list[list[int]]  # pre-edit top-1 token at each answer position
    greedy: list[list[int]]  # pre-edit greedy continuation, len(answer) tokens


@torch.no_grad()
def score_ids(model, tokenizer, prompt_ids, target_ids, weights: Weights = None, batch_size: int = 64):
    """Teacher-forced top-1 tokens for each pair: (list of (T_i,) tensors of predictions). A pair that
    occurs several times is run once; pairs are batched by length (little padding) and the LM head runs
    at target positions only."""
    device = next(model.parameters()).device
    pairs = [(tuple(p), tuple(t)) for p, t in zip(prompt_ids, target_ids)]
    unique = list(dict.fromkeys(pairs))
    order = sorted(unique, key=lambda pair: len(pair[0]) + len(pair[1]))
    preds = {}
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        batch = encode_ids(tokenizer, [list(p) for p, _ in chunk], [list(t) for _, t in chunk]).to(device)
        mask = batch.target_mask
        top1 = logits(model, batch, weights, at=mask).argmax(-1).cpu()  # (targets in the batch,)
        preds.update(zip(chunk, top1.split(mask.sum(1).tolist())))
    return [preds[pair] for pair in pairs]


def target_scores(model, tokenizer, prompts: list[str], targets: list[str], weights: Weights = None):
    """(token accuracy, exact match) per (prompt, target) pair."""
    if not prompts:
        return []
    p, t = tokenize_pairs(tokenizer, prompts, targets)
    preds = score_ids(model, tokenizer, p, t, weights)
    out = []
    for pred, tgt in zip(preds, t):
        hits = (pred == torch.tensor(tgt[: len(pred)])).float()
        out.append((hits.mean().item(), float(bool(hits.all()) and len(pred) == len(tgt))))
    return out


@torch.no_grad()
def greedy_decode(model, tokenizer, prompt_ids: list[list[int]], n_tokens: list[int], weights: Weights = None) -> list[list[int]]:
    """Greedy continuation of each prompt, `n_tokens[i]` tokens long (no KV cache: targets are short)."""
    device = next(model.parameters()).device
    seqs = [list(p) for p in prompt_ids]
    for step in range(max(n_tokens, default=0)):
        live = [i for i, n in enumerate(n_tokens) if n > step]
        dummy = [[0] for _ in live]  # one placeholder target token: logits at the last prompt position
        batch = encode_ids(tokenizer, [seqs[i] for i in live], dummy).to(device)
        out = logits(model, batch, weights)
        last = batch.attention_mask.sum(-1) - 2  # index of the last real token in the shifted logits
        nxt = out[torch.arange(len(live)), last].argmax(-1).tolist()
        for i, tok in zip(live, nxt):
            seqs[i].append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompt_ids)]


def locality_reference(model, tokenizer, records: list[EditRecord], weights: Weights = None) -> LocalityReference:
    prompts = [p for r in records for p in r.locality_prompt]
    answers = [a for r in records for a in (r.locality_ground_truth or ("",) * len(r.locality_prompt))]
    if any(not a.strip() for a in answers):
        raise ValueError("locality prompts need their true answers (locality_ground_truth) to be measured")
    p, a = tokenize_pairs(tokenizer, prompts, answers)
    top1 = [x.tolist() for x in score_ids(model, tokenizer, p, a, weights)] if p else []
    greedy = greedy_decode(model, tokenizer, p, [len(x) for x in a], weights)
    return LocalityReference(p, a, top1, greedy)


def _locality_after(model, tokenizer, ref: LocalityReference, weights: Weights):
    if not ref.prompt_ids:
        return []
    tf = score_ids(model, tokenizer, ref.prompt_ids, ref.answer_ids, weights)
    em = score_ids(model, tokenizer, ref.prompt_ids, ref.greedy, weights)
    return [
        ((pred == torch.tensor(pre)).float().mean().item(), float(bool((g == torch.tensor(pre_g)).all())))
        for pred, pre, g, pre_g in zip(tf, ref.top1, em, ref.greedy)
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def measure(model, tokenizer, records: list[EditRecord], weights: Weights = None, reference: LocalityReference | None = None) -> list[EditMetrics]:
    """Metrics for each record. Pass the pre-edit `reference` to measure locality after an edit;
    without it locality is the model's accuracy on the locality answers (the pre-edit report)."""
    rel = target_scores(model, tokenizer, [r.prompt for r in records], [r.target_new for r in records], weights)
    gen_pairs = [(i, p) for i, r in enumerate(records) for p in r.rephrase_prompt]
    gen = target_scores(model, tokenizer, [p for _, p in gen_pairs], [records[i].target_new for i, _ in gen_pairs], weights)
    if reference is None:
        loc_pairs = [(p, a) for r in records for p, a in zip(r.locality_prompt, r.locality_ground_truth)]
        loc = target_scores(model, tokenizer, [p for p, _ in loc_pairs], [a for _, a in loc_pairs], weights)
    else:
        loc = _locality_after(model, tokenizer, reference, weights)
    out, g, l_ = [], 0, 0
    for i, r in enumerate(records):
        gs = gen[g : g + len(r.rephrase_prompt)]
        g += len(r.rephrase_prompt)
        n_loc = len(r.locality_prompt) if reference is not None else len(r.locality_ground_truth)
        ls = loc[l_ : l_ + n_loc]
        l_ += n_loc
        out.append(EditMetrics(
            reliability_tf=rel[i][0], reliability_em=rel[i][1],
            generality_tf=_mean([x[0] for x in gs]), generality_em=_mean([x[1] for x in gs]),
            locality_tf=_mean([x[0] for x in ls]), locality_em=_mean([x[1] for x in ls]),
        ))
    return out


LocalityKey = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, answer ids)


@dataclass
class LocalityCache:
    """Pre-edit predictions on locality prompts under the live weights of one revision:
    {(prompt ids, answer ids): (top-1 at each answer position, greedy continuation)}."""

    revision: int = -1
    entries: dict[LocalityKey, tuple[list[int], list[int]]] = field(default_factory=dict)


def _greedy_from_top1(model, tokenizer, prompt_ids, answer_ids, top1, weights: Weights = None) -> list[list[int]]:
    """Greedy continuations as long as each answer, from the teacher-forced top-1 on the answer: greedy
    decoding follows the answer while its tokens are top-1, so it equals top-1 up to and including
    the first mismatch; only rows with a mismatch before their end are decoded further."""
    out, todo = [], []
    for i, (answer, pred) in enumerate(zip(answer_ids, top1)):
        k = next((j for j, (a, t) in enumerate(zip(answer, pred)) if a != t), len(answer))
        out.append(list(pred[: k + 1]))
        if k + 1 < len(answer):
            todo.append(i)
    rest = greedy_decode(model, tokenizer, [list(prompt_ids[i]) + out[i] for i in todo],
                         [len(answer_ids[i]) - len(out[i]) for i in todo], weights) if todo else []
    for i, tail in zip(todo, rest):
        out[i] += tail
    return out


def before_and_after(model, tokenizer, records: list[EditRecord], weights: Weights,
                     cache: LocalityCache | None = None) -> tuple[list[EditMetrics], list[EditMetrics], dict]:
    """`measure` before and after an edit (`weights`), with `locality_reference`, in one batched pass
    each way: (metrics before, metrics after, the cache entries of the edited weights). Locality pairs
    found in `cache` (the live weights' predictions) are not recomputed; the pass after the edit gives
    the edited weights' entries wherever the greedy continuation did not change."""
    pairs = [(r.prompt, r.target_new) for r in records] + [(p, r.target_new) for r in records for p in r.rephrase_prompt]
    loc = [(p, a) for r in records for p, a in zip(r.locality_prompt, r.locality_ground_truth or ("",) * len(r.locality_prompt))]
    if any(not a.strip() for _, a in loc):
        raise ValueError("locality prompts need their true answers (locality_ground_truth) to be measured")
    tp, tt = tokenize_pairs(tokenizer, [p for p, _ in pairs], [t for _, t in pairs])
    lp, la = tokenize_pairs(tokenizer, [p for p, _ in loc], [a for _, a in loc])
    keys = [(tuple(p), tuple(a)) for p, a in zip(lp, la)]
    known = cache.entries if cache is not None else {}
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    pre = [x.tolist() for x in score_ids(model, tokenizer, tp + [list(k[0]) for k in missing], tt + [list(k[1]) for k in missing])]
    miss_top1 = pre[len(tp):]
    greedy = _greedy_from_top1(model, tokenizer, [k[0] for k in missing], [k[1] for k in missing], miss_top1)
    ref = {**{k: known[k] for k in keys if k in known}, **dict(zip(missing, zip(miss_top1, greedy)))}
    uniq = list(dict.fromkeys(keys))  # edits measured together often share locality prompts (the server-held ones)
    post = [x.tolist() for x in score_ids(model, tokenizer, tp + [list(k[0]) for k in uniq] * 2,
                                          tt + [list(k[1]) for k in uniq] + [ref[k][1] for k in uniq], weights)]
    after_tf = dict(zip(uniq, post[len(tp) : len(tp) + len(uniq)]))
    after_em = dict(zip(uniq, post[len(tp) + len(uniq):]))
    post_tf, post_em = [after_tf[k] for k in keys], [after_em[k] for k in keys]

    def hits(pred, target):  # the arithmetic of target_scores and _locality_after (float32 means), so numbers agree exactly
        matched = torch.tensor([a == b for a, b in zip(pred, target)], dtype=torch.float32)
        return matched.mean().item(), float(bool(matched.all()) and len(pred) == len(target))

    target_pre = [hits(p, t) for p, t in zip(pre, tt)]
    target_post = [hits(p, t) for p, t in zip(post, tt)]
    loc_pre = [hits(ref[k][0], k[1]) for k in keys]
    loc_post = [(hits(tf, ref[k][0])[0], float(em == ref[k][1])) for k, tf, em in zip(keys, post_tf, post_em)]
    before, after, g, l_ = [], [], len(records), 0
    for i, r in enumerate(records):
        n_gen, n_loc = len(r.rephrase_prompt), len(r.locality_prompt)
        for out, target, locs in ((before, target_pre, loc_pre), (after, target_post, loc_post)):
            gs, ls = target[g : g + n_gen], locs[l_ : l_ + n_loc]
            out.append(EditMetrics(
                reliability_tf=target[i][0], reliability_em=target[i][1],
                generality_tf=_mean([x[0] for x in gs]), generality_em=_mean([x[1] for x in gs]),
                locality_tf=_mean([x[0] for x in ls]), locality_em=_mean([x[1] for x in ls]),
            ))
        g, l_ = g + n_gen, l_ + n_loc
    following = {k: (tf, ref[k][1]) for k, tf, em in zip(keys, post_tf, post_em) if em == ref[k][1]}
    return before, after, following


def summarize(metrics: list[EditMetrics]) -> dict[str, float]:
    """Mean of each metric over edits, ignoring NaN (records without paraphrases or locality)."""
    keys = EditMetrics.__dataclass_fields__
    return {k: _mean([getattr(m, k) for m in metrics if not math.isnan(getattr(m, k))]) for k in keys}
