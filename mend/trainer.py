"""Meta-train a MEND editor.

Each step samples k edits (k cycles through `batch_sizes`, from single edits to hundreds), computes
their gradient factors on the frozen base model, lets the editor turn them into keys and values
and those into one least-squares update per layer (the same solve the service uses, so the editor
learns what to produce for it; λ_l and μ_l are learned with it), and scores the edited model
(through `torch.func.functional_call`) with

    c_edit · NLL(new target | edit prompt and its paraphrases)  +  c_loc · KL(pre || post | unrelated facts).

Validation edits held-out entities every `val_every` steps; the best checkpoint is kept and
training stops early after `patience` validations without improvement. Under torchrun each rank
computes its share of every step and the least-squares solve spans all ranks' edits
(`mend.distributed`); every rank validates (with FSDP every pass needs them all), rank 0 saves and logs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from mend.aggregation import attach_memory
from mend.batching import encode, logits, masked_kl, target_nll
from mend.capture import edit_factors, layer_inputs
from mend.checkpoint import save_editor
from mend.distributed import Shard
from mend.editing import MendMethod, edited_weights
from mend.editor import EditorConfig, MendEditor
from mend.errors import ConfigError
from mend.evaluation import evaluate_method
from mend.records import EditRecord, EditSplit, Fact
from mend.targets import EditTarget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_sizes: tuple[int, ...] = (1, 10, 100, 1, 30, 300)  # edits per step, cycled: single edits to hundreds
    locality_per_step: int = 16  # unrelated facts in each KL term (at least as many as edits, up to `scored_edits`)
    scored_edits: int = 64  # the loss scores at most this many of a step's edits (a random subset): every edit
                            # enters the solve, but the step's cost stays flat in the number of edits
    lr: float = 2e-4  # editor network
    step_lr: float = 1e-4  # the per-layer edit steps α_l
    solve_lr: float = 3e-3  # log λ_l and log μ_l of the least-squares combination
    preserved_facts: int = 2000  # unedited true facts whose keys make each layer's C₀
    c_edit: float = 1.0
    c_loc: float = 3.0
    c_rephrase: float = 1.0  # weight of the paraphrases' NLL in the edit term, relative to the edit prompt's
    grad_clip: float = 100.0
    cosine_decay: bool = True  # both learning rates follow a cosine from 1x to 0.1x over `steps`
    val_every: int = 500
    val_edits: int = 100  # edits per validation, singly, in batches of 10 and all in one update
    patience: int = 4  # validations without improvement before stopping
    seed: int = 0
    fsdp: bool = False  # under torchrun: shard the frozen base model's parameters across the ranks (mend.distributed)
    gated: bool = False  # the meta-loss edits through the served, gated memory (one process only) instead of the plain solve
    gate_pairs: tuple[tuple[float, float], ...] = ()  # (τ, last block's τ) tried on validation after training (`calibrate_gates`)
    min_locality: float = 0.92  # the validation locality a calibrated gate keeps

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("steps must be >= 1 and batch_sizes a non-empty list of sizes >= 1")
        if self.c_edit <= 0 or self.c_loc < 0 or self.c_rephrase < 0:
            raise ConfigError(f"c_edit must be > 0, c_loc and c_rephrase >= 0 (got {self.c_edit}, {self.c_loc}, {self.c_rephrase})")
        if any(len(p) != 2 or min(p) < 0 for p in self.gate_pairs) or not 0 <= self.min_locality <= 1:
            raise ConfigError(f"gate_pairs must be [gate, gate_last] pairs of numbers >= 0 and min_locality in [0, 1] "
                              f"(got {self.gate_pairs}, {self.min_locality})")


def _locality_facts(pool: list[Fact], records: list[EditRecord], n: int, rng: random.Random) -> list[Fact]:
    """Unrelated facts: none may mention a subject being edited (its facts are meant to change)."""
    subjects = [r.subject or r.prompt for r in records]
    out = []
    for _ in range(100 * n):
        f = rng.choice(pool)
        if not any(s in f.prompt for s in subjects):
            out.append(f)
            if len(out) == n:
                return out
    raise ConfigError(f"the locality pool ({len(pool)} facts) has too few facts unrelated to the edited subjects {subjects}")


def observe_preserved(model, tokenizer, editor: MendEditor, facts: list[Fact], batch_size: int = 64, shard: Shard = Shard()) -> None:
    """Accumulate each layer's C₀ from the keys of unedited true facts where the model predicts their
    answer (the prompt's last token and the answer's tokens). An edit is written at the same
    positions of its own prompt, whose keys differ from other subjects' mostly in a few directions:
    C₀ of all tokens spends its weight on prompt words no edit changes (measured: at the same
    reliability of 100 edits at once, locality 0.74 instead of 0.63 on `val`)."""
    if not facts:
        raise ConfigError("no unedited facts to estimate the preserved-key covariance C₀ from: the split's locality pool is empty")
    device = next(model.parameters()).device
    step = batch_size * shard.world  # each rank its share of every batch, then the sums over ranks
    for i in range(0, len(facts), step):
        chunk = shard.take(facts[i : i + step])
        batch = encode(tokenizer, [f.prompt for f in chunk or facts[:1]], [f.answer for f in chunk or facts[:1]]).to(device)
        keys = layer_inputs(model, editor.targets, batch, at_predictions=True)  # every rank runs every pass (FSDP)
        if chunk:
            editor.observe_preserved(keys)
    editor.merge_preserved(shard.total)


def meta_loss(model, editor, tokenizer, records: list[EditRecord], loc: list[Fact], cfg: TrainConfig,
              scored: list[EditRecord] | None = None, shard: Shard = Shard()):
    """The loss of one update made of all `records`; the edit term scores `scored` (default: all).
    `editor`: a MendEditor, or one wrapped in DistributedDataParallel; this rank computes its share of
    the records, scored edits and unrelated facts `loc`, and its loss is its share of the whole
    step's, times the number of ranks (DDP averages the gradients)."""
    # Every rank runs every pass (with FSDP each pass gathers the model's parameters from all ranks):
    # a rank with no share of its own (more ranks than edits) runs it on a stand-in and keeps nothing.
    device = next(model.parameters()).device
    targets = getattr(editor, "module", editor).targets
    mine = shard.take(records)
    edit_batch = encode(tokenizer, [r.prompt for r in mine or records[:1]], [r.target_new for r in mine or records[:1]]).to(device)
    factors = edit_factors(model, targets, edit_batch)
    if not mine:
        factors = {name: (u[:0], d[:0]) for name, (u, d) in factors.items()}
    if cfg.gated:  # the served combination (mend.aggregation): each edit's kept rows, written through the gate
        weights = editor.memory(factors, edit_batch.attention_mask.sum(1).tolist())
    else:
        weights = edited_weights(model, editor(factors, gather=shard.gather))
    scored = records if scored is None else scored
    own = shard.take(scored)
    n_prompts = shard.total(torch.tensor(float(len(own) + sum(len(r.rephrase_prompt) for r in own)), device=device))
    run = own or scored[:1]
    prompts = [r.prompt for r in run] + [p for r in run for p in r.rephrase_prompt]
    answers = [r.target_new for r in run] + [r.target_new for r in run for _ in r.rephrase_prompt]
    outer = encode(tokenizer, prompts, answers).to(device)
    nll = target_nll(logits(model, outer, weights), outer)
    l_edit = (nll[: len(run)].sum() + cfg.c_rephrase * nll[len(run) :].sum()) / n_prompts
    if not own:
        l_edit = l_edit * 0
    loc = shard.take(loc)
    loc_batch = encode(tokenizer, [f.prompt for f in loc], [f.answer for f in loc]).to(device)
    mask = loc_batch.attention_mask[:, 1:]
    with torch.no_grad():
        pre = logits(model, loc_batch)
    l_loc = masked_kl(pre, logits(model, loc_batch, weights), mask, shard.total(mask.sum().float()).clamp(min=1))
    parts = {"edit": shard.total(l_edit.detach()).item(), "loc": shard.total(l_loc.detach()).item()}
    return shard.world * (cfg.c_edit * l_edit + cfg.c_loc * l_loc), parts


VAL_SIZES = (1, 10, 100)


def calibrate_gates(model, tokenizer, editor: MendEditor, records: list[EditRecord],
                    pairs, min_locality: float) -> tuple[dict | None, list[dict]]:
    """Set the editor's served gates to the (τ, last block's τ) of `pairs` with the most generality
    on `records` (single edits, greedy) among those keeping locality >= `min_locality` (ties: more
    locality). The gate trades one for the other, and where the trade sits differs between editors
    of the same recipe. Returns (the chosen pair's metrics or None: the gates are left as they
    were, every pair measured)."""
    configured, tried = editor.cfg, []
    for gate, gate_last in pairs:
        editor.cfg = dataclasses.replace(editor.cfg, gate=float(gate), gate_last=float(gate_last))
        post = evaluate_method(model, tokenizer, MendMethod(editor), records, batch_size=1)["post"]
        tried.append({"gate": float(gate), "gate_last": float(gate_last), **{k: round(v, 4) for k, v in post.items()}})
        log.info("gate %.2f, last block %.2f: %s", gate, gate_last, {k: round(v, 3) for k, v in post.items()})
    kept = [t for t in tried if t["locality_em"] >= min_locality]
    chosen = max(kept, key=lambda t: (t["generality_em"], t["locality_em"]), default=None)
    editor.cfg = dataclasses.replace(configured, gate=chosen["gate"], gate_last=chosen["gate_last"]) if chosen else configured
    return chosen, tried


def validate(model, tokenizer, editor: MendEditor, records: list[EditRecord]) -> dict[str, float]:
    """Greedy exact-match metrics for single edits, batches of 10 and of 100; `score` averages them."""
    results = {}
    sizes = [n for n in VAL_SIZES if n <= len(records)]
    for size in sizes:
        s = evaluate_method(model, tokenizer, MendMethod(editor), records, batch_size=size)["post"]
        results.update({f"b{size}_{k}": v for k, v in s.items()})
    keys = [f"b{n}_{m}_em" for n in sizes for m in ("reliability", "generality", "locality")]
    results["score"] = sum(results[k] for k in keys) / len(keys)
    editor.train()
    return results


def train_editor(model, tokenizer, targets: list[EditTarget], train: EditSplit, val: EditSplit,
                 out_dir, editor_cfg: EditorConfig = EditorConfig(), cfg: TrainConfig = TrainConfig(),
                 provenance: dict | None = None, shard: Shard = Shard()) -> dict:
    """Meta-train an editor; the best checkpoint (by validation score) is written to `out_dir` (by rank
    0 under torchrun: `shard` is this process's part, `mend.distributed.start`)."""
    if min(cfg.locality_per_step, cfg.preserved_facts) < shard.world:
        raise ConfigError(f"train.locality_per_step and train.preserved_facts must be at least the number of processes ({shard.world})")
    if cfg.gated and shard.world > 1:
        raise ConfigError("train.gated runs in one process: start it without torchrun, or set train.gated=false")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the same on every rank: every rank samples the same global step
    device = next(model.parameters()).device
    editor = MendEditor(targets, editor_cfg).to(device).train()
    attach_memory(model, targets, editor_cfg.gates(targets))  # the layers' (empty) edit memories: train.gated and validation write them
    observe_preserved(model, tokenizer, editor, rng.sample(train.locality_pool, min(cfg.preserved_facts, len(train.locality_pool))),
                      shard=shard)
    net = editor
    if shard.world > 1:  # the rows' gathers keep the normalisation statistics equal on every rank: no buffer broadcast
        net = torch.nn.parallel.DistributedDataParallel(editor, device_ids=[device] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    special = {"steps": cfg.step_lr, "log_ridge": cfg.solve_lr, "log_preserve": cfg.solve_lr}
    net_params = [p for n, p in editor.named_parameters() if n not in special]
    opt = torch.optim.Adam([{"params": net_params, "lr": cfg.lr}] +
                           [{"params": [getattr(editor, n)], "lr": lr} for n, lr in special.items()])
    decay = (lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / cfg.steps))) if cfg.cosine_decay else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    val_records = val.records[: cfg.val_edits]
    history, best, stale, start = [], -1.0, 0, time.time()
    bar = tqdm(range(1, cfg.steps + 1), desc="meta-train", unit="step", mininterval=5, disable=not shard.main)
    running, step_seconds = {"edit": 0.0, "loc": 0.0}, []
    for step in bar:
        began = time.perf_counter()
        k = cfg.batch_sizes[step % len(cfg.batch_sizes)]
        records = rng.sample(train.records, k)
        loc = _locality_facts(train.locality_pool, records, min(max(cfg.locality_per_step, k), cfg.scored_edits), rng)
        scored = rng.sample(records, min(k, cfg.scored_edits))
        loss, parts = meta_loss(model, net, tokenizer, records, loc, cfg, scored, shard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        running = {key: parts[key] if step == 1 else 0.98 * running[key] + 0.02 * parts[key] for key in parts}
        bar.set_postfix(edit=f"{running['edit']:.3f}", loc=f"{running['loc']:.4f}", refresh=False)
        step_seconds.append(time.perf_counter() - began)
        stop = False
        if step % cfg.val_every == 0 or step == cfg.steps:  # on every rank (FSDP passes need them all); rank 0 saves
            result = {"step": step, "minutes": round((time.time() - start) / 60, 2),
                      **validate(model, tokenizer, editor, val_records)}
            history.append(result)
            if shard.main:
                log.info("validation %s", {k: round(v, 3) for k, v in result.items()})
            if result["score"] > best:
                best, stale = result["score"], 0
                best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}
                meta = {"train": asdict(cfg), "validation": result, "processes": shard.world, **(provenance or {})}
                if shard.main:
                    save_editor(editor, out_dir, model.config.model_type, meta)
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stop at step %d: no improvement in %d validations", step, stale)
                    stop = True
        if shard.broadcast(stop):
            break
    bar.close()
    minutes = round((time.time() - start) / 60, 2)
    calibration = None
    if cfg.gate_pairs:  # on every rank, as validation; the best checkpoint is saved again with the chosen gates
        editor.load_state_dict(best_state)
        chosen, tried = calibrate_gates(model, tokenizer, editor.eval(), val.records, cfg.gate_pairs, cfg.min_locality)
        calibration = {"min_locality": cfg.min_locality, "records": len(val.records), "chosen": chosen, "tried": tried,
                       "minutes": round((time.time() - start) / 60 - minutes, 2)}
        if shard.main:
            save_editor(editor, out_dir, model.config.model_type, {**meta, "calibration": calibration})
    return {"best_score": best, "minutes": minutes, "history": history, "calibration": calibration,
            "step_seconds": sum(step_seconds) / len(step_seconds)}
