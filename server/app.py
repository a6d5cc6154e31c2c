"""Server lifecycle: build the gRPC server, load the model in the background, serve, drain.

Health (`grpc.health.v1`) reports NOT_SERVING until the model and editor are loaded and warmed
up, and again from the moment a shutdown starts; mend.v1 calls get UNAVAILABLE meanwhile. A read
replica (`role: replica`) follows the leader's journal in a thread of its own and also reports
NOT_SERVING while it is more than `max_lag` revisions behind (it still answers reads, each with the
revision it is at).
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mend.errors import ConfigError, MendError
from mend.service import EditService
from server.api.mend.v1 import editing_pb2, editing_pb2_grpc
from server.interceptor import ServiceInterceptor, Token, load_tokens
from server.servicer import EditServicer

log = logging.getLogger(__name__)

SERVICE_NAME = editing_pb2.DESCRIPTOR.services_by_name["EditService"].full_name  # "mend.v1.EditService"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 50051  # 0 = any free port (the bound one is printed and returned)
    max_concurrent: int = 16  # mend.v1 calls in progress at once; more get RESOURCE_EXHAUSTED
    max_message_mb: int = 16
    grace_s: float = 10.0  # how long in-flight calls may finish at shutdown
    read_token: str = ""  # bearer token for queries, named "read_token"; empty = none
    write_token: str = ""  # bearer token for edits and rollbacks (also queries), named "write_token"; empty = none
    tokens_file: str = ""  # YAML/JSON list of named tokens {name, token, scope: read | write} (server.interceptor)
    anonymous_reads: bool = False  # with tokens configured, let queries through without one (writes still need a write token)
    tls_cert: str = ""  # PEM paths; both or neither
    tls_key: str = ""
    metrics_port: int = -1  # Prometheus /metrics over HTTP; -1 = off, 0 = any free port
    metrics_host: str = "127.0.0.1"
    role: str = "leader"  # leader: takes writes; replica: follows the leader's journal, refuses writes
    leader: str = ""  # a replica: the leader's address, named in its refusals of writes
    max_lag: int = 10  # a replica further behind the journal than this many revisions reports NOT_SERVING
    poll_s: float = 1.0  # a replica looks at the journal at least this often (PostgreSQL also wakes it by NOTIFY)

    def __post_init__(self) -> None:
        if self.role not in ("leader", "replica"):
            raise ConfigError(f"server.role must be leader or replica, not {self.role!r}")
        if self.role == "replica" and not self.leader:
            raise ConfigError("a replica needs server.leader: the leader's address, where clients send writes")
        if self.max_lag < 0 or self.poll_s <= 0:
            raise ConfigError("server.max_lag must be >= 0 and server.poll_s > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both server.tls_cert and server.tls_key (PEM files), or neither")
        for path in (self.tls_cert, self.tls_key):
            if path and not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        if self.max_concurrent < 1 or self.max_message_mb < 1 or not 0 <= self.port < 65536:
            raise ConfigError("server.max_concurrent and server.max_message_mb must be >= 1, server.port in 0..65535")
        self.tokens()  # a bad tokens file fails at start, not at the first call

    def tokens(self) -> list[Token]:
        tokens = [Token(n, secret, scope) for n, secret, scope in
                  (("read_token", self.read_token, "read"), ("write_token", self.write_token, "write")) if secret]
        tokens += load_tokens(self.tokens_file) if self.tokens_file else []
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise ConfigError(f"two tokens are named alike ({names}): rename the tokens file's entries")
        return tokens


class ServerMetrics:
    """Prometheus metrics in a registry of their own (several servers can live in one process)."""

    def __init__(self, holder: "ServiceHolder"):
        self.registry = CollectorRegistry()
        self.edits = Counter("mend_edits_applied", "Edits applied (retries of a request_id not counted)", registry=self.registry)
        self.rollbacks = Counter("mend_rollbacks", "Rollbacks that changed the model", registry=self.registry)
        self.latency = Histogram("mend_rpc_latency_seconds", "mend.v1 call latency", ["method", "code"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.coalesced = Histogram("mend_coalesced_calls", "ApplyEdit calls applied together as one update (one revision)",
                                   registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        active = Gauge("mend_active_edits", "Edits active in the served weights", registry=self.registry)
        active.set_function(lambda: holder.service.n_active if holder.service else 0)
        revision = Gauge("mend_model_revision", "Current model revision", registry=self.registry)
        revision.set_function(lambda: holder.service.revision if holder.service else 0)
        self.behind = Gauge("mend_revisions_behind", "Revisions the journal has beyond the served model (a replica's lag)",
                            registry=self.registry)

    def count_edits(self, n: int) -> None:
        self.edits.inc(n)

    def observe_update(self, calls: int, edits: int) -> None:
        self.coalesced.observe(calls)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.latency.labels(method, code).observe(seconds)


class ServiceHolder:
    """What the servicer and interceptor share: the lifecycle phase and, once loaded, the service."""

    def __init__(self):
        self.phase = "starting"  # starting -> serving -> draining; or failed
        self.service: EditService | None = None
        self.metrics = ServerMetrics(self)


class MendServer:
    def __init__(self, cfg: ServerConfig, load_service: Callable[[], EditService]):
        self.cfg, self.load_service = cfg, load_service
        self.holder = ServiceHolder()
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.port = self.metrics_port = None
        self._httpd = None
        self._stopping = threading.Event()
        self._follower: threading.Thread | None = None

    def start(self, wait: bool = False) -> int:
        """Bind and start serving health at once; load the service in the background. Returns the port."""
        cfg = self.cfg
        size = cfg.max_message_mb * 1024 * 1024
        tokens = cfg.tokens()
        self._warn_about_exposure(tokens)
        self.interceptor = ServiceInterceptor(self.holder, tokens, cfg.max_concurrent, cfg.anonymous_reads)
        self.grpc = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.max_concurrent + 4, thread_name_prefix="mend-rpc"),
            interceptors=[self.interceptor],
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
        )
        editing_pb2_grpc.add_EditServiceServicer_to_server(EditServicer(self.holder), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        self.grpc.start()
        if cfg.metrics_port >= 0:
            self._httpd, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, registry=self.holder.metrics.registry)
            self.metrics_port = self._httpd.server_port
        loader = threading.Thread(target=self._load, name="mend-load", daemon=True)
        loader.start()
        if wait:
            loader.join()
        return self.port

    def _warn_about_exposure(self, tokens: list[Token]) -> None:
        cfg = self.cfg
        if cfg.tokens_file and (mode := Path(cfg.tokens_file).stat().st_mode) & 0o077:
            log.warning("the tokens file %s is readable by group or others (mode %o): chmod 600 %s", cfg.tokens_file, mode & 0o777,
                        cfg.tokens_file)
        if cfg.host in ("127.0.0.1", "localhost", "::1"):
            return
        if not tokens:
            log.warning("serving on %s with no token configured: anyone who can reach it can edit the model "
                        "(set MEND_WRITE_TOKEN or server.tokens_file)", cfg.host)
        elif not cfg.tls_cert:
            log.warning("serving on %s without TLS: bearer tokens cross the network in clear text (set server.tls_cert and tls_key)",
                        cfg.host)

    def _load(self) -> None:
        try:
            service = self.load_service()
            service.warm_up()
            service.on_update = self.holder.metrics.observe_update
        except BaseException as e:  # reported by serve(); health stays NOT_SERVING
            log.exception("loading the model failed")
            self.load_error, self.holder.phase = e, "failed"
        else:
            self.holder.service, self.holder.phase = service, "serving"
            self._set_health(True)
            log.info("serving %s (revision %d) as %s", SERVICE_NAME, service.revision, self.cfg.role)
            if self.cfg.role == "replica":
                self._follower = threading.Thread(target=self._follow, args=(service,), name="mend-follow", daemon=True)
                self._follower.start()
        finally:
            self.ready.set()

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _follow(self, service: EditService) -> None:
        """A replica: apply the leader's new revisions as the journal gets them (woken by NOTIFY on
        PostgreSQL, else every poll_s), at most 100 at a time so that reads go on while it catches up;
        NOT_SERVING while more than max_lag revisions behind or while the journal cannot be read."""
        behind = 0
        while not self._stopping.is_set():
            try:
                if not behind:
                    service.journal.wait(self.cfg.poll_s)
                self._report_lag(service.journal.revision - service.revision)
                behind = service.catch_up(max_revisions=100)
                self._report_lag(behind)
            except Exception as e:
                if isinstance(e, MendError):  # the journal's database unreachable, and the like: no trace every poll
                    log.warning("following the journal failed: %s; retrying in %.1f s", e, self.cfg.poll_s)
                else:
                    log.exception("following the journal failed; retrying in %.1f s", self.cfg.poll_s)
                self._set_health(False)
                self._stopping.wait(self.cfg.poll_s)
                behind = 0

    def _report_lag(self, behind: int) -> None:
        self._set_health(behind <= self.cfg.max_lag)
        self.holder.metrics.behind.set(behind)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish, close the journal."""
        self.holder.phase = "draining"
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.grpc.stop(self.cfg.grace_s if grace is None else grace).wait()
        self.ready.wait()
        if self._follower is not None:
            self._follower.join()
        if self.holder.service is not None:
            self.holder.service.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        log.info("server stopped")


def serve(cfg: ServerConfig, load_service: Callable[[], EditService]) -> int:
    """Run until SIGINT/SIGTERM, then drain. Returns a process exit code."""
    server = MendServer(cfg, load_service)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start()
    scheme = "tls" if cfg.tls_cert else "insecure"
    print(f"listening on {cfg.host}:{port} ({scheme}); loading the model...", flush=True)
    server.ready.wait()
    if server.load_error is not None:
        print(f"error: could not load the model: {server.load_error}", flush=True)
        server.stop(0)
        return 2
    info = server.holder.service.model_info()
    print(f"serving {SERVICE_NAME} on {cfg.host}:{port}: revision {info['revision']}, {info['active_edits']} active edits"
          + (f"; metrics on http://{cfg.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else ""), flush=True)
    while not stop.wait(0.5):
        pass
    print("shutting down: draining in-flight calls", flush=True)
    server.stop()
    return 0
