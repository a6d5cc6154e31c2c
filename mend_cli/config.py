"""The one config tree every command reads: composed by Hydra from the shipped `configs/` (or a
user's `--config-dir`, whose files replace the shipped ones of the same name), with the paths a user
did not give resolved:

- `paths.home`: `MEND_HOME`, else the per-user data directory (`mend.resources.home`);
- `paths.base_model` / `paths.editor` / `paths.world` left null: what was built under the home
  (`mend build-base` / `train-editor` / `build-world`) when it is there, or when this command
  builds it, else the shipped default;
- `paths.runs` / `paths.journal` left null: under the home.

Paths that are given are used as given (relative ones from the current directory; URLs untouched).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mend.resources import CONFIGS, SHIPPED, WORLD, home

# key -> (name under the home, file that shows it was built, the shipped default)
BUILT = {"base_model": ("base-model", "config.json", SHIPPED / "base-model"),
         "editor": ("editor", "editor.json", SHIPPED / "editor"),
         "world": ("synthetic_world.json", "", WORLD)}


def as_config(cls, node, **extra):
    """A frozen library dataclass from a config section; unknown keys are an error naming the valid ones."""
    values = {**OmegaConf.to_container(node, resolve=True), **extra} if node is not None else dict(extra)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise SystemExit(f"config error: unknown key(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _compose(overrides: list[str], config_dir: str | None) -> DictConfig:
    if config_dir is None:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="mend", overrides=overrides)
    user = Path(config_dir).expanduser().resolve()
    if not user.is_dir():
        raise SystemExit(f"config error: --config-dir {config_dir} is not a directory")
    with tempfile.TemporaryDirectory(prefix="mend-configs-") as overlay:  # the shipped tree with the user's files on top
        shutil.copytree(CONFIGS, overlay, dirs_exist_ok=True)
        shutil.copytree(user, overlay, dirs_exist_ok=True)
        with initialize_config_dir(config_dir=overlay, version_base="1.3"):
            return compose(config_name="mend", overrides=overrides)


def load_config(overrides: list[str], builds: tuple[str, ...] = (), config_dir: str | None = None) -> DictConfig:
    """The composed config with its paths resolved (see the module docstring); `builds` names the
    `paths` keys this command writes."""
    cfg = _compose(overrides, config_dir)
    if cfg.paths.home is None:
        cfg.paths.home = str(home())
    root = Path(cfg.paths.home)
    for key, (name, marker, shipped) in BUILT.items():
        if cfg.paths[key] is None:
            built = root / name
            cfg.paths[key] = str(built if key in builds or (built / marker if marker else built).exists() else shipped)
    for key in ("runs", "journal"):
        if cfg.paths[key] is None:
            cfg.paths[key] = str(root / key)
    return cfg
