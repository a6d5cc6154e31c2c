"""`mend COMMAND [key=value ...]`: the one entry point that reads the Hydra config.

The config tree is `configs/mend.yaml` (+ `configs/profile/*.yaml`); it is composed once here and
turned into the library's typed dataclasses, which is all the library ever sees.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mend.resources import CONFIGS, SHIPPED
from mend_cli.config import as_config, load_config

log = logging.getLogger("mend")


# ---------------------------------------------------------------- commands


def build_world(cfg: DictConfig) -> None:
    from mend.data.world import WorldConfig, generate_world

    path = Path(cfg.paths.world)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(generate_world(WorldConfig(seed=cfg.seed)), indent=1))
    print(f"wrote {path}")


def build_base(cfg: DictConfig) -> None:
    from mend.base_model import BaseModelConfig, build_base_model

    bm = as_config(BaseModelConfig, cfg.base_model, world_path=cfg.paths.world, shared_data=_shared_data(cfg),
                   seed=cfg.seed, device=cfg.device)
    report = build_base_model(bm, cfg.paths.base_model)
    print(f"base model: {report['parameters'] / 1e6:.2f}M parameters, trained {report['train_minutes']} min -> {cfg.paths.base_model}")
    print("  greedy exact match (teacher-forced token accuracy) of what it was trained on:")
    for name, acc in report["probes"].items():
        print(f"    {name:32} {acc['exact_match']:.3f} ({acc['token_acc']:.3f})")


def _shared_data(cfg) -> str:
    from mend.data.loaders import SHARED_DATA

    return str(cfg.paths.shared_data or SHARED_DATA)


def _model(cfg):
    from mend.models import load_model

    return load_model(cfg.paths.base_model, device=cfg.device)


def _dataset_path(cfg):
    """dataset.path, or paths.world for the synthetic world, or None (the dataset's default file)."""
    return cfg.dataset.path or (cfg.paths.world if cfg.dataset.name == "synthetic" else None)


def _split(cfg, split: str, dataset: str | None = None):
    """`dataset`'s split (default: the configured dataset); another dataset reads its default file."""
    from mend.data.loaders import load_split

    mine = dataset in (None, cfg.dataset.name)
    if not mine and not (CONFIGS / "dataset" / f"{dataset}.yaml").is_file():
        known = sorted(f.stem for f in (CONFIGS / "dataset").glob("*.yaml"))
        raise SystemExit(f"config error: train_datasets names {dataset!r}; known datasets: {known}")
    data = cfg.dataset if mine else OmegaConf.load(CONFIGS / "dataset" / f"{dataset}.yaml")
    return load_split(data.name, split, _dataset_path(cfg) if mine else None, val_size=data.val_size, seed=cfg.seed,
                      shared_data=_shared_data(cfg), test_size=data.test_size)


def _meta_train_names(cfg) -> list[str]:
    return list(cfg.train_datasets or [cfg.dataset.name])


def _meta_train_split(cfg):
    """The train splits of `train_datasets` (null: the configured dataset's alone) joined."""
    from mend.records import EditSplit

    return EditSplit.joined([_split(cfg, "train", name) for name in _meta_train_names(cfg)])


def train_editor_cmd(cfg: DictConfig) -> None:
    """Also under `torchrun --nproc_per_node=N`: one process per rank (mend.distributed)."""
    from mend import distributed
    from mend.editor import EditorConfig
    from mend.models import load_model
    from mend.targets import resolve_targets
    from mend.trainer import VAL_SIZES, TrainConfig, train_editor

    shard, device = distributed.start(cfg.device)
    try:
        model, tok = load_model(cfg.paths.base_model, device=str(device))
        targets = resolve_targets(model, cfg.targets.patterns, cfg.targets.n_last_blocks)
        if cfg.train.fsdp:
            distributed.shard_model(model, targets, shard)
        train, val = _meta_train_split(cfg), _split(cfg, "val")
        if shard.main:
            print(f"meta-training an editor for {[t.name for t in targets]} on {len(train.records)} "
                  f"{'+'.join(_meta_train_names(cfg))} edits"
                  + (f" on {shard.world} processes" if shard.world > 1 else "") + (" (base model sharded: FSDP)" if cfg.train.fsdp else ""))
        report = train_editor(
            model, tok, targets, train, val, cfg.paths.editor,
            as_config(EditorConfig, cfg.editor), as_config(TrainConfig, cfg.train, seed=cfg.seed),
            provenance={"base_model": str(cfg.paths.base_model), "dataset": "+".join(_meta_train_names(cfg))},
            shard=shard,
        )
    finally:
        distributed.stop()
    if not shard.main:
        return
    best = max(report["history"], key=lambda h: h["score"])
    print(f"editor -> {cfg.paths.editor} after {report['minutes']} min ({report['step_seconds']:.2f} s per training step"
          f"{f' on {shard.world} processes' if shard.world > 1 else ''}); best validation (step {best['step']}):")
    for size in (n for n in VAL_SIZES if f"b{n}_reliability_em" in best):
        print(f"  {size:>3} edit(s)/update: " + "  ".join(
            f"{m} {best[f'b{size}_{m}_em']:.3f}" for m in ("reliability", "generality", "locality")))
    calibration = report["calibration"]
    if calibration:
        chosen = calibration["chosen"]
        print(f"served gates calibrated on {calibration['records']} validation edits in {calibration['minutes']} min: " + (
            f"gate {chosen['gate']}, last block {chosen['gate_last']} ({chosen['reliability_em']:.3f} / {chosen['generality_em']:.3f} / "
            f"{chosen['locality_em']:.3f})" if chosen else
            f"no pair kept locality >= {calibration['min_locality']}; editor.gate left as set (all pairs in editor.json)"))


def _methods(cfg, model, names):
    """The edit methods named in `names`; `made` below is the registry a new method joins."""
    from mend.baselines import FineTune, FTConfig
    from mend.checkpoint import load_editor
    from mend.editing import MendMethod

    editor = load_editor(cfg.paths.editor, model) if "MEND" in names else None
    targets = editor.targets if editor else None
    if targets is None:
        from mend.targets import resolve_targets

        targets = resolve_targets(model, cfg.targets.patterns, cfg.targets.n_last_blocks)
    pool = _split(cfg, "train").locality_pool  # true facts of entities that evaluation never edits
    made = {
        "MEND": lambda: MendMethod(editor),
        "FT": lambda: FineTune(targets, as_config(FTConfig, cfg.ft, c_kl=0.0)),
        "FT+KL": lambda: FineTune(targets, as_config(FTConfig, cfg.ft), kl_pool=pool),
    }
    unknown = set(names) - set(made)
    if unknown:
        raise SystemExit(f"config error: unknown method(s) {sorted(unknown)}; known: {sorted(made)}")
    return [made[n]() for n in names]


def demo(cfg: DictConfig) -> None:
    """Random held-out edits, printed as they come out with their metrics, then held-out edits singly
    and many at once. `demo.seed` repeats a run (it is printed)."""
    import random

    from mend.batching import tokenize_pairs
    from mend.editing import edited_weights
    from mend.evaluation import evaluate_method
    from mend.metrics import before_and_after, greedy_decode

    model, tok = _model(cfg)
    (mend,) = _methods(cfg, model, ["MEND"])
    records = _split(cfg, "test").records
    seed = cfg.demo.seed if cfg.demo.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    print(f"\nmodel {cfg.paths.base_model}, editor {cfg.paths.editor}")
    print(f"== {cfg.demo.shown} random held-out edits (demo.seed={seed}), each applied alone to the unedited model ==")
    for r in rng.sample(records, cfg.demo.shown):
        weights = edited_weights(model, mend.deltas(model, tok, [r]))
        prompts = [r.prompt, *r.rephrase_prompt, *r.locality_prompt]
        p_ids, _ = tokenize_pairs(tok, prompts, ["x"] * len(prompts))
        before = greedy_decode(model, tok, p_ids, [3] * len(prompts))
        after = greedy_decode(model, tok, p_ids, [3] * len(prompts), weights)
        (pre,), (post,), _ = before_and_after(model, tok, [r], weights)
        print(f"\nedit: {r.prompt!r} -> {r.target_new!r} (was {r.ground_truth!r})")
        for kind, p, b, a in zip(["edit"] + ["paraphrase"] * len(r.rephrase_prompt) + ["unrelated"] * len(r.locality_prompt),
                                 prompts, before, after):
            print(f"  {kind:10} {p!r:50} before: {tok.decode(b, skip_special_tokens=True)!r:20} after: {tok.decode(a, skip_special_tokens=True)!r}")
        print(f"  metrics (greedy exact match, before -> after): reliability {pre.reliability_em:.2f} -> {post.reliability_em:.2f}, "
              f"generality {pre.generality_em:.2f} -> {post.generality_em:.2f}, locality (unchanged answers) {post.locality_em:.2f}")
    sample = rng.sample(records, min(cfg.demo.edits, len(records)))
    for size in (1, 10, len(sample)):
        res = evaluate_method(model, tok, mend, sample, batch_size=size)
        s = res["post"]
        print(f"\nMEND, {len(sample)} random held-out edits, {size} per update (greedy exact match / teacher-forced):")
        for m in ("reliability", "generality", "locality"):
            print(f"  {m:12} {s[m + '_em']:.3f} / {s[m + '_tf']:.3f}")
        print(f"  latency per update: {res['latency_s'] * 1000:.1f} ms")


def _perplexity_probe(cfg, model, tok):
    """(held-out perplexity of given weights, report entry), or (None, None) when skipped."""
    from mend.data.loaders import dataset_hash, shared_file
    from mend.perplexity import HeldOutText, PerplexityConfig, perplexity

    pcfg = as_config(PerplexityConfig, cfg.perplexity)
    path = pcfg.path or shared_file("wikitext", _shared_data(cfg))
    if pcfg.max_tokens == 0:
        return None, None
    if pcfg.path is None and not Path(path).is_file():
        log.warning("no held-out text at %s: perplexity is skipped (set perplexity.path)", path)
        return None, None
    text = HeldOutText.load(path, tok, model, pcfg)
    info = {"path": path, "sha256": dataset_hash(path), "tokens": text.n_tokens, "chunk": text.chunks.shape[1]}
    return (lambda weights: perplexity(model, text, weights, pcfg.batch_size)), info


def evaluate(cfg: DictConfig) -> None:
    from mend.data.loaders import dataset_hash, dataset_path
    from mend.harness import HarnessConfig, run_harness, select_records
    from mend.report import environment, markdown_report, write_run

    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    method_names = eval_cfg.pop("methods")
    split = eval_cfg.pop("split")
    hcfg = as_config(HarnessConfig, OmegaConf.create(eval_cfg), seed=cfg.seed)
    model, tok = _model(cfg)
    records = select_records(_split(cfg, split).records, hcfg.n_edits, hcfg.seed)
    methods = _methods(cfg, model, list(method_names))
    probe, heldout = _perplexity_probe(cfg, model, tok)
    data_file = dataset_path(cfg.dataset.name, "test", _dataset_path(cfg), _shared_data(cfg))
    started = time.time()
    measured = run_harness(model, tok, methods, records, hcfg, probe)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "minutes": round((time.time() - started) / 60, 2),
        "seed": cfg.seed,
        "dataset": {"name": cfg.dataset.name, "split": split, "path": data_file, "sha256": dataset_hash(data_file),
                    "case_ids": [r.case_id for r in records]},
        "model": {"path": str(cfg.paths.base_model), "model_type": model.config.model_type,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "device": str(next(model.parameters()).device)},
        "methods": [m.name for m in methods],
        "heldout_text": heldout,
        "versions": environment(),
        "harness": hcfg.to_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **measured,
    }
    base = out = Path(cfg.paths.runs) / f"eval-{cfg.dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(2, 1000):  # two runs in the same second get their own directories
        if not out.exists():
            break
        out = base.with_name(f"{base.name}.{i}")
    paths = write_run(report, out)
    print("\n" + markdown_report(report))
    print(f"report -> {out}: " + ", ".join(p.name for p in paths.values()))


def bench(cfg: DictConfig) -> None:
    import tempfile

    from mend.benchmark import forward_backward_seconds, run_benchmark, service_benchmark
    from mend_cli.serve import open_service

    model, tok = _model(cfg)
    methods = _methods(cfg, model, ["MEND", "FT", "FT+KL"])
    result = run_benchmark(model, tok, methods, _split(cfg, "test").records, cfg.bench.repeats)
    fb = result["forward_backward_s"]
    print(f"median over {cfg.bench.repeats} single edits on {next(model.parameters()).device}:")
    print(f"  forward+backward of the base model: {fb * 1000:8.2f} ms")
    for m in methods:
        print(f"  {m.name:6} edit: {result[m.name + '_s'] * 1000:8.2f} ms  "
              f"({result[m.name + '_over_forward_backward']:.2f}x forward+backward)")
    n = cfg.bench.active_edits
    records = _split(cfg, cfg.bench.split).records
    if len(records) < n + cfg.bench.repeats:
        raise SystemExit(f"config error: bench.split={cfg.bench.split} has {len(records)} edits; "
                         f"bench.active_edits + bench.repeats = {n + cfg.bench.repeats}")
    with tempfile.TemporaryDirectory(prefix="mend-bench-") as scratch:
        served = service_benchmark(
            lambda name: open_service(OmegaConf.merge(cfg, {"paths": {"journal": str(Path(scratch) / name)}})),
            lambda r: forward_backward_seconds(model, tok, r), records[n : n + cfg.bench.repeats], records[:n])
    print(f"the served edit (median of {cfg.bench.repeats}), with 0 and with {n} active edits (two services, "
          "timed alternately; each edit next to a forward+backward of the base model timed right before it):")
    for label in ("0", str(n)):
        bare, apply, bulk = (served[f"{k}@{label}"] for k in ("bare_edit_s", "apply_edit_s", "apply_edit_no_metrics_s"))
        print(f"  {label:>5} active: edit itself {bare * 1000:7.2f} ms ({served[f'bare_over_forward_backward@{label}']:.2f}x "
              f"forward+backward, {served[f'forward_backward_s@{label}'] * 1000:.2f} ms), "
              f"ApplyEdit {apply * 1000:7.2f} ms ({apply / bare:.2f}x the edit), "
              f"without metrics {bulk * 1000:7.2f} ms ({bulk / bare:.2f}x)")
    print(f"  ApplyEdit with {n} active / with 0: {served['apply_ratio']:.2f}x (median of the per-edit ratios); "
          f"ApplyEdits of 100: {served['apply_chunk_s']:.2f} s")
    print(f"  start-up replay of the journal ({served['replayed_active']} active edits): {served['replay_s']:.1f} s")


def sites(cfg: DictConfig) -> None:
    import random

    from mend.harness import select_records
    from mend.sites import site_report
    from mend.targets import resolve_targets

    model, tok = _model(cfg)
    targets = resolve_targets(model, cfg.targets.patterns, model.config.num_hidden_layers)  # default: every block's MLP
    sizes = sorted(cfg.sites.sizes)
    records = select_records(_split(cfg, cfg.sites.split).records, sizes[-1], cfg.seed)
    pool = _split(cfg, "train").locality_pool
    pool = random.Random(cfg.seed).sample(pool, min(cfg.sites.pool, len(pool)))
    if sizes[-1] > len(records):
        raise SystemExit(f"config error: sites.sizes {sizes} asks for {sizes[-1]} edits but sites.split={cfg.sites.split} "
                         f"has {len(records)}; lower sites.sizes or use a larger split (test+val)")
    rows = site_report(model, tok, targets, records, pool, cfg.sites.ridge, tuple(sizes))
    print(f"a linear edit of each matrix at the prompt's last token ({cfg.dataset.name} {cfg.sites.split}, C₀ of {len(pool)} "
          f"preserved prompts): transfer to paraphrases (1 = all of it) and crosstalk into unrelated prompts "
          f"(relative to one edit's own change) with N edits at once")
    print(f"  {'matrix':40} {'keys':>5} {'transfer':>9} " + " ".join(f"{f'N={n}':>8}" for n in sizes))
    for row in rows:
        print(f"  {row['matrix']:40} {row['fan_in']:5d} {row['transfer']:9.2f} "
              + " ".join(f"{row['crosstalk'][n]:8.2f}" for n in sizes))


def ship(cfg: DictConfig) -> None:
    """Store the built base model and editor (under the home) as the shipped defaults in data/default:
    model weights in float32, the editor networks' weights in bf16 (its C₀, normalisation statistics
    and steps in float32), checked on `val` edits against the built copies (recorded, not assumed),
    with their provenance: commit, config, metrics and sha256 of every file."""
    import hashlib
    import shutil
    import subprocess

    from safetensors.torch import load_file, save_file

    from mend.checkpoint import load_editor, read_meta
    from mend.editing import MendMethod
    from mend.evaluation import evaluate_method
    from mend.models import load_model

    built_model, built_editor = Path(cfg.paths.base_model), Path(cfg.paths.editor)
    tmp = SHIPPED.with_name("default.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model, tok = load_model(built_model, device="cpu")
    model.save_pretrained(tmp / "base-model")
    tok.save_pretrained(tmp / "base-model")
    shutil.copy(built_model / "build_report.json", tmp / "base-model")
    (tmp / "editor").mkdir(parents=True)
    tensors = {k: (v.bfloat16() if k.startswith("nets.") else v.float()) if v.is_floating_point() else v
               for k, v in load_file(built_editor / "editor.safetensors").items()}
    save_file(tensors, tmp / "editor" / "editor.safetensors")
    shutil.copy(built_editor / "editor.json", tmp / "editor")

    records = _split(cfg, "val").records[: cfg.train.val_edits]
    measured = {}
    for label, (m_path, e_path) in {"built": (built_model, built_editor), "shipped": (tmp / "base-model", tmp / "editor")}.items():
        m, t = load_model(m_path, device=cfg.device)
        method = MendMethod(load_editor(e_path, m))
        measured[label] = {f"{n} per update": {k: v for k, v in evaluate_method(m, t, method, records, batch_size=n)["post"].items()
                                               if k.endswith("_em")} for n in (1, 10, 100) if n <= len(records)}
        print(f"{label:8} " + "; ".join(f"{n}: " + " / ".join(f"{v:.3f}" for v in r.values()) for n, r in measured[label].items()))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    provenance = {
        "made_by": "mend build-base; mend train-editor; mend ship",
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "config": {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("base_model", "editor", "train", "targets")},
        "storage": "base model float32; editor networks bf16 (loaded as float32), C0, norms and steps float32",
        "base_model": {k: v for k, v in json.loads((built_model / "build_report.json").read_text()).items() if k != "history"},
        "editor_validation": read_meta(built_editor).get("validation"),
        "val_edits_greedy_em": {"records": len(records), **measured},
        "sha256": {str(f.relative_to(tmp)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }
    (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1))
    shutil.rmtree(SHIPPED, ignore_errors=True)
    tmp.replace(SHIPPED)
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    print(f"shipped defaults -> {SHIPPED} ({size / 2**20:.1f} MiB)")


def rebuild(cfg: DictConfig) -> None:
    """The default base model and its editor from scratch, into the home (then used instead of the
    shipped ones; `mend ship` stores them as the new shipped defaults)."""
    build_base(cfg)
    train_editor_cmd(cfg)


def quickstart(cfg: DictConfig) -> None:
    """The README's main job: the demo, then the gRPC server and its example client."""
    demo(cfg)
    client_demo(cfg)


def serve(cfg: DictConfig) -> int:
    from mend_cli.serve import serve_cmd

    return serve_cmd(cfg)


def client_demo(cfg: DictConfig) -> None:
    from mend_cli.serve import client_demo_cmd

    client_demo_cmd(cfg)


def loadtest(cfg: DictConfig) -> None:
    from mend_cli.serve import loadtest_cmd

    loadtest_cmd(cfg)


COMMANDS = {
    "build-world": (build_world, "regenerate the synthetic world (into the home; the shipped one stays)"),
    "build-base": (build_base, "train the default base model on the synthetic world"),
    "train-editor": (train_editor_cmd, "meta-train a MEND editor for the base model"),
    "demo": (demo, "apply example edits and print what changed"),
    "eval": (evaluate, "compare edit methods (batch and sequential editing): report, table, plots"),
    "bench": (bench, "edit latency next to one forward+backward pass"),
    "sites": (sites, "where to write edits: paraphrase transfer and crosstalk of a linear edit of each matrix"),
    "rebuild": (rebuild, "build the base model and train its editor from scratch (~40 min on 2 cores), into the home"),
    "ship": (ship, "store the built base model and editor as the shipped defaults (data/default), with provenance"),
    "quickstart": (quickstart, "the demo, then the gRPC server and its example client (the shipped defaults unless built)"),
    "serve": (serve, "run the gRPC editing service (configs/server/default.yaml)"),
    "client-demo": (client_demo, "start the server and run the example client against it"),
    "loadtest": (loadtest, "ApplyEdit throughput and latency for 1/4/16 clients"),
}


BUILDS = {"build-world": ("world",), "build-base": ("base_model",), "train-editor": ("editor",), "rebuild": ("base_model", "editor"),
          "ship": ("base_model", "editor")}  # the paths each command writes (ship reads the built ones)

JOURNAL_COMMANDS = {
    "edit": "apply a JSONL batch edit file to a server (--server ADDR) or locally",
    "rollback": "roll back an edit (EDIT_ID) or to a revision (--to N)",
    "edits": "list the edit journal",
    "journal": "check the journal's integrity (`journal check`) or back it up online (`journal backup DEST`)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    config_dir = None
    if argv[:1] == ["--config-dir"] and len(argv) > 1:  # before the command: `mend --config-dir DIR COMMAND ...`
        config_dir, argv = argv[1], argv[2:]
    if argv[:1] == ["journal"]:
        from mend_cli.journal_cmd import run as journal

        return journal(argv[1:], functools.partial(load_config, config_dir=config_dir))
    if argv and argv[0] in JOURNAL_COMMANDS:  # these take flags as well as key=value overrides
        from mend_cli.edit_file import run

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run(argv[0], argv[1:], functools.partial(load_config, config_dir=config_dir))
    parser = argparse.ArgumentParser(prog="mend", description="MEND model editing: build, train, edit, evaluate.",
                                     usage="mend [--config-dir DIR] COMMAND [key=value ...]",
                                     epilog="--config-dir DIR: config files there replace the shipped ones of the same name "
                                            "(mend.yaml, profile/NAME.yaml, ...).")
    parser.add_argument("command", choices=[*COMMANDS, *JOURNAL_COMMANDS],
                        help="; ".join([f"{k}: {v[1]}" for k, v in COMMANDS.items()] + [f"{k}: {v}" for k, v in JOURNAL_COMMANDS.items()]))
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (see configs/mend.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(list(args.overrides), BUILDS.get(args.command, ()), config_dir)
    torch.manual_seed(cfg.seed)
    from mend.errors import MendError

    try:
        return COMMANDS[args.command][0](cfg) or 0
    except MendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
