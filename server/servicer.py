"""The thin servicer: converts messages and delegates to `mend.service.EditService`.

Errors are not handled here: domain errors propagate to the interceptor, which maps them to
status codes in one place.
"""

from __future__ import annotations

import math
import time

from mend.journal import JournalEdit
from mend.records import EditRecord
from server.interceptor import CALLER
from server.api.mend.v1 import editing_pb2 as pb
from server.api.mend.v1 import editing_pb2_grpc as pb_grpc


def record_from_spec(spec: pb.EditSpec) -> EditRecord:
    return EditRecord(
        prompt=spec.prompt, target_new=spec.target_new, ground_truth=spec.ground_truth, subject=spec.subject,
        relation=spec.relation, rephrase_prompt=tuple(spec.rephrase_prompts), locality_prompt=tuple(spec.locality_prompts),
        locality_ground_truth=tuple(spec.locality_answers), case_id=spec.case_id,
    )


def spec_from_record(r: EditRecord) -> pb.EditSpec:
    return pb.EditSpec(
        prompt=r.prompt, target_new=r.target_new, rephrase_prompts=r.rephrase_prompt, locality_prompts=r.locality_prompt,
        locality_answers=r.locality_ground_truth, subject=r.subject, relation=r.relation, ground_truth=r.ground_truth,
        case_id=r.case_id,
    )


def metrics_message(values: dict[str, float | None]) -> pb.EditMetrics:
    return pb.EditMetrics(**{k: v for k, v in values.items() if v is not None and not math.isnan(v)})


def edit_message(e: JournalEdit) -> pb.Edit:
    return pb.Edit(
        edit_id=e.edit_id, seq=e.seq, revision=e.revision, spec=spec_from_record(e.record),
        before=metrics_message(e.pre), after=metrics_message(e.post), active=e.active,
        rolled_back_at_revision=e.rolled_back_at or 0, request_id=e.request_id, created_unix=e.created,
        editor_hash=e.editor_hash, superseded_by=e.superseded_by, applied_by=e.applied_by, rolled_back_by=e.rolled_back_by,
    )


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class EditServicer(pb_grpc.EditServiceServicer):
    def __init__(self, holder):
        self.holder = holder  # server.app.ServiceHolder: the service once loaded

    @property
    def service(self):
        return self.holder.service

    def ApplyEdit(self, request, context):
        result = self.service.apply([record_from_spec(request.edit)], request.request_id, _deadline(context),
                                    author=CALLER.get(), dry_run=request.dry_run, metrics=not request.skip_metrics)
        (edit,) = result.edits
        self.holder.metrics.count_edits(0 if result.replayed or request.dry_run else 1)
        return pb.ApplyEditResponse(edit_id=edit.edit_id, model_revision=result.revision, before=metrics_message(edit.pre),
                                    after=metrics_message(edit.post), replayed=result.replayed)

    def ApplyEdits(self, request, context):
        result = self.service.apply([record_from_spec(s) for s in request.edits], request.request_id, _deadline(context),
                                    edit_request_ids=[s.request_id for s in request.edits], author=CALLER.get(),
                                    dry_run=request.dry_run, metrics=not request.skip_metrics)
        self.holder.metrics.count_edits(0 if result.replayed or request.dry_run else len(result.edits))
        return pb.ApplyEditsResponse(edits=[edit_message(e) for e in result.edits], model_revision=result.revision,
                                     replayed=result.replayed)

    def RollbackEdit(self, request, context):
        revision = self.service.rollback_edit(request.edit_id, CALLER.get())
        self.holder.metrics.rollbacks.inc()
        return pb.RollbackEditResponse(model_revision=revision)

    def RollbackTo(self, request, context):
        revision, changed = self.service.rollback_to(request.revision, CALLER.get())
        if changed:
            self.holder.metrics.rollbacks.inc()
        return pb.RollbackToResponse(model_revision=revision, edits_changed=changed)

    def ListEdits(self, request, context):
        size = min(request.page_size or 100, 1000)
        edits = self.service.list(active_only=request.active_only, after_seq=request.after_seq, limit=size)
        return pb.ListEditsResponse(edits=[edit_message(e) for e in edits], model_revision=self.service.revision)

    def GetEdit(self, request, context):
        return pb.GetEditResponse(edit=edit_message(self.service.get(request.edit_id)))

    def Generate(self, request, context):
        text, ids, revision = self.service.generate(request.prompt, request.max_new_tokens or 16)
        return pb.GenerateResponse(text=text, token_ids=ids, model_revision=revision)

    def Score(self, request, context):
        token_logprobs, greedy, revision = self.service.score(request.prompt, request.target)
        total = sum(token_logprobs)
        return pb.ScoreResponse(logprob=total, probability=math.exp(total), token_logprobs=token_logprobs,
                                greedy_match=greedy, model_revision=revision)

    def GetModelInfo(self, request, context):
        info = self.service.model_info(weights_hash=request.weights_hash)
        return pb.GetModelInfoResponse(
            base_model_path=info["base_model_path"], base_model_hash=info["base_model_hash"],
            editor_path=info["editor_path"], editor_hash=info["editor_hash"], target_layers=info["targets"],
            dtype=info["dtype"], device=info["device"], model_revision=info["revision"],
            active_edits=info["active_edits"], model_type=info["model_type"], editor_loaded=info["editor_loaded"],
            role=info["role"], leader=info["leader"], journal_revision=info["journal_revision"], weights_hash=info["weights_hash"],
        )
