"""A small Python client for mend.v1.EditService (used by the CLI, the load script and the README)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mend.records import EditRecord
from server.api.mend.v1 import editing_pb2 as pb
from server.api.mend.v1 import editing_pb2_grpc as pb_grpc
from server.servicer import spec_from_record


class EditClient:
    def __init__(self, address: str, token: str = "", tls_ca: str = "", timeout: float = 120.0):
        if tls_ca:
            with open(tls_ca, "rb") as f:
                self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=f.read()))
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.EditServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EditClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until health reports SERVING (the model and editor are loaded)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        end = time.monotonic() + timeout
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="mend.v1.EditService"), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"server not SERVING after {timeout:.0f} s")
            time.sleep(0.2)

    def apply(self, record: EditRecord, request_id: str = "", dry_run: bool = False, skip_metrics: bool = False) -> pb.ApplyEditResponse:
        return self._call("ApplyEdit", pb.ApplyEditRequest(edit=spec_from_record(record), request_id=request_id, dry_run=dry_run,
                                                           skip_metrics=skip_metrics))

    def apply_batch(self, records: list[EditRecord], request_id: str = "", edit_request_ids: list[str] = (),
                    dry_run: bool = False, skip_metrics: bool = False) -> pb.ApplyEditsResponse:
        specs = [spec_from_record(r) for r in records]
        for spec, key in zip(specs, edit_request_ids):
            spec.request_id = key
        return self._call("ApplyEdits", pb.ApplyEditsRequest(edits=specs, request_id=request_id, dry_run=dry_run,
                                                             skip_metrics=skip_metrics))

    def rollback(self, edit_id: str) -> int:
        return self._call("RollbackEdit", pb.RollbackEditRequest(edit_id=edit_id)).model_revision

    def rollback_to(self, revision: int) -> pb.RollbackToResponse:
        return self._call("RollbackTo", pb.RollbackToRequest(revision=revision))

    def edits(self, active_only: bool = False) -> list[pb.Edit]:
        """The whole journal, page by page."""
        out, after = [], 0
        while True:
            page = self._call("ListEdits", pb.ListEditsRequest(active_only=active_only, after_seq=after, page_size=1000)).edits
            out += page
            if len(page) < 1000:
                return out
            after = page[-1].seq

    def get(self, edit_id: str) -> pb.Edit:
        return self._call("GetEdit", pb.GetEditRequest(edit_id=edit_id)).edit

    def generate(self, prompt: str, max_new_tokens: int = 16) -> str:
        return self._call("Generate", pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens)).text

    def score(self, prompt: str, target: str) -> pb.ScoreResponse:
        return self._call("Score", pb.ScoreRequest(prompt=prompt, target=target))

    def info(self, weights_hash: bool = False) -> pb.GetModelInfoResponse:
        return self._call("GetModelInfo", pb.GetModelInfoRequest(weights_hash=weights_hash))
