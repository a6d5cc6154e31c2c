"""Build a base model: a small GPT-2 that has memorised the true statements of its corpus.

The default memorises the synthetic world; the `facts` corpus (CounterFact, zsRE, WikiText-2) gives
a model that knows real facts in English (`mend.data.corpus`). Deterministic from a seed: the
tokenizer (byte-level BPE trained with `tokenizers` on the corpus) and the training order derive
from it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mend.batching import tokenize_pairs
from mend.data.corpus import build_corpus
from mend.errors import ConfigError
from mend.metrics import target_scores
from mend.models import bf16_autocast, resolve_device
from mend.resources import WORLD

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class BaseModelConfig:
    corpus: str = "synthetic"  # synthetic (the embedded world) | facts (CounterFact + zsRE + WikiText-2) | none (mend.data.corpus)
    extra_facts: tuple[str, ...] = ()  # CounterFact or zsRE files whose true statements join the corpus
    world_path: str = str(WORLD)
    shared_data: str = ""  # the folder holding the real data (the facts corpus)
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 128
    dropout: float = 0.1  # GPT-2's residual, embedding and attention dropout while the base model trains
    batch_size: int = 64
    lr: float = 2e-3
    embedding_lr: float = 1.0  # the token embeddings' learning rate, as a multiple of lr
    epochs: int = 20
    warmup_steps: int = 200
    statement_loss: str = "all"  # all: every token of a statement; answer: its answer tokens only (and logits only there)
    bucket_by_length: bool = False  # batch statements of similar length (real statements vary 5-40 tokens)
    text_chunk: int = 64  # running text is trained in chunks of this many tokens, in batches of their own
    text_chunks_per_epoch: int = 0  # a rotating share of the running text per epoch (0: none)
    text_holdout_chars: int = 131072  # WikiText's first characters stay out of training: perplexity is measured there
    eval_every_epochs: int = 5
    eval_facts: int = 800  # facts sampled per probe for the accuracy printed during training
    seed: int = 0
    bf16: str | bool = "auto"  # autocast: true | false | auto (where bf16 is measured faster: mend.models.bf16_autocast)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if not 0 <= self.dropout < 1 or self.embedding_lr <= 0:
            raise ConfigError(f"dropout must be in [0, 1) and embedding_lr > 0, not {self.dropout} and {self.embedding_lr}")
        if self.statement_loss not in ("all", "answer"):
            raise ConfigError(f"statement_loss must be 'all' or 'answer', not {self.statement_loss!r}")
        if self.text_chunks_per_epoch < 0 or (self.text_chunks_per_epoch and not 8 <= self.text_chunk <= self.n_positions):
            raise ConfigError(f"text_chunks_per_epoch must be >= 0, and with running text text_chunk in [8, n_positions={self.n_positions}]")


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int = 128) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # "Ann" = " Ann": one token per name
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length)


def fact_accuracy(model, tokenizer, facts) -> dict[str, float]:
    scores = target_scores(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    return {"token_acc": sum(s[0] for s in scores) / len(scores), "exact_match": sum(s[1] for s in scores) / len(scores)}


Row = tuple[list[int], int]  # token ids, index of the first token with a loss


def _epoch_batches(statements: list[Row], chunks: list[Row], cfg: BaseModelConfig, epoch: int, rng: random.Random) -> list[list[Row]]:
    """One epoch's batches (`chunks` is empty unless text_chunks_per_epoch > 0): every statement once, in random order (or, with `bucket_by_length`, in
    batches of similar length), and the epoch's share of running-text chunks in batches of their
    own, interleaved at random."""
    order = list(range(len(statements)))
    rng.shuffle(order)
    if cfg.bucket_by_length:  # sort within windows of 50 batches: little padding, still shuffled
        window = 50 * cfg.batch_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: len(statements[i][0]))]
    batches = [[statements[i] for i in order[b : b + cfg.batch_size]] for b in range(0, len(order), cfg.batch_size)]
    if chunks:
        n = cfg.text_chunks_per_epoch
        share = [chunks[(epoch * n + j) % len(chunks)] for j in range(n)]
        batches += [share[b : b + cfg.batch_size] for b in range(0, n, cfg.batch_size)]
    if cfg.bucket_by_length or chunks:
        rng.shuffle(batches)
    return batches


def _lm_loss(model, x: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the `scored` (B, T) tokens; the LM head (most of a small
    model's compute with an 8k vocabulary) runs only where a token is scored."""
    hidden = model.transformer(input_ids=x, attention_mask=mask).last_hidden_state[:, :-1]  # (B, T-1, d)
    keep = scored[:, 1:]
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]).float(), x[:, 1:][keep])


def _text_chunks(tokenizer, paragraphs: list[str], size: int, rng: random.Random) -> list[list[int]]:
    """Running text as `size`-token chunks (paragraphs joined by EOS), in a seeded random order."""
    stream: list[int] = []
    for p in paragraphs:
        stream += tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    chunks = [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]
    rng.shuffle(chunks)
    return chunks


def build_base_model(cfg: BaseModelConfig, out_dir: str | Path) -> dict:
    """Train a base model on its corpus into `out_dir`; returns (and writes) its accuracy report and
    the corpus recipe."""
    device = resolve_device(cfg.device)
    bf16 = bf16_autocast(cfg.bf16, device)  # first: a wrong setting fails before the corpus is read
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    corpus = build_corpus(cfg.corpus, cfg.world_path, cfg.shared_data, cfg.extra_facts, cfg.text_holdout_chars)
    sentences = [f"{f.prompt} {f.answer}" for f in corpus.statements]
    tokenizer = train_tokenizer(sentences + corpus.text, cfg.vocab_size, cfg.n_positions)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
    )).to(device)
    prompt_ids, answer_ids = tokenize_pairs(tokenizer, [f.prompt for f in corpus.statements], [f.answer for f in corpus.statements])
    rows, too_long = [], set()  # rows: (token ids, index of the first scored token: with statement_loss=answer, the answer's)
    for f, p, a in zip(corpus.statements, prompt_ids, answer_ids):
        if len(a) >= cfg.n_positions - 1:  # an answer must fit in the context after at least one prompt token
            too_long.add(f)
            continue
        ids = p + a + [tokenizer.eos_token_id]
        cut = max(0, len(ids) - cfg.n_positions)  # an overlong statement loses prompt tokens from the left
        rows.append((ids[cut:], len(p) - cut if cfg.statement_loss == "answer" else 0))
    if too_long:
        log.warning("%d statement(s) whose answer alone is %d+ tokens are left out of the corpus", len(too_long), cfg.n_positions - 1)
        corpus.probes = {name: kept for name, facts in corpus.probes.items() if (kept := [f for f in facts if f not in too_long])}
        corpus.recipe["counts"]["left_out_too_long"] = len(too_long)
    samples = {name: rng.sample(facts, min(cfg.eval_facts, len(facts))) for name, facts in corpus.probes.items()}
    chunks = [(c, 0) for c in _text_chunks(tokenizer, corpus.text, cfg.text_chunk, rng)] if cfg.text_chunks_per_epoch else []
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size) + (math.ceil(cfg.text_chunks_per_epoch / cfg.batch_size) if chunks else 0)
    total = steps_per_epoch * cfg.epochs
    wte, decay = model.get_input_embeddings().weight, 0.01  # wte is tied to the LM head; it decays per step like the rest
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p is not wte]},
                             {"params": [wte], "lr": cfg.lr * cfg.embedding_lr, "weight_decay": decay / cfg.embedding_lr}],
                            lr=cfg.lr, weight_decay=decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history, start = [], time.time()
    bar = tqdm(total=total, desc="base model", unit="step", mininterval=10)
    for epoch in range(cfg.epochs):
        model.train()
        for batch in _epoch_batches(rows, chunks, cfg, epoch, rng):
            width = max(len(r) for r, _ in batch)
            x = torch.full((len(batch), width), tokenizer.eos_token_id)
            mask = torch.zeros_like(x)
            scored = torch.zeros_like(x, dtype=torch.bool)
            for i, (r, skip) in enumerate(batch):
                x[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
                scored[i, skip : len(r)] = True
            x, mask, scored = x.to(device), mask.to(device), scored.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = _lm_loss(model, x, mask, scored)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1, refresh=False)
        if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
            model.eval()
            point = {"epoch": epoch + 1, "minutes": round((time.time() - start) / 60, 2),
                     **{name: fact_accuracy(model, tokenizer, facts) for name, facts in samples.items()}}
            history.append(point)
            log.info("epoch %d: %s", epoch + 1, point)
    bar.close()
    model.eval()
    report = {
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_minutes": round((time.time() - start) / 60, 2),
        "probes": {name: fact_accuracy(model, tokenizer, facts) for name, facts in corpus.probes.items()},
        "history": history,
    }
    corpus.recipe["tokens_per_epoch"] = sum(len(r) for r, _ in rows) + cfg.text_chunk * cfg.text_chunks_per_epoch * bool(chunks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "corpus_recipe.json").write_text(json.dumps(corpus.recipe, indent=2))
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2))
    return report
