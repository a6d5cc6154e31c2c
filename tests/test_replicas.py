"""A journal in a real PostgreSQL server (started by the `postgres` fixture) and read replicas that
follow it: in process first, then a leader and two replicas as real `mend serve` processes."""

import functools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mend.errors import JournalUnavailableError, NotLeaderError, StateConflictError
from mend.models import load_model
from mend.records import EditRecord
from server.app import MendServer, ServerConfig
from server.client import EditClient
from mend.model_state import edited_state
from conftest import assert_same, weights


@pytest.fixture
def open_service(open_service, pg_journal):  # the shared fixture, on a new PostgreSQL database
    return functools.partial(open_service, journal=pg_journal)


@pytest.fixture
def records(world):
    return world.edit_split("test").records + world.edit_split("val").records


def test_a_postgresql_journal_keeps_the_guarantees_of_the_embedded_one(open_service, records, trained_gpt2_dir):
    base = edited_state(load_model(trained_gpt2_dir, device="cpu")[0])
    service = open_service()
    first = service.apply([records[0]]).edits[0]
    batch = service.apply(records[1:4], request_id="batch-1")
    assert service.apply(records[1:4], request_id="batch-1").replayed and service.revision == 2  # idempotent
    with pytest.raises(StateConflictError, match="already used for a different request"):
        service.apply(records[4:6], request_id="batch-1")
    newer = service.apply([EditRecord(prompt=records[0].prompt, target_new=records[1].target_new)]).edits[0]
    assert service.get(first.edit_id).superseded_by == newer.edit_id
    service.rollback_edit(batch.edits[1].edit_id, author="bob")
    with pytest.raises(StateConflictError, match="another server is writing to the journal"):
        open_service()  # one writer at a time
    live, revision = weights(service), service.revision
    service.close()
    reopened = open_service()  # the writer's lock went with its connection
    assert reopened.revision == revision == 4 and reopened.n_active == 3
    assert_same(weights(reopened), live)
    assert reopened.get(batch.edits[1].edit_id).rolled_back_by == "bob"
    reopened.rollback_edit(newer.edit_id)
    assert reopened.get(first.edit_id).active  # the superseded edit came back
    reopened.rollback_to(0)
    assert_same(weights(reopened), base)


def test_a_replica_follows_the_leader_bit_for_bit_and_refuses_writes(open_service, records, tmp_path, tiny_editor_dir):
    leader = open_service()
    leader.apply([records[0]])
    replica = open_service(leader="leader.example:50051")  # catches up on start
    assert replica.revision == 1 and replica.model_info(True)["weights_hash"] == leader.model_info(True)["weights_hash"]
    leader.apply(records[1:5])
    leader.apply([EditRecord(prompt=records[2].prompt, target_new=records[0].target_new)])  # supersedes
    leader.rollback_edit("edit-000002")
    leader.rollback_to(2)
    leader.apply(records[5:7])
    assert replica.catch_up(max_revisions=2) == 3 and replica.revision == 3  # a bounded step: 3 revisions still to go
    assert replica.catch_up() == 0 and replica.revision == leader.revision == 6
    assert_same(weights(replica), weights(leader))
    info = replica.model_info(weights_hash=True)
    assert (info["role"], info["leader"], info["journal_revision"]) == ("replica", "leader.example:50051", 6)
    assert info["weights_hash"] == leader.model_info(True)["weights_hash"] != ""
    assert [(e.edit_id, e.active, e.superseded_by) for e in replica.list()] == [(e.edit_id, e.active, e.superseded_by) for e in leader.list()]
    before = weights(replica)
    for write in (lambda: replica.apply([records[8]]), lambda: replica.rollback_edit("edit-000001"), lambda: replica.rollback_to(0)):
        with pytest.raises(NotLeaderError, match="read replica: send writes to the leader at leader.example:50051"):
            write()
    assert_same(weights(replica), before)
    assert leader.journal.revision == 6
    assert replica.apply([records[8]], dry_run=True).edits[0].post  # a preview writes nothing: replicas answer it
    other = tmp_path / "other-editor"
    shutil.copytree(tiny_editor_dir, other)
    (other / "editor.json").write_text((other / "editor.json").read_text() + "\n")  # another editor (by hash)
    with pytest.raises(StateConflictError, match="start the replica with the leader's editor"):
        open_service(editor=other, leader="leader.example:50051")


def test_a_replica_follows_an_embedded_sqlite_journal_by_polling(open_service, records, tmp_path):
    leader = open_service(journal=tmp_path / "journal")
    leader.apply(records[:3])
    replica = open_service(journal=tmp_path / "journal", leader="leader.example:50051")
    leader.rollback_edit("edit-000002")
    leader.apply([records[3]])
    assert replica.catch_up() == 0 and replica.revision == leader.revision == 3
    assert_same(weights(replica), weights(leader))


def test_lost_database_connections_are_replaced_and_a_writer_catches_up_on_what_it_missed(open_service, records, postgres,
                                                                                          pg_journal):
    import psycopg

    leader, replica = open_service(), open_service(leader="leader.example:50051")
    leader.apply([records[0]])
    with psycopg.connect(pg_journal, autocommit=True) as admin:  # drop every session of the journal: the leader's lock goes
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=current_database() AND pid<>pg_backend_pid()")
    other = open_service()  # another writer takes the journal meanwhile and writes revision 2
    other.apply([records[1]])
    other.close()
    assert leader.apply([records[2]]).revision == 3  # a new connection, the lock again, revision 2 applied first
    assert replica.catch_up() == 0 and replica.revision == 3
    fresh = open_service(leader="leader.example:50051")
    assert_same(weights(leader), weights(fresh))
    assert_same(weights(replica), weights(fresh))
    before = weights(leader)
    postgres.stop("fast")  # the database is down: writes fail cleanly and change nothing
    try:
        with pytest.raises(JournalUnavailableError, match="journal database .* retry"):
            leader.apply([records[3]])
        with pytest.raises(JournalUnavailableError):
            leader.rollback_edit("edit-000001")
        assert_same(weights(leader), before) and leader.revision == 3
    finally:
        postgres.start()
    assert leader.apply([records[3]]).revision == 4 and replica.catch_up() == 0
    assert_same(weights(replica), weights(leader))


def test_a_replica_server_reports_not_serving_while_behind_and_refuses_writes(open_service, records):
    leader = open_service()
    replica = MendServer(ServerConfig(port=0, role="replica", leader="127.0.0.1:1", max_lag=0, poll_s=5),
                         lambda: open_service(leader="127.0.0.1:1"))
    replica.start(wait=True)
    client = EditClient(f"127.0.0.1:{replica.port}", timeout=30)
    health = health_pb2_grpc.HealthStub(client.channel)

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service="mend.v1.EditService")).status

    def wait_for(condition, seconds=20):
        end = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < end
            time.sleep(0.01)

    try:
        assert status() == health_pb2.HealthCheckResponse.SERVING
        service = replica.holder.service
        with service.state.lock.write():  # the replica cannot apply what it is told about
            leader.apply([records[0]])  # NOTIFY wakes it long before poll_s
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING and service.revision == 1)
        info = client.info(weights_hash=True)
        assert (info.role, info.model_revision, info.journal_revision) == ("replica", 1, 1)
        assert info.weights_hash == leader.model_info(True)["weights_hash"] != "" and client.info().weights_hash == ""
        with pytest.raises(grpc.RpcError) as err:
            client.apply(records[1])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "leader at 127.0.0.1:1" in err.value.details()
        assert leader.journal.revision == 1
    finally:
        client.close()
        replica.stop(0)


# ---------------------------------------------------------------------- real processes


def launch(name, tmp_path, pg_journal, models, *extra):
    trained_gpt2_dir, tiny_editor_dir, world_path = models
    cmd = [sys.executable, "-m", "mend_cli.main", "serve", f"paths.base_model={trained_gpt2_dir}", f"paths.editor={tiny_editor_dir}",
           f"paths.journal={pg_journal}", f"paths.world={world_path}", "targets.n_last_blocks=2", "server.port=0", "device=cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one torch thread per server process
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / f"{name}.log", "a"), text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, (line, (tmp_path / f"{name}.log").read_text()[-2000:])
    client = EditClient(f"127.0.0.1:{match.group(1)}", timeout=60)
    client.wait_ready(120)
    return proc, client


def converged(leader, replicas, seconds=30):
    """Wait until every replica is at the leader's revision; then their weights' hashes must match."""
    want = leader.info(weights_hash=True)
    end = time.monotonic() + seconds
    for r in replicas:
        while (info := r.info()).model_revision < want.model_revision:
            assert time.monotonic() < end, f"a replica is at revision {info.model_revision}, the leader at {want.model_revision}"
            time.sleep(0.02)
        info = r.info(weights_hash=True)
        assert info.model_revision == want.model_revision and info.weights_hash == want.weights_hash
        assert info.active_edits == want.active_edits


@pytest.mark.slow
def test_a_leader_and_two_replica_processes_agree_bit_for_bit_through_kills(tmp_path, pg_journal, trained_gpt2_dir, tiny_editor_dir,
                                                                           world_path, records):
    """200 edits and rollbacks through the leader; both replicas reach its weights bit for bit (the same
    sha256 at the same revision) within 30 s; a replica SIGKILLed and restarted catches up; a leader
    SIGKILLed mid-stream loses no acknowledged edit."""
    models = (trained_gpt2_dir, tiny_editor_dir, world_path)
    leader_proc, leader = launch("leader", tmp_path, pg_journal, models)
    replica_args = ["server.role=replica", "server.leader=leader.example:50051", "server.poll_s=0.5"]
    replicas = [launch(f"replica{i}", tmp_path, pg_journal, models, *replica_args) for i in range(2)]
    rng, applied, ops = random.Random(0), {}, [0]  # applied: request_id -> edit_id of every acknowledged apply

    def stream(until):
        live = [e.edit_id for e in leader.edits(active_only=True)]
        while ops[0] < until:
            if live and rng.random() < 0.3:
                leader.rollback(live.pop(rng.randrange(len(live))))
            else:
                rid = f"req-{ops[0]}"
                reply = leader.apply(records[ops[0] % len(records)], request_id=rid, skip_metrics=True)
                applied[rid] = reply.edit_id
                live.append(reply.edit_id)
            ops[0] += 1

    def until_killed():
        try:
            stream(10**6)
        except grpc.RpcError:
            pass

    try:
        stream(100)
        converged(leader, [c for _, c in replicas])
        for _, replica in replicas:  # the reads a replica answers, as the leader does
            r = records[5]
            assert replica.generate(r.prompt, 4) == leader.generate(r.prompt, 4)
            assert replica.score(r.prompt, r.target_new).token_logprobs == leader.score(r.prompt, r.target_new).token_logprobs
            assert [(e.edit_id, e.active) for e in replica.edits()] == [(e.edit_id, e.active) for e in leader.edits()]
            assert replica.get("edit-000001") == leader.get("edit-000001")
        with pytest.raises(grpc.RpcError) as err:
            replicas[0][1].apply(records[0])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "leader.example:50051" in err.value.details()

        replicas[1][0].kill()  # a replica SIGKILLed misses writes, then catches up on start
        replicas[1][0].wait()
        replicas[1][1].close()
        stream(150)
        replicas[1] = launch("replica1", tmp_path, pg_journal, models, *replica_args)
        converged(leader, [c for _, c in replicas])

        writer = threading.Thread(target=until_killed)
        writer.start()
        while ops[0] < 170:
            time.sleep(0.001)
        leader_proc.kill()  # SIGKILL mid-stream: no acknowledged edit may be lost
        leader_proc.wait()
        writer.join()
        leader.close()
        leader_proc, leader = launch("leader", tmp_path, pg_journal, models)
        journal = {e.request_id: e.edit_id for e in leader.edits()}
        assert all(journal.get(rid) == eid for rid, eid in applied.items())
        ops[0] += 1  # the call the kill interrupted is not retried: a fresh request id
        stream(200)
        converged(leader, [c for _, c in replicas])
        assert ops[0] >= 200 and leader.info().model_revision >= 195
    finally:
        for proc, client in [(leader_proc, leader)] + replicas:
            client.close()
            proc.send_signal(signal.SIGTERM)
        for proc, _ in [(leader_proc, leader)] + replicas:
            proc.wait(60)
