"""`mend serve` as a real process: repeated SIGKILLs during a stream of edits and rollbacks lose no
acknowledged operation; SIGTERM drains and exits cleanly."""

import random
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from server.client import EditClient


def launch(tmp_path, trained_gpt2_dir, tiny_editor_dir, world_path):
    cmd = [sys.executable, "-m", "mend_cli.main", "serve", f"paths.base_model={trained_gpt2_dir}", f"paths.editor={tiny_editor_dir}",
           f"paths.journal={tmp_path / 'journal'}", f"paths.world={world_path}", "targets.n_last_blocks=2", "server.port=0", "device=cpu"]
    log = open(tmp_path / "server.log", "a")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, (line, (tmp_path / "server.log").read_text()[-2000:])
    client = EditClient(f"127.0.0.1:{match.group(1)}", timeout=30)
    client.wait_ready(120)
    return proc, client


KILLS = 4


@pytest.mark.slow
def test_kill_storm_loses_no_acknowledged_operation(tmp_path, trained_gpt2_dir, tiny_editor_dir, world_path, world):
    """SIGKILL `mend serve` several times during a stream of edits and rollbacks; after each restart every
    acknowledged edit and rollback is in the journal, and the revision never goes back."""
    records = world.edit_split("test").records + world.edit_split("val").records
    applied, rolled_back, sent, revision = {}, set(), [], 0  # applied: request_id -> edit_id (acknowledged)

    in_flight = []  # the operation the kill interrupted: it may or may not have been committed

    def check(client):
        journal = {e.request_id: e for e in client.edits()}
        assert set(journal) <= set(sent) and len(journal) - len(applied) <= 1  # at most the one in flight, then complete
        for op, key in in_flight:  # reconcile: an interrupted operation counts from now on if it was committed
            if op == "apply" and key in journal:
                applied[key] = journal[key].edit_id
            if op == "rollback" and any(e.edit_id == key and e.rolled_back_at_revision for e in journal.values()):
                rolled_back.add(key)
        in_flight.clear()
        for rid, eid in applied.items():
            assert journal[rid].edit_id == eid
            assert (journal[rid].rolled_back_at_revision > 0) == (eid in rolled_back), rid
        assert client.info().model_revision >= revision
        return journal

    for kill in range(KILLS + 1):
        proc, client = launch(tmp_path, trained_gpt2_dir, tiny_editor_dir, world_path)
        journal = check(client)
        if kill == KILLS:
            break
        start = len(applied) + len(rolled_back)

        def stream():
            nonlocal revision
            rng = random.Random(kill)
            for _ in range(200):
                live = [eid for eid in applied.values() if eid not in rolled_back]
                try:
                    if live and rng.random() < 0.3:
                        eid = rng.choice(live)
                        in_flight[:] = [("rollback", eid)]
                        revision = client.rollback(eid)
                        rolled_back.add(eid)
                    else:
                        rid = f"req-{len(sent)}"
                        sent.append(rid)
                        in_flight[:] = [("apply", rid)]
                        reply = client.apply(records[len(sent) % len(records)], request_id=rid)
                        applied[rid], revision = reply.edit_id, reply.model_revision
                    in_flight.clear()
                except grpc.RpcError:
                    return

        writer = threading.Thread(target=stream)
        writer.start()
        while len(applied) + len(rolled_back) < start + 6 + 3 * kill and writer.is_alive():
            time.sleep(0.001)
        proc.kill()  # SIGKILL, most likely mid-call
        proc.wait()
        writer.join()
        assert proc.returncode == -signal.SIGKILL

    assert len(applied) >= 6 * KILLS and len(rolled_back) >= KILLS  # both kinds of operation were interrupted and checked
    unacked = sent[-1]
    retry = client.apply(records[len(sent) % len(records)], request_id=unacked)
    assert retry.replayed == (unacked in journal)  # a client retry never edits twice
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "shutting down" in out
