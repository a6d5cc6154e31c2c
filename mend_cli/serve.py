"""`mend serve`: the gRPC editing service on the configured base model, editor and journal."""

from __future__ import annotations

import dataclasses
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
                            target_patterns=cfg.targets.patterns, n_last_blocks=cfg.targets.n_last_blocks,
                            leader=cfg.server.leader if cfg.server.role == "replica" else None)


def server_config(cfg: DictConfig):
    from mend_cli.main import as_config
    from server.app import ServerConfig

    values = OmegaConf.to_container(cfg.server, resolve=True)
    return as_config(ServerConfig, None, **{k: v for k, v in values.items() if k not in ("limits", "dtype")})


def serve_cmd(cfg: DictConfig) -> int:
    from server.app import serve

    return serve(server_config(cfg), lambda: open_service(cfg))


def _in_process_server(cfg: DictConfig, journal: str | None = None):
    """A MendServer on a free loopback port (optionally on a scratch journal), loaded and ready."""
    from server.app import MendServer

    if journal is not None:
        cfg = OmegaConf.merge(cfg, {"paths": {"journal": journal}})
    server = MendServer(dataclasses.replace(server_config(cfg), host="127.0.0.1", port=0, metrics_port=-1), lambda: open_service(cfg))
    server.start(wait=True)
    if server.load_error is not None:
        server.stop(0)
        raise server.load_error
    return server


def client_demo_cmd(cfg: DictConfig) -> None:
    """Start the server on the configured model and run the README's client example against it."""
    from server import example_client

    server = _in_process_server(cfg)
    print(f"\n== the gRPC server on 127.0.0.1:{server.port} (journal {cfg.paths.journal}) and the example client ==")
    try:
        example_client.main(f"127.0.0.1:{server.port}")
    finally:
        server.stop(2)


def loadtest_cmd(cfg: DictConfig) -> None:
    """Resident memory with 0 / 100 / 1,000 active edits, then (from the base model again) ApplyEdit load
    for 1/4/16 clients, on a scratch journal, next to one forward+backward pass. With `loadtest.replica`
    (the address of a replica following `paths.journal`, a scratch PostgreSQL database): the load on
    that journal, and how far behind the replica follows; no memory profile."""
    import statistics
    import tempfile

    from mend.benchmark import forward_backward_seconds
    from mend.data.world import World
    from mend.errors import ConfigError
    from mend.journal_backends import is_url
    from server.load_test import format_rows, memory_profile, run_load

    replica = cfg.loadtest.replica
    if replica and not is_url(cfg.paths.journal):
        raise ConfigError("loadtest.replica needs paths.journal=postgresql://... : the scratch database the replica follows")
    world = World.load(cfg.paths.world)
    records = world.edit_split("test").records
    memory = []
    with tempfile.TemporaryDirectory() as scratch:
        journal = cfg.paths.journal if replica else scratch
        server = _in_process_server(cfg, journal)
        try:
            address = f"127.0.0.1:{server.port}"
            service = server.holder.service
            if not replica:
                memory = memory_profile(address, records + world.edit_split("val").records, Path(journal), cfg.loadtest.memory_edits)
            service.rollback_to(0)
            rows = [run_load(address, records, n, cfg.loadtest.requests, cfg.loadtest.max_seconds, replica=replica,
                             leader_revision=lambda: service.revision) for n in cfg.loadtest.clients]
            with service.state.lock.read():
                fwd_bwd = statistics.median(forward_backward_seconds(service.model, service.tokenizer, r) for r in records[:21])
        finally:
            server.stop(2)
    print(format_rows(rows))
    print(f"forward+backward of the base model: {fwd_bwd * 1000:.1f} ms; ApplyEdit p50 with 1 client = "
          f"{rows[0]['p50_ms'] / (fwd_bwd * 1000):.1f}x (it also measures the edit before and after, and journals it)")
    if memory:
        print("resident memory of the process holding the server (MiB), by active edits; journal on disk per edit:")
    for m in memory:
        print(f"  {m['active']:>5} active: {m['rss_mb']:7.1f} MiB" + (f", journal {m['journal_kb_per_edit']:.1f} KiB per edit" if m["active"] else ""))
