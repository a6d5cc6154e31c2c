"""Load a local Hugging Face causal LM and its tokenizer. Nothing is ever downloaded."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mend.aggregation import load_memory
from mend.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use device=auto or device=cpu")
    return torch.device(name)


def bf16_autocast(setting: str | bool, device: torch.device) -> bool:
    """Whether training should run under bf16 autocast: `true` / `false`, or `auto`: on CUDA when the
    GPU supports bf16; on the CPU when a bf16 matmul is measured faster than a float32 one here
    (CPUs with AVX512-BF16 or AMX: ~2.5x faster for the base model; an AVX2-only CPU emulates bf16,
    15-35x slower)."""
    if setting in (True, False, "true", "false"):
        return setting in (True, "true")
    if setting != "auto":
        raise ConfigError(f"bf16 must be true, false or auto, not {setting!r}")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bf16_faster()


@functools.cache
def _cpu_bf16_faster() -> bool:
    """Time a (256, 512) @ (512, 512) matmul in both dtypes (~0.1 s, once per process)."""
    def seconds(dtype) -> float:
        a, b = torch.randn(256, 512).to(dtype), torch.randn(512, 512).to(dtype)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, time.perf_counter() - start)
        return best
    faster = seconds(torch.bfloat16) < seconds(torch.float32)
    log.info("bf16 autocast %s on this CPU (bf16 matmul measured %s than float32)", "used" if faster else "not used",
             "faster" if faster else "slower")
    return faster


def load_model(path: str | Path, device: str = "auto", dtype: str = "float32"):
    """(model, tokenizer) from a local directory written by `save_pretrained`; the model is in eval
    mode with every parameter frozen (editors and baselines choose what to differentiate). An
    edited model's directory also holds its edit memory (`mend.aggregation.save_memory`): it is
    attached, so the model answers as it was served."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"no model at {path}: expected a directory written by save_pretrained (with config.json). "
            "Build the default one with `mend build-base`, or point to a local model directory."
        )
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} unknown; use one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    load_memory(model, path)
    log.info("loaded %s (%s, %.1fM parameters) on %s", path, model.config.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, next(model.parameters()).device)
    return model, tokenizer


def files_hash(files: list[Path]) -> str:
    """sha256 over the names and bytes of `files` (in the given order)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_hash(path: str | Path) -> str:
    """Identity of a saved model: its config and weight files (tokenizer files do not change weights)."""
    path = Path(path)
    weights = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    if not weights:
        raise ConfigError(f"no weight files (*.safetensors, *.bin) in {path}")
    return files_hash([path / "config.json", *weights])
