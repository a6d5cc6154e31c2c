"""The real gRPC server, in process on port 0, through real channels."""

import dataclasses
import shutil
from pathlib import Path
import subprocess
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mend.records import EditRecord
from mend.service import EditService, ServiceLimits
from server.api.mend.v1 import editing_pb2 as pb
from server.app import MendServer, ServerConfig
from server.client import EditClient
from mend.model_state import edited_state

@pytest.fixture
def start(trained_gpt2_dir, tiny_editor_dir, world, tmp_path):
    """start(**server_config) -> (server, client); every server is stopped at the end."""
    servers = []

    def make(editor=tiny_editor_dir, journal="journal", gate=None, limits=None, wait=True, token="", **cfg):
        def load():
            if gate is not None:
                gate.wait(30)
            return EditService.open(str(trained_gpt2_dir), str(editor) if editor else None, str(tmp_path / journal),
                                    device="cpu", locality=world.locality_probes(), n_last_blocks=2,
                                    limits=limits or ServiceLimits())

        server = MendServer(ServerConfig(port=0, grace_s=5, **cfg), load)
        server.start(wait=wait)
        servers.append(server)
        tls_ca = cfg.get("tls_cert", "")
        address = f"localhost:{server.port}" if tls_ca else f"127.0.0.1:{server.port}"
        return server, EditClient(address, token=token, tls_ca=tls_ca, timeout=60)

    yield make
    for s in servers:
        if s.holder.phase != "draining":
            s.stop(0)


@pytest.fixture
def records(world):
    return world.edit_split("test").records


def code_of(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def served_weights(server):
    return edited_state(server.holder.service.model)


def test_edit_changes_generation_and_rollback_restores_it(start, records):
    server, client = start()
    changed = 0
    for r in records[:6]:
        before = client.generate(r.prompt, 8)
        reply = client.apply(r)
        after = client.generate(r.prompt, 8)
        if reply.after.reliability_em == 1.0:  # the service's own metric agrees with what Generate shows
            assert after.strip().startswith(r.target_new)
            assert client.score(r.prompt, r.target_new).greedy_match
            changed += 1
        assert client.rollback(reply.edit_id) == reply.model_revision + 1
        assert client.generate(r.prompt, 8) == before
    assert changed >= 3  # the tiny editor flips most edits
    info = client.info()
    assert info.model_revision == 12 and info.active_edits == 0 and info.editor_loaded
    assert list(info.target_layers) == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                                        "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
    assert info.device == "cpu" and info.dtype == "float32" and len(info.base_model_hash) == 64


def test_apply_edits_is_one_revision_and_the_journal_reconciles(start, records):
    server, client = start()
    reply = client.apply_batch(records[:3], request_id="batch-1", edit_request_ids=["a", "b", "c"])
    assert reply.model_revision == 1 and [e.edit_id for e in reply.edits] == ["edit-000001", "edit-000002", "edit-000003"]
    retry = client.apply_batch(records[:3], request_id="batch-1", edit_request_ids=["a", "b", "c"])
    assert retry.replayed and list(retry.edits) == list(reply.edits)
    listed = client.edits()
    assert [e.edit_id for e in listed] == ["edit-000001", "edit-000002", "edit-000003"]
    assert listed[1].spec.prompt == records[1].prompt and listed[1].request_id == "b"
    got, details = code_of(lambda: client.apply_batch(records[3:5], edit_request_ids=["d", "b"]))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "'b': 'edit-000002'" in details
    assert client.get("edit-000002").after.HasField("reliability_em")
    assert client.rollback_to(0).edits_changed == 3 and client.edits(active_only=True) == []


def test_bad_requests_get_the_right_status_and_change_nothing(start, records, assert_same_up_to_rounding):
    server, client = start(limits=ServiceLimits(max_prompt_chars=100, max_edits_per_call=2))
    client.apply(records[0])
    before = served_weights(server)
    stub = client.stub
    cases = [
        (lambda: stub.ApplyEdit(pb.ApplyEditRequest(edit=pb.EditSpec(prompt="", target_new="x"))), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (lambda: stub.ApplyEdit(pb.ApplyEditRequest(edit=pb.EditSpec(prompt="p", target_new=" "))), grpc.StatusCode.INVALID_ARGUMENT, "target_new is empty"),
        (lambda: stub.ApplyEdit(pb.ApplyEditRequest(edit=pb.EditSpec(prompt="p" * 101, target_new="x"))), grpc.StatusCode.INVALID_ARGUMENT, "101 characters"),
        (lambda: client.apply_batch(records[:3]), grpc.StatusCode.INVALID_ARGUMENT, "3 edits in one call"),
        (lambda: stub.ApplyEdit(pb.ApplyEditRequest(edit=pb.EditSpec(prompt="p", target_new="x", locality_prompts=["a", "b"], locality_answers=["c"]))),
         grpc.StatusCode.INVALID_ARGUMENT, "2 locality prompts but 1"),
        (lambda: client.rollback("edit-999999"), grpc.StatusCode.NOT_FOUND, "no edit 'edit-999999'"),
        (lambda: client.get("nope"), grpc.StatusCode.NOT_FOUND, "no edit"),
        (lambda: client.rollback_to(7), grpc.StatusCode.NOT_FOUND, "current revision is 1"),
        (lambda: client.apply(records[1], request_id="x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (lambda: stub.Generate(pb.GenerateRequest(prompt="a", max_new_tokens=1000)), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (lambda: (client.apply(records[1], request_id="r"), client.apply(records[2], request_id="r")), grpc.StatusCode.FAILED_PRECONDITION, "different request"),
    ]
    for i, (call, code, message) in enumerate(cases):
        try:
            call()
            raise AssertionError(f"case {i} ({message}) did not fail")
        except grpc.RpcError as e:
            got, details = e.code(), e.details()
        assert got == code and message in details, (got, details)
    client.rollback_to(1)  # drop the one good edit the request_id case made
    assert [e.edit_id for e in client.edits(active_only=True)] == ["edit-000001"]
    assert_same_up_to_rounding(served_weights(server), before)  # the same active set as before


def test_a_newer_edit_of_the_same_fact_supersedes_and_rollback_restores_it(start, records):
    server, client = start()
    r = dataclasses.replace(records[0], subject="Quo Vadis", relation="P19")
    old = client.apply(r)
    new = client.apply(dataclasses.replace(r, prompt="Where was Quo Vadis born? In", target_new="Zed"))  # same subject, relation
    got = client.get(old.edit_id)
    assert not got.active and got.superseded_by == new.edit_id and got.rolled_back_at_revision == 0
    assert client.get(new.edit_id).spec.relation == "P19"
    assert [e.edit_id for e in client.edits(active_only=True)] == [new.edit_id]
    client.rollback(new.edit_id)
    assert client.get(old.edit_id).active and client.info().active_edits == 1


def test_deadline_that_passes_while_waiting_applies_nothing(start, records):
    server, client = start()
    with server.holder.service.state.lock.write():  # another writer holds the model
        got, _ = code_of(lambda: client.stub.ApplyEdit(pb.ApplyEditRequest(edit=pb.EditSpec(prompt=records[0].prompt, target_new="Zed")), timeout=0.5))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.edits() == [] and client.info().model_revision == 0


def test_internal_errors_do_not_leak_stack_traces(start, records, monkeypatch):
    server, client = start()
    monkeypatch.setattr(server.holder.service, "generate", lambda *a: 1 / 0)  # fault injection
    got, details = code_of(lambda: client.generate("hello"))
    assert got == grpc.StatusCode.INTERNAL and "request id" in details and "ZeroDivision" not in details


def test_no_editor_is_failed_precondition(start, records):
    _, client = start(editor=None)
    assert client.generate(records[0].prompt, 2)
    got, details = code_of(lambda: client.apply(records[0]))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "no editor" in details


def test_health_goes_serving_after_load_and_not_serving_on_drain(start, records):
    gate = threading.Event()
    server, client = start(gate=gate, wait=False)  # loading waits for the gate: up, but not ready
    health = health_pb2_grpc.HealthStub(client.channel)
    check = lambda: health.Check(health_pb2.HealthCheckRequest(service="mend.v1.EditService")).status
    assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
    got, details = code_of(lambda: client.generate("hi"))
    assert got == grpc.StatusCode.UNAVAILABLE and "starting" in details
    gate.set()
    client.wait_ready(30)
    assert check() == health_pb2.HealthCheckResponse.SERVING and client.generate(records[0].prompt, 2)
    server.holder.phase = "draining"  # what stop() does first
    got, details = code_of(lambda: client.generate("hi"))
    assert got == grpc.StatusCode.UNAVAILABLE and "draining" in details
    server.stop(1)
    got, _ = code_of(check)
    assert got == grpc.StatusCode.UNAVAILABLE  # stopped: nothing answers any more


def test_concurrent_clients_end_with_weights_equal_to_a_replay_of_the_journal(start, records, trained_gpt2_dir, tiny_editor_dir, tmp_path):
    server, client = start(max_concurrent=16)
    address = f"127.0.0.1:{server.port}"

    def worker(w):
        out = []
        with EditClient(address) as c:
            for i in range(25):
                r = records[(w * 25 + i) % len(records)]
                reply = c.apply(EditRecord(prompt=r.prompt, target_new=r.target_new, rephrase_prompt=r.rephrase_prompt),
                                request_id=f"{w}-{i}")
                out.append((reply.edit_id, reply.model_revision))
                if i % 10 == 9:
                    c.generate(r.prompt, 2)  # readers interleaved with writers
        return out

    with ThreadPoolExecutor(8) as pool:
        replies = [x for part in pool.map(worker, range(8)) for x in part]
    live = served_weights(server)
    journal = {e.edit_id: e for e in client.edits()}
    assert len(journal) == 200 and client.info().model_revision < 200  # waiting edits were coalesced into shared revisions
    assert all(journal[edit_id].revision == revision for edit_id, revision in replies)  # each reply names its edit's revision
    assert all(journal[edit_id].after.HasField("reliability_em") for edit_id, _ in replies)
    latest = {}
    for e in sorted(journal.values(), key=lambda e: e.seq):  # the later arrival of an edit of the same prompt supersedes
        latest[e.spec.prompt] = e.edit_id
    assert {e.edit_id for e in journal.values() if e.active} == set(latest.values())
    server.stop(1)
    replay = EditService.open(str(trained_gpt2_dir), str(tiny_editor_dir), str(tmp_path / "journal"), device="cpu", n_last_blocks=2)
    fresh = edited_state(replay.model)
    assert live.keys() == fresh.keys() and all(torch.equal(live[k], fresh[k]) for k in live)
    replay.close()


def test_dry_run_and_skip_metrics(start, records):
    server, client = start()
    before = served_weights(server)
    preview = client.apply(records[0], request_id="look", dry_run=True)
    batch = client.apply_batch(records[1:3], dry_run=True)
    assert preview.edit_id == "" and preview.model_revision == 0 and not client.edits()
    assert all(torch.equal(v, before[k]) for k, v in served_weights(server).items())
    real = client.apply(records[0], request_id="look")  # the dry run used no request id: this applies
    assert not real.replayed and real.model_revision == 1
    assert (real.before, real.after) == (preview.before, preview.after)
    assert [e.edit_id for e in batch.edits] == ["", ""] and batch.edits[0].after.HasField("reliability_em")
    measured = served_weights(server)
    client.rollback(real.edit_id)
    bulk = client.apply(records[0], skip_metrics=True)  # the same edit, unmeasured: the same weights, no metrics
    assert not bulk.after.ListFields() and not client.get(bulk.edit_id).before.ListFields()
    assert all(torch.equal(v, measured[k]) for k, v in served_weights(server).items())


def test_edits_waiting_for_the_writer_share_one_revision_and_a_bad_one_fails_alone(start, records):
    server, client = start(metrics_port=0)
    client.apply(records[0], request_id="taken")
    with server.holder.service.state.lock.write():  # hold the writer so that three calls queue behind it
        futures = [client.stub.ApplyEdit.future(pb.ApplyEditRequest(edit=pb.EditSpec(prompt=r.prompt, target_new=t), request_id=k))
                   for r, t, k in ((records[1], "Zed", "a"), (records[2], "Yor", "taken"), (records[3], "Xan", "c"))]
        while len(server.holder.service._queue) < 3:
            pass
    first, third = futures[0].result(), futures[2].result()
    with pytest.raises(grpc.RpcError) as err:
        futures[1].result()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already used" in err.value.details()
    assert first.model_revision == third.model_revision == 2 and first.edit_id != third.edit_id
    assert first.after.HasField("reliability_em") and client.info().active_edits == 3
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'mend_coalesced_calls_bucket{le="2.0"} 2.0' in text and "mend_coalesced_calls_count 2.0" in text


def test_a_retry_queued_behind_its_first_attempt_is_replayed(start, records):
    server, client = start()
    request = pb.ApplyEditRequest(edit=pb.EditSpec(prompt=records[0].prompt, target_new="Zed"), request_id="once")
    with server.holder.service.state.lock.write():
        futures = [client.stub.ApplyEdit.future(request) for _ in range(2)]
        while len(server.holder.service._queue) < 2:
            pass
    first, retry = (f.result() for f in futures)
    assert first.edit_id == retry.edit_id and {first.replayed, retry.replayed} == {False, True}
    assert client.info().model_revision == 1 and len(client.edits()) == 1


def test_overload_is_resource_exhausted(start, records):
    server, client = start(max_concurrent=1)
    with server.holder.service.state.lock.write():  # hold the model so the first call stays in flight
        first = client.stub.ApplyEdit.future(pb.ApplyEditRequest(edit=pb.EditSpec(prompt=records[0].prompt, target_new="Zed")))
        while server.interceptor.in_flight == 0:
            pass
        got, details = code_of(lambda: client.generate("hi"))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in details
    assert first.result().model_revision == 1


def test_reflection_and_prometheus_metrics(start, records):
    server, client = start(metrics_port=0)
    client.apply(records[0])
    client.rollback("edit-000001")
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in reply.list_services_response.service}
    assert {"mend.v1.EditService", "grpc.health.v1.Health"} <= names
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "mend_edits_applied_total 1.0" in text and "mend_rollbacks_total 1.0" in text
    assert "mend_active_edits 0.0" in text and "mend_model_revision 2.0" in text
    assert 'mend_rpc_latency_seconds_count{code="OK",method="ApplyEdit"} 1.0' in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls(start, records, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server, client = start(tls_cert=str(cert), tls_key=str(key))
    assert client.info().model_revision == 0
    plain = EditClient(f"localhost:{server.port}", timeout=5)
    assert code_of(lambda: plain.info())[0] == grpc.StatusCode.UNAVAILABLE


def test_generated_api_matches_the_proto(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", str(root / "server" / "generate_api.sh"), str(tmp_path)], check=True)
    for name in ("editing_pb2.py", "editing_pb2_grpc.py", "editing_pb2.pyi"):
        generated = (tmp_path / "server/api/mend/v1" / name).read_text()
        assert generated == (root / "server/api/mend/v1" / name).read_text(), f"run server/generate_api.sh: {name} is stale"


def test_load_test_and_memory_profile_report_what_they_measured(start, records, tmp_path):
    from server.load_test import memory_profile, run_load

    server, client = start()
    memory = memory_profile(f"127.0.0.1:{server.port}", records, tmp_path / "journal", counts=(2, 5), chunk=2)
    assert [m["active"] for m in memory] == [0, 2, 5] and client.info().active_edits == 5
    assert all(m["rss_mb"] > 50 for m in memory) and all(m["journal_kb_per_edit"] > 1 for m in memory[1:])
    row = run_load(f"127.0.0.1:{server.port}", records, clients=2, requests=3, max_seconds=60)
    assert (row["edits"], row["refused"]) == (6, 0) and row["p99_ms"] >= row["p50_ms"] > 0
