"""Files that ship with the package, and where everything else is written.

Shipped: the configs, the synthetic world, the sample edit file and the trained default model and
editor. In a source checkout (or an editable install) they are the repository's top-level
`configs/` and `data/`; an installed wheel carries the same directories as package data
(`mend/_configs`, `mend/_data`), found through importlib.resources. Nothing is looked up in the
current directory.

Written: built models, editors, evaluation runs and the server's journal go under one home
directory, `MEND_HOME`, else `$XDG_DATA_HOME/mend`, else `~/.local/share/mend`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def packaged(name: str) -> Path:
    """A shipped top-level directory (`configs` or `data`)."""
    if (_CHECKOUT / name).is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
        return _CHECKOUT / name
    return Path(str(resources.files("mend") / f"_{name}"))


CONFIGS = packaged("configs")
DATA = packaged("data")
WORLD = DATA / "synthetic_world.json"  # the synthetic world the default model knows
SHIPPED = DATA / "default"  # the trained default base model and editor (made by `mend ship`)


def home() -> Path:
    """Where built artifacts, runs and journals go unless a path is given."""
    if os.environ.get("MEND_HOME"):
        return Path(os.environ["MEND_HOME"]).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share").expanduser() / "mend"
