"""Faults beyond SIGKILL: a journal that cannot grow, a damaged journal, PostgreSQL restarted under a
stream of edits; and `mend journal check` / `mend journal backup`."""

import sqlite3
import subprocess
import sys
import threading
import time

import grpc
import pytest
from safetensors.torch import load, save

from mend.errors import JournalCorruptError
from mend.journal import backup_journal, check_journal
from server.app import MendServer, ServerConfig
from server.client import EditClient
from conftest import assert_same, weights


@pytest.fixture
def records(world):
    return world.edit_split("test").records + world.edit_split("val").records


def serve(open_service, **service):
    server = MendServer(ServerConfig(port=0, grace_s=2), lambda: open_service(**service))
    server.start(wait=True)
    assert server.load_error is None
    return server, EditClient(f"127.0.0.1:{server.port}", timeout=60)


def code_of(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def rows(journal_dir):
    with sqlite3.connect(journal_dir / "journal.sqlite3") as db:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("revisions", "edits", "events"))


# ---------------------------------------------------------------------- a journal that cannot grow


def test_a_full_journal_refuses_writes_with_resource_exhausted_and_loses_nothing(open_service, records, tmp_path):
    server, client = serve(open_service)
    try:
        client.apply(records[0])
        service = server.holder.service
        db = service.journal._db.conn  # hold the database at its page limit: every page it has is used
        db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
        before, counts = weights(service), rows(tmp_path / "journal")
        for write in (lambda: client.apply(records[1]), lambda: client.apply_batch(records[2:5], request_id="batch")):
            got, details = code_of(write)
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "cannot grow" in details and "free disk space" in details and "nothing was written" in details
        assert service.revision == client.info().model_revision == 1 and rows(tmp_path / "journal") == counts
        assert_same(weights(service), before)
        assert client.generate(records[0].prompt, 2) and client.edits()[0].active  # queries keep working
        db.execute("PRAGMA max_page_count=1073741823")  # space is back
        assert client.apply(records[1]).model_revision == 2
        assert client.apply_batch(records[2:5], request_id="batch").model_revision == 3
        live = weights(service)
    finally:
        client.close()
        server.stop(0)
    assert_same(weights(open_service()), live)  # and a restart replays exactly that


# ---------------------------------------------------------------------- a damaged journal


def damage_blob(journal_dir):
    """Overwrite 64 bytes of the first edit's stored keys and values inside the database file."""
    path = journal_dir / "journal.sqlite3"
    with sqlite3.connect(path) as db:
        data = db.execute("SELECT data FROM edits WHERE seq=1").fetchone()[0]
    raw = bytearray(path.read_bytes())
    at = raw.find(data[-4096:-4032])  # inside its tensors, away from the safetensors header
    assert at > 0
    raw[at : at + 64] = bytes(64)
    path.write_bytes(bytes(raw))


def damage_page(journal_dir):
    """Overwrite the b-tree header of the file's second page with garbage."""
    path = journal_dir / "journal.sqlite3"
    raw = bytearray(path.read_bytes())
    raw[4096 : 4096 + 100] = bytes(range(100))
    path.write_bytes(bytes(raw))


def truncate(fraction):
    def damage(journal_dir):
        path = journal_dir / "journal.sqlite3"
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    return damage


def alter_keys(journal_dir):
    """Change one number of a rolled-back edit's stored keys, through SQL (the file itself stays valid)."""
    with sqlite3.connect(journal_dir / "journal.sqlite3") as db:
        flat = load(db.execute("SELECT data FROM edits WHERE seq=2").fetchone()[0])
        name = sorted(k for k in flat if k.endswith(".keys"))[0]
        flat[name][0, 0] += 1.0
        db.execute("UPDATE edits SET data=? WHERE seq=2", (save(flat),))


def alter_event(journal_dir):
    """Make a rolled-back edit active again in the events table."""
    with sqlite3.connect(journal_dir / "journal.sqlite3") as db:
        db.execute("UPDATE events SET active=1 WHERE seq=2 AND active=0")


@pytest.mark.parametrize("damage, found", [
    (damage_blob, "edit edit-000001"), (damage_page, "damaged"), (truncate(0.5), "damaged"), (truncate(0.0), "the file is empty"),
    (alter_keys, "edit edit-000002"), (alter_event, "revision 2: its state changes"),
])
def test_a_damaged_journal_is_never_served_and_check_names_it(open_service, records, tmp_path, damage, found):
    service = open_service()
    service.apply(records[:3])
    service.rollback_edit("edit-000002")
    service.close()
    journal = tmp_path / "journal"
    assert check_journal(journal) == []
    damage(journal)
    with pytest.raises(JournalCorruptError) as err:
        open_service()
    message = str(err.value)
    assert str(journal / "journal.sqlite3") in message and found in message
    assert "Restore it from a backup" in message and "mend journal check" in message
    problems = check_journal(journal)
    assert problems and any(found in p for p in problems)
    server = MendServer(ServerConfig(port=0), lambda: open_service())  # the server: NOT_SERVING, the load error kept
    server.start(wait=True)
    try:
        assert server.holder.phase == "failed" and isinstance(server.load_error, JournalCorruptError)
        assert code_of(lambda: EditClient(f"127.0.0.1:{server.port}").generate("a", 1))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_a_damaged_postgresql_row_is_never_served_nor_followed(open_service, records, pg_journal):
    import psycopg

    leader = open_service(journal=pg_journal)
    leader.apply(records[:2])
    replica = open_service(journal=pg_journal, leader="leader.example:50051")
    leader.apply([records[2]])
    before = weights(replica)
    with psycopg.connect(pg_journal, autocommit=True) as db:  # the new edit's keys and values changed after it was written
        db.execute("UPDATE edits SET data = overlay(data placing %s from length(data) - 8) WHERE seq=3", (bytes(4),))
    with pytest.raises(JournalCorruptError, match="edit edit-000003"):
        replica.catch_up()
    assert replica.revision == 1
    assert_same(weights(replica), before)
    with pytest.raises(JournalCorruptError, match="edit edit-000003"):
        open_service(journal=pg_journal, leader="leader.example:50051")
    assert any("edit-000003" in p for p in check_journal(pg_journal))


# ---------------------------------------------------------------------- PostgreSQL restarted mid-stream


@pytest.mark.slow
def test_postgresql_restarted_under_a_stream_of_edits_loses_no_acknowledged_edit(open_service, records, postgres, pg_journal):
    leader, client = serve(open_service, journal=pg_journal)
    replica = MendServer(ServerConfig(port=0, role="replica", leader="127.0.0.1:1", poll_s=0.2),
                         lambda: open_service(journal=pg_journal, leader="127.0.0.1:1"))
    replica.start(wait=True)
    acked, failed = {}, []
    restart = threading.Thread(target=postgres.restart)  # while the stream goes on

    def stream():
        for i in range(1000):
            r = records[i % 30]
            try:
                acked[client.apply(r, request_id=f"r{i}").edit_id] = r.prompt
            except grpc.RpcError as e:
                failed.append(e.code())
                time.sleep(0.05)  # a client's backoff
            if len(acked) == 6 and not restart.is_alive() and restart.ident is None:
                restart.start()
            if restart.ident is not None and not restart.is_alive() and len(acked) >= 12:
                break
    try:
        worker = threading.Thread(target=stream)
        worker.start()
        worker.join(120)
        restart.join(60)
        assert not worker.is_alive() and len(acked) >= 12  # edits were acknowledged after the restart too
        assert set(failed) <= {grpc.StatusCode.UNAVAILABLE}, failed  # the calls PostgreSQL missed: retry them
        print(f"{len(acked)} acknowledged, {len(failed)} UNAVAILABLE")
        assert client.apply(records[30]).model_revision == leader.holder.service.revision  # the leader reconnected
        in_journal = {e.edit_id: e for e in client.edits()}
        assert all(edit_id in in_journal and in_journal[edit_id].spec.prompt == p for edit_id, p in acked.items())
        end = time.monotonic() + 60
        while replica.holder.service.revision < leader.holder.service.revision:
            assert time.monotonic() < end, "the replica did not catch up"
            time.sleep(0.05)
        with replica.holder.service.state.lock.read():
            assert_same(weights(replica.holder.service), weights(leader.holder.service))
        assert_same(weights(open_service(journal=pg_journal, leader="127.0.0.1:1")), weights(leader.holder.service))
    finally:
        client.close()
        replica.stop(0)
        leader.stop(0)


# ---------------------------------------------------------------------- check and backup


def mend(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mend_cli.main", *args], capture_output=True, text=True, cwd=cwd)


def test_journal_check_and_backup_from_the_command_line(open_service, records, tmp_path, trained_gpt2_dir):
    service = open_service()
    service.apply(records[:3])
    service.rollback_edit("edit-000002")
    live = weights(service)  # the server stays up: the backup is online
    journal = tmp_path / "journal"
    done = mend("journal", "backup", str(tmp_path / "copy"), f"paths.journal={journal}")
    assert done.returncode == 0 and "journal.sqlite3" in done.stdout, done.stderr
    assert mend("journal", "backup", str(tmp_path / "copy"), f"paths.journal={journal}").returncode == 2  # never over a backup
    checked = mend("journal", "check", f"paths.journal={journal}")
    assert checked.returncode == 0 and "ok" in checked.stdout, checked.stderr
    service.close()
    alter_keys(journal)
    checked = mend("journal", "check", f"paths.journal={journal}")
    assert checked.returncode == 1 and "edit edit-000002" in checked.stdout
    assert mend("journal", "check", f"paths.journal={tmp_path / 'nowhere'}").returncode == 2
    restored = open_service(journal=tmp_path / "copy")
    assert restored.revision == 2 and restored.n_active == 2
    assert_same(weights(restored), live)


def test_a_postgresql_backup_restores_to_the_same_weights(open_service, records, postgres, pg_journal, tmp_path):
    import psycopg

    from mend.journal_backends import pg_tool

    service = open_service(journal=pg_journal)
    service.apply(records[:3])
    service.rollback_edit("edit-000001")
    live = weights(service)
    dump = backup_journal(pg_journal, tmp_path / "journal.dump")
    with psycopg.connect(f"{postgres.url}/postgres", autocommit=True) as admin:
        admin.execute("CREATE DATABASE restored")
    subprocess.run([pg_tool("pg_restore"), f"--dbname={postgres.url}/restored", str(dump)], check=True, capture_output=True)
    assert check_journal(f"{postgres.url}/restored") == []
    service.close()
    restored = open_service(journal=f"{postgres.url}/restored")
    assert restored.revision == 2 and restored.n_active == 2
    assert_same(weights(restored), live)
