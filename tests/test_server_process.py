"""`mend serve` as a real process: SIGKILL during a stream of edits loses no acknowledged edit;
SIGTERM drains and exits cleanly."""

import re
import signal
import subprocess
import sys
import threading

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


@pytest.mark.slow
def test_sigkill_during_edits_loses_no_acknowledged_edit(tmp_path, trained_gpt2_dir, tiny_editor_dir, world_path, world):
    records = world.edit_split("test").records
    proc, client = launch(tmp_path, trained_gpt2_dir, tiny_editor_dir, world_path)
    acked, sent = {}, []

    def stream():
        for i in range(200):
            sent.append(f"req-{i}")
            try:
                acked[f"req-{i}"] = client.apply(records[i % len(records)], request_id=f"req-{i}").edit_id
            except grpc.RpcError:
                return

    writer = threading.Thread(target=stream)
    writer.start()
    while len(acked) < 8:
        pass
    proc.kill()  # SIGKILL, most likely mid-call
    proc.wait()
    writer.join()
    assert proc.returncode == -signal.SIGKILL

    proc, client = launch(tmp_path, trained_gpt2_dir, tiny_editor_dir, world_path)
    journal = {e.request_id: e for e in client.edits()}
    assert all(journal[rid].edit_id == eid and journal[rid].active for rid, eid in acked.items())
    assert set(journal) <= set(sent) and len(journal) - len(acked) <= 1  # at most the one in flight, then complete
    assert client.info().model_revision == len(journal) == client.info().active_edits
    unacked = sent[-1]
    retry = client.apply(records[(len(sent) - 1) % len(records)], request_id=unacked)
    assert retry.replayed == (unacked in journal)  # a client retry never edits twice

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "shutting down" in out
