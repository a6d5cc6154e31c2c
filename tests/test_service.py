"""The editing service without gRPC: journal, exact rollback, replay, idempotency, bad input."""

import dataclasses
import shutil

import pytest
import torch

from mend.aggregation import memory_names, select_rows, solve
from mend.model_state import edited_state
from mend.errors import EditNotFoundError, InvalidEditError, NoEditorError, StateConflictError, UnstableEditError
from mend.models import load_model
from mend.records import EditRecord
from mend.service import EditService
from conftest import assert_same, weights


@pytest.fixture
def records(world):
    return world.edit_split("test").records


def rows_in_one_order(state):
    """`state` with each memory's rows (own share, value, scale; their columns of H and Bᵀ Uᵀ) sorted by
    their values: the same rows that came in another order compare equal."""
    out = dict(state)
    for name in [k[: -len(".mend_values")] for k in state if k.endswith(".mend_values")]:
        values = state[f"{name}.mend_values"]
        order = torch.argsort(values.double() @ torch.linspace(1, 2, values.shape[1], dtype=torch.float64))
        for attr in ("mend_own", "mend_values", "mend_scale"):
            out[f"{name}.{attr}"] = state[f"{name}.{attr}"][order]
        for attr in ("mend_h", "mend_pbu"):
            out[f"{name}.{attr}"] = state[f"{name}.{attr}"][:, order]
    return out



def test_apply_then_rollback_everything_restores_the_base_model_bit_for_bit(open_service, records, trained_gpt2_dir):
    base = edited_state(load_model(trained_gpt2_dir, device="cpu")[0])
    service = open_service()
    result = service.apply([records[0]])
    (edit,) = result.edits
    assert result.revision == 1 and edit.edit_id == "edit-000001" and edit.active
    assert edit.post["reliability_em"] >= edit.pre["reliability_em"]
    assert set(edit.post) == {"reliability_tf", "reliability_em", "generality_tf", "generality_em", "locality_tf", "locality_em"}
    live = weights(service)
    assert all(torch.equal(base[k], live[k]) for k in base)  # the weights themselves are never written:
    assert sorted(set(live) - set(base)) == sorted(n for t in service.state.targets.values() for n in memory_names(t.name))  # the memories hold the edit
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
    service.rollback_edit("edit-000002")
    live, revision = weights(service), service.revision
    service.close()
    shutil.copytree(tmp_path / "journal", tmp_path / "replica")  # a replica replays the same history
    replayed, replica = open_service(), open_service(journal=tmp_path / "replica")
    assert replayed.revision == revision == 5 and replayed.n_active == 5
    assert_same(weights(replayed), live)
    assert_same(weights(replica), live)
    assert [e.edit_id for e in replayed.list(active_only=True)] == ["edit-000001", "edit-000003", "edit-000004", "edit-000005", "edit-000006"]
    assert replayed.get("edit-000002").rolled_back_at == 5


def test_rollback_to_restores_the_exact_state_of_a_revision(open_service, records, assert_same_up_to_rounding):
    service = open_service()
    service.apply([records[0]])
    service.apply([records[1]])
    at_2 = weights(service)
    service.rollback_edit("edit-000001")  # revision 3
    service.apply([records[2]])  # revision 4
    revision, changed = service.rollback_to(2)  # re-activates edit 1, drops edit 3
    assert (revision, changed) == (5, 2)
    # the same set as at revision 2, reached another way (edit 1's rows now come after edit 2's)
    assert_same_up_to_rounding(rows_in_one_order(weights(service)), rows_in_one_order(at_2))
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
def test_bad_input_is_refused_and_changes_nothing(open_service, records, bad, message, assert_same_up_to_rounding):
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
    assert_same_up_to_rounding(weights(service), before)


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


def _as_format_4(journal):
    """Rewrite a journal as format 4 kept it: without the hashes of edits and revisions."""
    import sqlite3

    with sqlite3.connect(journal / "journal.sqlite3") as db:
        for table in ("revisions", "edits"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN digest")
        db.execute("UPDATE meta SET value='4' WHERE key='format'")


def _as_format_3(journal):
    """Rewrite a journal as formats 2 and 3 kept keys and values: one safetensors file per edit under factors/."""
    import sqlite3

    _as_format_4(journal)
    factors = journal / "factors"
    factors.mkdir()
    with sqlite3.connect(journal / "journal.sqlite3") as db:
        db.execute("ALTER TABLE edits ADD COLUMN factors_file TEXT NOT NULL DEFAULT ''")
        for seq, data in db.execute("SELECT seq, data FROM edits").fetchall():
            (factors / f"{seq:08d}.safetensors").write_bytes(data)
            db.execute("UPDATE edits SET factors_file=? WHERE seq=?", (f"{seq:08d}.safetensors", seq))
        db.execute("ALTER TABLE edits DROP COLUMN data")
        db.execute("UPDATE meta SET value='3' WHERE key='format'")
    return factors


def test_a_journal_of_format_3_moves_its_factor_files_into_the_database(open_service, records, tmp_path):
    import sqlite3

    from safetensors.torch import load

    service = open_service()
    service.apply([records[0], records[1]])
    live = weights(service)
    service.close()
    factors = _as_format_3(tmp_path / "journal")
    reopened = open_service()
    assert not factors.exists() and reopened.n_active == 2
    assert_same(weights(reopened), live)
    with sqlite3.connect(tmp_path / "journal" / "journal.sqlite3") as db:
        assert db.execute("SELECT value FROM meta WHERE key='format'").fetchone() == ("5",)
        assert all(load(data) for (data,) in db.execute("SELECT data FROM edits"))


def test_a_journal_of_format_4_gets_its_hashes_and_keeps_its_edits(open_service, records, tmp_path):
    from mend.journal import check_journal

    service = open_service()
    service.apply([records[0], records[1]])
    service.rollback_edit("edit-000001")
    live = weights(service)
    service.close()
    _as_format_4(tmp_path / "journal")
    assert check_journal(tmp_path / "journal") == ["format 4, not 5: `mend serve` on it upgrades it in place (then check again)"]
    reopened = open_service()
    assert reopened.n_active == 1 and reopened.revision == 2
    assert_same(weights(reopened), live)
    reopened.apply([records[2]])
    reopened.close()
    assert check_journal(tmp_path / "journal") == []


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
    with pytest.raises(UnstableEditError, match="not finite"):
        service.apply([records[1]])
    assert service.revision == 1 and len(service.list()) == 1
    assert_same(weights(service), before)


def test_edits_are_computed_on_the_base_model_so_order_does_not_matter(open_service, records, tmp_path, assert_same_up_to_rounding):
    ab = open_service(journal=tmp_path / "ab")
    ab.apply([records[0]])
    ab.apply([records[1]])
    ba = open_service(journal=tmp_path / "ba")
    ba.apply([records[1]])
    ba.apply([records[0]])
    # the memories hold the same rows; their columns follow each journal's numbering (A is 1 in one, 2 in the other)
    assert_same_up_to_rounding(rows_in_one_order(weights(ab)), rows_in_one_order(weights(ba)))
    ab_keys = ab.journal.load_key_values([2])[2]  # edit B's rows do not depend on A being active
    ba_keys = ba.journal.load_key_values([1])[1]
    assert all(torch.equal(ab_keys[n][0], ba_keys[n][0]) and torch.equal(ab_keys[n][1], ba_keys[n][1]) for n in ab_keys)
    only_b = open_service(journal=tmp_path / "b")
    only_b.apply([records[1]])
    ab.rollback_edit("edit-000001")  # rolling back A after A, B: as if A had never been applied
    assert_same_up_to_rounding(weights(ab), weights(only_b))


def test_a_new_edit_of_the_same_fact_supersedes_the_old_one_until_rolled_back(open_service, records, assert_same_up_to_rounding):
    service = open_service()
    r = records[0]
    (old,) = service.apply([r]).edits
    at_old = weights(service)
    respaced = dataclasses.replace(r, prompt="  " + r.prompt.replace(" ", "  ") + " ", target_new="Zzyzx")
    (new,) = service.apply([respaced]).edits
    assert service.n_active == 1 and new.active
    old_now = service.get(old.edit_id)
    assert not old_now.active and old_now.superseded_by == new.edit_id and old_now.rolled_back_at is None
    assert [e.edit_id for e in service.list(active_only=True)] == [new.edit_id]
    service.rollback_edit(new.edit_id)  # the superseded edit comes back
    assert service.get(old.edit_id).active and service.n_active == 1
    assert_same_up_to_rounding(weights(service), at_old)
    same_fact = dataclasses.replace(r, prompt=r.rephrase_prompt[0], target_new="Zzyzx")  # same subject and relation
    (third,) = service.apply([same_fact]).edits
    assert service.get(old.edit_id).superseded_by == third.edit_id and service.n_active == 1
    service.close()
    reopened = open_service()  # states survive a restart
    assert reopened.get(old.edit_id).superseded_by == third.edit_id and reopened.n_active == 1


def test_within_one_apply_the_later_edit_of_a_fact_wins(open_service, records):
    service = open_service()
    r = records[0]
    first, second = service.apply([r, dataclasses.replace(r, target_new="Zzyzx")]).edits
    assert second.active and not first.active and first.superseded_by == second.edit_id
    assert service.n_active == 1


@pytest.mark.slow
def test_a_thousand_edits_in_chunks_of_a_hundred_keep_journal_and_weights_consistent(open_service, tmp_path, trained_gpt2_dir):
    base = edited_state(load_model(trained_gpt2_dir, device="cpu")[0])
    service = open_service(max_edits_per_call=100)
    edits = [EditRecord(prompt=f"Fact number {i} is", target_new=f"answer {i % 37}") for i in range(1000)]
    for i in range(0, 1000, 100):
        service.apply(edits[i : i + 100])
    assert service.n_active == 1000 and service.revision == 10 and len(service.list(active_only=True)) == 1000
    live = weights(service)
    # the live memory is one least-squares solve over every active edit's kept rows: ungated, it writes x S
    stored = service.journal.load_key_values(range(1, 1001))
    for name, t in service.state.targets.items():
        rows = [select_rows(*stored[s][name], service.method.editor.cfg.keep) for s in range(1, 1001)]
        u, d = torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])
        s = solve(service.method.editor.base_eigen(name), u, d)
        memory = service.state.memories[name]  # what the layer holds is this memory in float32
        assert all(torch.equal(live[n], x) for n, x in zip(memory_names(t.name), memory.buffers(service.state.compensate)))
        assert memory.keys.shape[0] == u.shape[0]
        torch.testing.assert_close(memory.P @ memory.keys.T @ memory.store.values[: u.shape[0]].double(), s, rtol=1e-6, atol=1e-9)
    service.close()
    replayed = open_service(max_edits_per_call=100)
    assert_same(weights(replayed), live)
    replayed.rollback_to(0)
    assert_same(weights(replayed), base)


def test_a_journal_of_the_older_summed_format_is_refused_with_what_to_do(open_service, records, tmp_path):
    import sqlite3

    open_service().close()
    with sqlite3.connect(tmp_path / "journal" / "journal.sqlite3") as db:
        db.execute("DELETE FROM meta WHERE key='format'")  # as a journal written before the least-squares format
    with pytest.raises(StateConflictError, match="older version .* new journal directory"):
        open_service()


def test_a_journal_of_format_2_is_upgraded_in_place_and_keeps_its_edits(open_service, records, tmp_path):
    import sqlite3

    service = open_service()
    service.apply([records[0]], author="alice")
    service.close()
    _as_format_3(tmp_path / "journal")
    with sqlite3.connect(tmp_path / "journal" / "journal.sqlite3") as db:  # as written before authors were recorded
        for table, column in (("revisions", "author"), ("edits", "author"), ("edits", "fingerprint")):
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("UPDATE meta SET value='2' WHERE key='format'")
    service = open_service()
    (edit,) = service.list()
    assert edit.active and edit.applied_by == "" and service.revision == 1
    service.rollback_edit(edit.edit_id, "bob")
    assert service.get(edit.edit_id).rolled_back_by == "bob"
