"""The editing service without gRPC: journal, exact rollback, replay, idempotency, bad input."""

import pytest
import torch

from mend.errors import EditNotFoundError, InvalidEditError, NoEditorError, StateConflictError, UnstableEditError
from mend.models import load_model
from mend.records import EditRecord
from mend.service import EditService, ServiceLimits


@pytest.fixture
def open_service(trained_gpt2_dir, tiny_editor_dir, world, tmp_path):
    opened = []

    def make(editor=tiny_editor_dir, journal=tmp_path / "journal", **limits):
        s = EditService.open(str(trained_gpt2_dir), str(editor) if editor else None, str(journal), device="cpu",
                             locality=world.locality_probes(), limits=ServiceLimits(**limits), n_last_blocks=2)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def records(world):
    return world.edit_split("test").records


def weights(service):
    return {k: v.detach().clone() for k, v in service.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_apply_then_rollback_everything_restores_the_base_model_bit_for_bit(open_service, records, trained_gpt2_dir):
    base = {k: v.clone() for k, v in load_model(trained_gpt2_dir, device="cpu")[0].state_dict().items()}
    service = open_service()
    result = service.apply([records[0]])
    (edit,) = result.edits
    assert result.revision == 1 and edit.edit_id == "edit-000001" and edit.active
    assert edit.post["reliability_em"] >= edit.pre["reliability_em"]
    assert set(edit.post) == {"reliability_tf", "reliability_em", "generality_tf", "generality_em", "locality_tf", "locality_em"}
    changed = [k for k in base if not torch.equal(base[k], service.model.state_dict()[k])]
    assert changed == list(service.state.targets)  # only the editor's target weights move
    service.apply(records[1:4])
    assert service.rollback_edit("edit-000003") == 3
    assert service.rollback_to(0) == (4, 3)
    assert_same(weights(service), base)
    assert service.n_active == 0 and service.rollback_to(0) == (4, 0)  # nothing to change: no new revision


def test_restart_replays_the_journal_to_identical_weights_and_revision(open_service, records, tmp_path):
    service = open_service()
    for r in records[:3]:
        service.apply([r])
    service.apply(records[3:6])  # one revision, three edits
    service.rollback_edit("edit-000002")  # an edit that later edits were computed on top of
    live, revision = weights(service), service.revision
    service.close()
    replayed = open_service()
    assert replayed.revision == revision == 5 and replayed.n_active == 5
    assert_same(weights(replayed), live)
    assert [e.edit_id for e in replayed.list(active_only=True)] == ["edit-000001", "edit-000003", "edit-000004", "edit-000005", "edit-000006"]
    assert replayed.get("edit-000002").rolled_back_at == 5


def test_rollback_to_restores_the_exact_state_of_a_revision(open_service, records):
    service = open_service()
    service.apply([records[0]])
    service.apply([records[1]])
    at_2 = weights(service)
    service.rollback_edit("edit-000001")  # revision 3
    service.apply([records[2]])  # revision 4
    revision, changed = service.rollback_to(2)  # re-activates edit 1, drops edit 3
    assert (revision, changed) == (5, 2)
    assert_same(weights(service), at_2)
    assert [e.edit_id for e in service.list(active_only=True)] == ["edit-000001", "edit-000002"]
    with pytest.raises(EditNotFoundError, match="current revision is 5"):
        service.rollback_to(9)


def test_repeated_request_id_returns_the_original_result_and_edits_once(open_service, records):
    service = open_service()
    first = service.apply([records[0]], request_id="req-1")
    again = service.apply([records[0]], request_id="req-1")
    assert again.replayed and not first.replayed
    assert again.revision == first.revision == 1 and again.edits == first.edits
    assert service.n_active == 1 and service.revision == 1
    with pytest.raises(StateConflictError, match="different request"):
        service.apply([records[1]], request_id="req-1")


@pytest.mark.parametrize("bad, message", [
    ([], "no edits"),
    ([EditRecord(prompt="x" * 150, target_new="y")], "prompt is 150 characters"),
    ([EditRecord(prompt="A", target_new="B")] * 3, "3 edits in one call"),
    ([EditRecord(prompt="A", target_new="B", rephrase_prompt=("p",) * 5)], "5 rephrase prompts"),
])
def test_bad_input_is_refused_and_changes_nothing(open_service, records, bad, message):
    service = open_service(max_prompt_chars=100, max_edits_per_call=2, max_extra_prompts=4)
    service.apply([records[0]])
    before = weights(service)
    with pytest.raises(InvalidEditError, match=message):
        service.apply(bad)
    with pytest.raises(EditNotFoundError):
        service.rollback_edit("edit-000099")
    service.rollback_edit("edit-000001")
    with pytest.raises(StateConflictError, match="already rolled back"):
        service.rollback_edit("edit-000001")
    assert service.revision == 2 and len(service.list()) == 1
    service.rollback_to(1)
    assert_same(weights(service), before)


def test_locality_uses_server_probes_or_the_models_own_answers(open_service, records, world):
    service = open_service()
    bare = EditRecord(prompt=records[0].prompt, target_new=records[0].target_new)
    (edit,) = service.apply([bare]).edits
    assert edit.pre["locality_tf"] is not None  # measured on the server-held probes
    assert edit.post["generality_tf"] is None  # no paraphrases: not measured
    probe = world.locality_probes()[0].prompt
    (edit,) = service.apply([EditRecord(prompt=records[1].prompt, target_new="Zed", locality_prompt=(probe,))]).edits
    assert edit.pre["locality_tf"] == 1.0  # against the model's own continuation


def test_a_server_without_editor_answers_queries_and_refuses_edits(open_service, records):
    service = open_service(editor=None)
    text, ids, revision = service.generate(records[0].prompt, 3)
    assert len(ids) <= 3 and revision == 0
    with pytest.raises(NoEditorError, match="no editor"):
        service.apply([records[0]])


def test_journal_of_another_base_model_is_refused(open_service, tmp_path, gpt2_dir, tiny_editor_dir):
    open_service().close()
    with pytest.raises(StateConflictError, match="belongs to base model"):
        EditService.open(str(gpt2_dir), None, str(tmp_path / "journal"), device="cpu", n_last_blocks=2)


def test_uncommitted_factor_files_are_removed_on_open(open_service, records, tmp_path):
    service = open_service()
    service.apply([records[0]])
    service.close()
    (tmp_path / "journal" / "factors" / "00000002.safetensors.tmp").write_bytes(b"partial")
    reopened = open_service()
    assert sorted(p.name for p in (tmp_path / "journal" / "factors").iterdir()) == ["00000001.safetensors"]
    assert reopened.n_active == 1


def test_score_and_generate_agree(open_service, records):
    service = open_service()
    r = records[0]
    text, _, _ = service.generate(r.prompt, 4)
    logps, greedy, _ = service.score(r.prompt, text.split()[0]) if text.strip() else ([0.0], True, 0)
    assert greedy and all(lp <= 0 for lp in logps)


def test_a_non_finite_update_is_refused_and_changes_nothing(open_service, records):
    service = open_service()
    service.apply([records[0]])
    before = weights(service)
    with torch.no_grad():
        service.method.editor.steps.fill_(3e38)  # an editor far outside its range: a = -α ũ overflows
    with pytest.raises(UnstableEditError, match="roll back some edits"):
        service.apply([records[1]])
    assert service.revision == 1 and len(service.list()) == 1
    assert_same(weights(service), before)
