"""`mend edit FILE` / `mend rollback` / `mend edits`, locally and against a real in-process server."""

import json

import pytest
import torch

from mend.models import load_model
from mend.service import EditService
from mend_cli.main import main
from server.app import MendServer, ServerConfig
from mend.model_state import edited_state


@pytest.fixture
def common(trained_gpt2_dir, tiny_editor_dir, world_path):
    return [f"paths.base_model={trained_gpt2_dir}", f"paths.editor={tiny_editor_dir}", f"paths.world={world_path}",
            "targets.n_last_blocks=2", "device=cpu"]


def write_edits(path, world, n, extra_lines=()):
    records = world.edit_split("test").records[:n]
    lines = [json.dumps({"request_id": f"r{i}", "prompt": r.prompt, "target_new": r.target_new,
                         "rephrase_prompt": list(r.rephrase_prompt), "locality_prompt": r.locality_prompt[0],
                         "locality_ground_truth": r.locality_ground_truth[0]}) for i, r in enumerate(records)]
    for index, text in extra_lines:
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def results(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_malformed_line_is_reported_with_its_number_and_nothing_is_applied(tmp_path, world, common, capsys):
    edits = write_edits(tmp_path / "edits.jsonl", world, 4, [(2, '{"prompt": "no target"'), (4, '{"prompt": "x", "target_new": ""}')])
    out = tmp_path / "edited"
    assert main(["edit", str(edits), "--out", str(out), *common]) == 2
    err = capsys.readouterr().err
    assert "edits.jsonl:3:" in err and "edits.jsonl:5:" in err and "target_new is empty" in err and "nothing applied" in err
    assert not out.exists()
    assert main(["edit", str(edits), "--dry-run", *common]) == 2


def test_local_apply_resume_rollback_and_list(tmp_path, world, common, capsys):
    edits = write_edits(tmp_path / "edits.jsonl", world, 3)
    out = tmp_path / "edited"
    assert main(["edit", str(edits), "--out", str(out), "--batch-size", "2", *common]) == 0
    first = results(tmp_path / "edits.jsonl.results.jsonl")
    assert [(r["status"], r["edit_id"], r["revision"]) for r in first] == [("applied", "edit-000001", 1), ("applied", "edit-000002", 1), ("applied", "edit-000003", 2)]
    assert set(first[0]["after"]) >= {"reliability_em", "generality_em", "locality_em"}
    assert "| applied | preview | skipped |" in capsys.readouterr().out

    write_edits(edits, world, 4)  # one more line appended
    assert main(["edit", str(edits), "--out", str(out), "--resume", *common]) == 0
    again = results(tmp_path / "edits.jsonl.results.jsonl")
    assert [r["status"] for r in again] == ["skipped", "skipped", "skipped", "applied"] and again[3]["edit_id"] == "edit-000004"
    assert main(["edit", str(edits), "--out", str(out), *common]) == 1  # without --resume the keys are refused
    assert "already applied" in results(tmp_path / "edits.jsonl.results.jsonl")[0]["error"]

    assert main(["rollback", "--to", "0", "--out", str(out), *common]) == 0
    base, edited = load_model(common[0].split("=", 1)[1], device="cpu")[0], load_model(out, device="cpu")[0]
    base, edited = edited_state(base), edited_state(edited)
    assert base.keys() == edited.keys() and all(torch.equal(base[k], edited[k]) for k in base)
    capsys.readouterr()
    assert main(["edits", "--out", str(out), *common]) == 0
    listing = capsys.readouterr().out
    assert "| edit-000004 | 3 | local | rolled back by local | r3 |" in listing


def test_dry_run_previews_the_metrics_and_writes_nothing(tmp_path, world, common, capsys):
    edits = write_edits(tmp_path / "edits.jsonl", world, 2)
    out = tmp_path / "edited"
    assert main(["edit", str(edits), "--out", str(out), "--dry-run", *common]) == 0
    preview = results(tmp_path / "edits.jsonl.results.jsonl")
    assert [r["status"] for r in preview] == ["preview", "preview"] and "nothing written" in capsys.readouterr().out
    assert not (out / "model.safetensors").exists()
    assert main(["edit", str(edits), "--out", str(out), *common]) == 0
    applied = results(tmp_path / "edits.jsonl.results.jsonl")
    assert [r["after"] for r in applied] == [r["after"] for r in preview] and applied[0]["revision"] == 1  # the preview wrote no revision


def test_server_and_local_give_the_same_weights_for_the_same_file(tmp_path, world, common, trained_gpt2_dir, tiny_editor_dir, world_path):
    edits = write_edits(tmp_path / "edits.jsonl", world, 5, [(5, '{"prompt": "broken"}')])
    server = MendServer(ServerConfig(port=0), lambda: EditService.open(str(trained_gpt2_dir), str(tiny_editor_dir), str(tmp_path / "journal"),
                                                                        device="cpu", n_last_blocks=2))
    server.start(wait=True)
    try:
        code = main(["edit", str(edits), "--server", f"127.0.0.1:{server.port}", "--batch-size", "2", "--continue-on-error"])
        assert code == 1  # the broken line failed; the others were applied
        statuses = [r["status"] for r in results(tmp_path / "edits.jsonl.results.jsonl")]
        assert statuses == ["applied"] * 5 + ["invalid"]
        served = edited_state(server.holder.service.model)
    finally:
        server.stop(1)
    local_out = tmp_path / "local"
    assert main(["edit", str(edits), "--out", str(local_out), "--batch-size", "2", "--continue-on-error",
                 "--results", str(tmp_path / "local.jsonl"), *common]) == 1
    local = edited_state(load_model(local_out, device="cpu")[0])  # the saved weights and edit memory
    assert served.keys() == local.keys() and any("mend_h" in k for k in local)
    assert all(torch.equal(served[k], local[k]) for k in served)
