"""`mend serve`: the gRPC editing service on the configured base model, editor and journal."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mend")


def open_service(cfg: DictConfig):
    """The EditService for the configured model, editor and journal (shared by `serve` and local `edit`)."""
    from mend.data.world import World
    from mend.service import EditService, ServiceLimits
    from mend_cli.main import as_config

    editor = cfg.paths.editor if (Path(cfg.paths.editor) / "editor.json").is_file() else None
    if editor is None:
        log.warning("no editor at %s: queries work, edits will be refused (train one with `mend train-editor`)", cfg.paths.editor)
    # the server-held locality prompts: true facts of never-edited entities of the synthetic world
    locality = World.load(cfg.paths.world).locality_probes() if Path(cfg.paths.world).is_file() else []
    return EditService.open(cfg.paths.base_model, editor, cfg.paths.journal, device=cfg.device, dtype=cfg.server.dtype,
                            locality=locality, limits=as_config(ServiceLimits, cfg.server.limits),
                            target_patterns=cfg.targets.patterns, n_last_blocks=cfg.targets.n_last_blocks)


def server_config(cfg: DictConfig):
    from mend_cli.main import as_config
    from server.app import ServerConfig

    values = OmegaConf.to_container(cfg.server, resolve=True)
    return as_config(ServerConfig, None, **{k: v for k, v in values.items() if k not in ("limits", "dtype")})


def serve_cmd(cfg: DictConfig) -> int:
    from server.app import serve

    return serve(server_config(cfg), lambda: open_service(cfg))
