"""Hostile input against the real server on loopback: thousands of random well-formed requests (odd
strings, edge integers, wrong counts, over-long fields) and undecodable bytes. No well-formed request
may get INTERNAL or UNKNOWN, the server stays SERVING, and the journal replays to the served weights."""

import random
import string

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mend.service import EditService
from server.api.mend.v1 import editing_pb2 as pb
from server.app import MendServer, ServerConfig
from mend.model_state import edited_state

N_REQUESTS = 3000
U64, U32 = 2**64 - 1, 2**32 - 1
INTS = [0, 1, 2, 3, 7, 63, 64, 65, 127, 128, 129, 1000, 1001, 2**31 - 1, 2**31, U32, 2**53, 2**63 - 1, 2**63, U64]
ODD_TEXT = ["", " ", "\n\t ", "\x00", "\x00abc", "\u200b", "é" * 3, "🙂" * 5, "名字是", "مرحبا", "a\u0301" * 4,
            "\ufeff", "\\", "'\"", "<|endoftext|>", "<|endoftext|>" * 40, "\r\n" * 10]


def text(rng: random.Random, words: list[str]) -> str:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(ODD_TEXT)
    if kind < 0.45:  # long: over the character limits, or over the model's context in tokens
        return "".join(rng.choice(string.printable) for _ in range(rng.choice([70, 300, 1999, 2000, 2001, 2600])))
    if kind < 0.55:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
    return " ".join(rng.choice(words) for _ in range(rng.randrange(1, 8)))


def texts(rng, words) -> list[str]:
    return [text(rng, words) for _ in range(rng.choice([0, 0, 1, 2, 3, 16, 17]))]


def spec(rng, words) -> pb.EditSpec:
    if rng.random() < 0.4:  # a plausible edit, so that the accepted path is fuzzed too
        return pb.EditSpec(prompt=" ".join(rng.choices(words, k=4)), target_new=rng.choice(words))
    s = pb.EditSpec(prompt=text(rng, words), target_new=text(rng, words), rephrase_prompts=texts(rng, words),
                    locality_prompts=texts(rng, words), locality_answers=texts(rng, words), subject=text(rng, words),
                    relation=text(rng, words), ground_truth=text(rng, words), case_id=text(rng, words))
    if rng.random() < 0.3:
        s.request_id = text(rng, words)
    return s


def request(rng, words, edit_ids: list[str]):
    """(method, a random well-formed request of it)."""
    some_id = lambda: rng.choice(edit_ids) if edit_ids and rng.random() < 0.5 else text(rng, words)  # noqa: E731
    method = rng.choice(["ApplyEdit", "ApplyEdits", "RollbackEdit", "RollbackTo", "ListEdits", "GetEdit", "Generate", "Score",
                         "GetModelInfo"])
    req = {
        "ApplyEdit": lambda: pb.ApplyEditRequest(edit=spec(rng, words), request_id=text(rng, words) if rng.random() < 0.5 else ""),
        "ApplyEdits": lambda: pb.ApplyEditsRequest(edits=[spec(rng, words) for _ in range(rng.choice([0, 1, 2, 3, 129]))],
                                                   request_id=text(rng, words) if rng.random() < 0.5 else ""),
        "RollbackEdit": lambda: pb.RollbackEditRequest(edit_id=some_id()),
        "RollbackTo": lambda: pb.RollbackToRequest(revision=rng.choice(INTS)),
        "ListEdits": lambda: pb.ListEditsRequest(active_only=rng.random() < 0.5, after_seq=rng.choice(INTS), page_size=rng.choice(INTS[:16])),
        "GetEdit": lambda: pb.GetEditRequest(edit_id=some_id()),
        "Generate": lambda: pb.GenerateRequest(prompt=text(rng, words), max_new_tokens=rng.choice(INTS[:16])),
        "Score": lambda: pb.ScoreRequest(prompt=text(rng, words), target=text(rng, words)),
        "GetModelInfo": lambda: pb.GetModelInfoRequest(),
    }[method]()
    return method, req


RESPONSES = {"ApplyEdit": pb.ApplyEditResponse, "ApplyEdits": pb.ApplyEditsResponse, "RollbackEdit": pb.RollbackEditResponse,
             "RollbackTo": pb.RollbackToResponse, "ListEdits": pb.ListEditsResponse, "GetEdit": pb.GetEditResponse,
             "Generate": pb.GenerateResponse, "Score": pb.ScoreResponse, "GetModelInfo": pb.GetModelInfoResponse}


@pytest.mark.slow
def test_fuzzed_requests_get_no_internal_error_and_lose_nothing(trained_gpt2_dir, tiny_editor_dir, world, tmp_path):
    def load():
        return EditService.open(str(trained_gpt2_dir), str(tiny_editor_dir), str(tmp_path / "journal"), device="cpu",
                                locality=world.locality_probes(), n_last_blocks=2)

    server = MendServer(ServerConfig(port=0, grace_s=5), load)
    server.start(wait=True)
    rng = random.Random(0)
    words = sorted({w for f in world.training_facts() for w in f"{f.prompt} {f.answer}".split()})
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    calls = {m: channel.unary_unary(f"/mend.v1.EditService/{m}", request_serializer=lambda r: r.SerializeToString(),
                                    response_deserializer=RESPONSES[m].FromString) for m in RESPONSES}
    raw = {m: channel.unary_unary(f"/mend.v1.EditService/{m}") for m in RESPONSES}  # bytes in, bytes out
    codes: dict[tuple[str, str], int] = {}
    failures, edit_ids = [], []
    try:
        for i in range(N_REQUESTS):
            method, req = request(rng, words, edit_ids)
            try:
                reply = calls[method](req, timeout=60)
                code = "OK"
                if method == "ApplyEdit":
                    edit_ids.append(reply.edit_id)
                elif method == "ApplyEdits":
                    edit_ids += [e.edit_id for e in reply.edits]
            except grpc.RpcError as e:
                code = e.code().name
                if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    failures.append((method, str(req)[:300], e.details()))
            codes[method, code] = codes.get((method, code), 0) + 1
            if i % 10 == 0:  # undecodable bytes: gRPC itself refuses them; the server must stay up
                garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
                try:
                    raw[rng.choice(list(raw))](garbage, timeout=60)
                except grpc.RpcError:
                    pass
        print(sorted(codes.items()))
        assert not failures, failures[:10]
        assert codes.get(("ApplyEdit", "OK"), 0) > 50 and codes.get(("ApplyEdit", "INVALID_ARGUMENT"), 0) > 50  # both paths exercised
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="mend.v1.EditService"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        service = server.holder.service
        served = edited_state(service.model)
        revision, active = service.revision, sorted(service.state.active)
    finally:
        channel.close()
        server.stop(0)
    again = load()  # the journal replays to exactly what was served
    try:
        assert again.revision == revision and sorted(again.state.active) == active
        replayed = edited_state(again.model)
        assert replayed.keys() == served.keys() and all(torch.equal(v, served[k]) for k, v in replayed.items())
    finally:
        again.close()
