"""Authentication fails closed (server.interceptor): the real server on port 0, tokens from the
environment (through the CLI's config), from a tokens file, and from both."""

import logging
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mend.errors import ConfigError
from mend.service import EditService
from mend_cli.config import load_config
from mend_cli.serve import server_config
from server.app import MendServer, ServerConfig
from server.client import EditClient

OK, UNAUTH, DENIED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
ENV_READ, ENV_WRITE = "env-read-secret-0123", "env-write-secret-0123"
FILE_READ, FILE_WRITE = "file-read-secret-0123", "file-write-secret-0123"


@pytest.fixture
def start(trained_gpt2_dir, tiny_editor_dir, world, tmp_path):
    """start(ServerConfig) -> address of a loaded server; every server is stopped at the end."""
    servers = []

    def make(cfg: ServerConfig) -> str:
        server = MendServer(cfg, lambda: EditService.open(str(trained_gpt2_dir), str(tiny_editor_dir), str(tmp_path / f"journal{len(servers)}"),
                                                          device="cpu", locality=world.locality_probes(), n_last_blocks=2))
        server.start(wait=True)
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield make
    for s in servers:
        s.stop(0)


def tokens_file(tmp_path, entries, mode=0o600):
    path = tmp_path / "tokens.yaml"
    path.write_text("".join(f"- {{name: {n}, token: {t}, scope: {s}}}\n" for n, t, s in entries))
    path.chmod(mode)
    return str(path)


def env_config(monkeypatch, read="", write="", **overrides) -> ServerConfig:
    """The server's config as `mend serve` builds it, with MEND_READ_TOKEN / MEND_WRITE_TOKEN set."""
    for name, value in (("MEND_READ_TOKEN", read), ("MEND_WRITE_TOKEN", write)):
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    return server_config(load_config(["server.port=0", *(f"server.{k}={v}" for k, v in overrides.items())]))


def outcome(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return OK


def matrix(address, record, callers: dict[str, str]) -> dict[str, tuple]:
    """{caller: (code of a read, code of ApplyEdit, code of RollbackTo)} for each caller's token."""
    out = {}
    for who, token in callers.items():
        client = EditClient(address, token=token, timeout=60)
        out[who] = (outcome(lambda: client.generate(record.prompt, 2)), outcome(lambda: client.apply(record)),
                    outcome(lambda: client.rollback_to(0)))
        client.close()
    return out


CLOSED = {"none": (UNAUTH,) * 3, "wrong": (UNAUTH,) * 3, "read": (OK, DENIED, DENIED), "write": (OK, OK, OK)}


@pytest.mark.parametrize("source", ["env", "file", "both"])
def test_every_call_needs_a_valid_token_and_writes_a_write_token(start, records, tmp_path, monkeypatch, caplog, source):
    caplog.set_level(logging.DEBUG)
    if source == "env":
        cfg, read, write = env_config(monkeypatch, ENV_READ, ENV_WRITE), ENV_READ, ENV_WRITE
    elif source == "file":
        path = tokens_file(tmp_path, [("dash", FILE_READ, "read"), ("alice", FILE_WRITE, "write")])
        cfg, read, write = env_config(monkeypatch, tokens_file=path), FILE_READ, FILE_WRITE
    else:  # a read token from the environment, the write token from the file
        path = tokens_file(tmp_path, [("alice", FILE_WRITE, "write")])
        cfg, read, write = env_config(monkeypatch, ENV_READ, tokens_file=path), ENV_READ, FILE_WRITE
    address = start(cfg)
    got = matrix(address, records[0], {"none": "", "wrong": "made-up-token-0123456789", "read": read, "write": write})
    assert got == CLOSED
    if source == "both":  # the environment's read token does not write, the file's write token reads
        assert matrix(address, records[1], {"env-read": ENV_READ})["env-read"] == CLOSED["read"]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))  # health stays open for probes
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert not any(secret in caplog.text for secret in (ENV_READ, ENV_WRITE, FILE_READ, FILE_WRITE, "made-up-token"))


def test_a_read_token_alone_leaves_no_write_path_open(start, records, monkeypatch):
    address = start(env_config(monkeypatch, read=ENV_READ))
    got = matrix(address, records[0], {"none": "", "wrong": "made-up-token-0123456789", "read": ENV_READ})
    assert got == {k: CLOSED[k] for k in ("none", "wrong", "read")}


def test_anonymous_reads_are_an_explicit_setting_and_never_open_writes(start, records, monkeypatch):
    address = start(env_config(monkeypatch, ENV_READ, ENV_WRITE, anonymous_reads="true"))
    got = matrix(address, records[0], {"none": "", "wrong": "made-up-token-0123456789", "read": ENV_READ, "write": ENV_WRITE})
    assert got == {**CLOSED, "none": (OK, UNAUTH, UNAUTH)}  # a wrong token is still refused, even for a read


def test_without_any_token_the_server_is_open(start, records, monkeypatch):
    address = start(env_config(monkeypatch))
    assert matrix(address, records[0], {"none": "", "any": "whatever-0123456789"}) == {"none": (OK,) * 3, "any": (OK,) * 3}


def test_exposure_and_a_readable_tokens_file_are_warned_about_at_start(start, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="server.app")
    start(env_config(monkeypatch, host="0.0.0.0"))
    assert "with no token configured: anyone who can reach it can edit the model" in caplog.text
    caplog.clear()
    path = tokens_file(tmp_path, [("alice", FILE_WRITE, "write")], mode=0o644)
    start(env_config(monkeypatch, tokens_file=path))  # on loopback: only the file's mode is warned about
    assert f"the tokens file {path} is readable by group or others (mode 644): chmod 600" in caplog.text
    assert "no token configured" not in caplog.text and FILE_WRITE not in caplog.text
    caplog.clear()
    os.chmod(path, 0o600)
    start(env_config(monkeypatch, tokens_file=path, host="0.0.0.0"))
    assert "without TLS: bearer tokens cross the network in clear text" in caplog.text and "readable by group" not in caplog.text


def test_named_tokens_are_journaled_as_the_authors_of_writes(start, records, tmp_path):
    path = tokens_file(tmp_path, [("alice", "alice-secret-0123456789", "write"), ("dashboards", "dash-secret-0123456789", "read")])
    address = start(ServerConfig(port=0, tokens_file=path, write_token="write-secret"))
    alice, reader = EditClient(address, token="alice-secret-0123456789"), EditClient(address, token="dash-secret-0123456789")
    with pytest.raises(grpc.RpcError) as err:
        reader.apply(records[0])
    assert err.value.code() == DENIED and "'dashboards' has the read scope" in err.value.details()
    first = alice.apply(records[0])
    second = EditClient(address, token="write-secret").apply(records[1])
    alice.rollback(second.edit_id)
    edits = {e.edit_id: e for e in reader.edits()}
    assert (edits[first.edit_id].applied_by, edits[first.edit_id].rolled_back_by) == ("alice", "")
    assert (edits[second.edit_id].applied_by, edits[second.edit_id].rolled_back_by) == ("write_token", "alice")


@pytest.mark.parametrize("content, message", [
    ("- {name: a, token: short, scope: write}", "at least 16 characters"),
    ("- {name: a, token: aaaaaaaaaaaaaaaaaaaa, scope: admin}", "scope read or write"),
    ("- {name: a, token: aaaaaaaaaaaaaaaaaaaa, scope: write}\n- {name: a, token: bbbbbbbbbbbbbbbbbbbb, scope: read}", "share a name"),
    ("- {name: a, token: aaaaaaaaaaaaaaaaaaaa}", "exactly the keys"),
    ("{}", "non-empty list"),
])
def test_a_bad_tokens_file_fails_at_start_naming_what_to_fix(tmp_path, content, message):
    (tmp_path / "tokens.yaml").write_text(content)
    with pytest.raises(ConfigError, match=message):
        ServerConfig(tokens_file=str(tmp_path / "tokens.yaml"))


@pytest.fixture
def records(world):
    return world.edit_split("test").records
