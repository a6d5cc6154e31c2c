"""`mend edit FILE`, `mend rollback`, `mend edits`: batch edit files against a server or locally.

An edit file is JSONL, one edit per line, with EasyEdit's field names (see data/sample_edits.jsonl, shipped):
    {"prompt": "...", "target_new": "...", "subject": "...", "relation": "...", "ground_truth": "...",
     "rephrase_prompt": "..." or [...], "locality_prompt": "..." or [...],
     "locality_ground_truth": "..." or [...], "request_id": "...", "case_id": "..."}
`prompt` and `target_new` are required. A line that edits the same prompt (or the same subject and
relation) as an earlier active edit supersedes it. `request_id` is the edit's key in the journal (`--resume`
skips keys already applied); a line without one gets `auto-<hash of its content>`.

Targets: `--server ADDR` sends chunks of `--batch-size` edits with ApplyEdits; without it the file
is applied in this process to `paths.base_model` with `paths.editor`, and the edited model is
written with save_pretrained to `--out` together with its journal (`--out/journal`). `--dry-run`
previews: each chunk's metrics before and after, as it would be applied, with nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mend.errors import MendError
from mend.records import EditRecord

METRICS = ("reliability_em", "generality_em", "locality_em")


def _state(active: bool, superseded_by: str, rolled_back_by: str) -> str:
    return "active" if active else f"superseded by {superseded_by}" if superseded_by else f"rolled back by {rolled_back_by or '?'}"


@dataclass
class Line:
    number: int
    record: EditRecord
    key: str


def parse_edit_file(path: Path) -> tuple[list[Line], list[tuple[int, str]]]:
    """(valid lines, (line number, error message) of each invalid line)."""
    lines, errors, seen = [], [], {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("a line must be a JSON object")
            key = str(data.pop("request_id", "") or "")
            record = EditRecord.from_dict(data)
        except (ValueError, MendError) as e:  # json.JSONDecodeError is a ValueError
            errors.append((number, f"{path}:{number}: {e}"))
            continue
        key = key or "auto-" + hashlib.sha256(json.dumps(record.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
        if key in seen:
            errors.append((number, f"{path}:{number}: request_id {key!r} repeats line {seen[key]}"))
            continue
        seen[key] = number
        lines.append(Line(number, record, key))
    return lines, errors


class ServerTarget:
    def __init__(self, address: str, token: str):
        from server.client import EditClient

        self.client = EditClient(address, token=token)
        self.client.wait_ready(60)

    def done(self) -> dict[str, str]:
        return {e.request_id: e.edit_id for e in self.client.edits() if e.request_id}

    def apply(self, records, keys, call_id, dry_run=False) -> tuple[int, list[dict]]:
        from google.protobuf.json_format import MessageToDict

        reply = self.client.apply_batch(records, request_id=call_id, edit_request_ids=keys, dry_run=dry_run)
        return reply.model_revision, [{"edit_id": e.edit_id, "before": MessageToDict(e.before, preserving_proto_field_name=True),
                                       "after": MessageToDict(e.after, preserving_proto_field_name=True)} for e in reply.edits]

    def rollback(self, edit_id: str | None, revision: int | None) -> int:
        return self.client.rollback(edit_id) if edit_id else self.client.rollback_to(revision).model_revision

    def list(self, active_only: bool) -> list[tuple]:
        return [(e.edit_id, e.revision, e.applied_by, _state(e.active, e.superseded_by, e.rolled_back_by), e.request_id,
                 e.spec.prompt, e.spec.target_new) for e in self.client.edits(active_only)]

    def close(self) -> None:
        self.client.close()


class LocalTarget:
    def __init__(self, cfg, out: Path, dry_run: bool = False):
        from mend_cli.serve import open_service
        from omegaconf import OmegaConf

        self.out, self.dry_run = out, dry_run
        self.service = open_service(OmegaConf.merge(cfg, {"paths": {"journal": str(out / "journal")}}))

    def done(self) -> dict[str, str]:
        return {e.request_id: e.edit_id for e in self.service.list() if e.request_id}

    def apply(self, records, keys, call_id, dry_run=False) -> tuple[int, list[dict]]:
        result = self.service.apply(records, call_id, edit_request_ids=keys, author="local", dry_run=dry_run)
        return result.revision, [{"edit_id": e.edit_id, "before": e.pre, "after": e.post} for e in result.edits]

    def rollback(self, edit_id: str | None, revision: int | None) -> int:
        return self.service.rollback_edit(edit_id, "local") if edit_id else self.service.rollback_to(revision, "local")[0]

    def list(self, active_only: bool) -> list[tuple]:
        return [(e.edit_id, e.revision, e.applied_by, _state(e.active, e.superseded_by, e.rolled_back_by), e.request_id,
                 e.record.prompt, e.record.target_new) for e in self.service.list(active_only)]

    def close(self) -> None:
        """Write the edited model (weights and edit memory) beside its journal (not after a dry run),
        then close the journal."""
        if not self.dry_run:
            from mend.aggregation import save_memory

            self.service.model.save_pretrained(self.out)
            save_memory(self.service.model, self.out)
            self.service.tokenizer.save_pretrained(self.out)
        self.service.close()


def _target(args, cfg):
    return ServerTarget(args.server, args.token) if args.server else LocalTarget(cfg, Path(args.out), getattr(args, "dry_run", False))


def edit(args, cfg) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"error: no edit file at {path}", file=sys.stderr)
        return 2
    lines, errors = parse_edit_file(path)
    for _, message in errors:
        print(f"invalid: {message}", file=sys.stderr)
    if errors and not args.continue_on_error:
        print(f"{len(errors)} invalid line(s): nothing applied (fix them, or pass --continue-on-error)", file=sys.stderr)
        return 2
    results_path = Path(args.results or f"{path}.results.jsonl")
    results = [{"line": number, "status": "invalid", "error": message} for number, message in errors]
    target = _target(args, cfg)
    try:
        done = target.done() if args.resume else {}
        todo = [ln for ln in lines if ln.key not in done]
        results += [{"line": ln.number, "request_id": ln.key, "edit_id": done[ln.key], "status": "skipped"} for ln in lines if ln.key in done]
        failed_chunk = False
        with tqdm(total=len(todo), desc="edits", unit="edit") as bar:
            for i in range(0, len(todo), args.batch_size):
                chunk = todo[i : i + args.batch_size]
                keys = [ln.key for ln in chunk]
                call_id = "chunk-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
                if failed_chunk:
                    results += [{"line": ln.number, "request_id": ln.key, "status": "not-run"} for ln in chunk]
                    continue
                try:
                    revision, applied = target.apply([ln.record for ln in chunk], keys, call_id, args.dry_run)
                    status = "preview" if args.dry_run else "applied"
                    results += [{"line": ln.number, "request_id": ln.key, "status": status, "revision": revision, **a}
                                for ln, a in zip(chunk, applied)]
                except Exception as e:  # grpc.RpcError or MendError: report it on every line of the chunk
                    message = e.details() if hasattr(e, "details") else str(e)
                    results += [{"line": ln.number, "request_id": ln.key, "status": "failed", "error": message} for ln in chunk]
                    failed_chunk = not args.continue_on_error
                bar.update(len(chunk))
    finally:
        target.close()
    results.sort(key=lambda r: r["line"])
    results_path.write_text("".join(json.dumps(r) + "\n" for r in results))
    done = "dry run, nothing written" if args.dry_run else "" if args.server else f"edited model -> {args.out}"
    print(summary(results) + f"\nresults -> {results_path}" + (f"; {done}" if done else ""))
    return 0 if all(r["status"] in ("applied", "preview", "skipped") for r in results) else 1


def summary(results: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in results) for s in ("applied", "preview", "skipped", "failed", "invalid", "not-run")}
    applied = [r for r in results if r["status"] in ("applied", "preview")]

    def mean(key):
        values = [r["after"][key] for r in applied if r["after"].get(key) is not None and not math.isnan(r["after"][key])]
        return f"{sum(values) / len(values):.3f}" if values else "-"

    rows = ["| " + " | ".join(counts) + " | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |",
            "|" + "---|" * (len(counts) + len(METRICS)),
            "| " + " | ".join(str(v) for v in counts.values()) + " | " + " | ".join(mean(m) for m in METRICS) + " |"]
    return "\n".join(rows)


def rollback(args, cfg) -> int:
    if (args.edit_id is None) == (args.to is None):
        print("error: give an edit id or --to REVISION (0 = the base model)", file=sys.stderr)
        return 2
    target = _target(args, cfg)
    try:
        revision = target.rollback(args.edit_id, args.to)
    finally:
        target.close()
    print(f"rolled back {'edit ' + args.edit_id if args.edit_id else f'to revision {args.to}'}: now at revision {revision}")
    return 0


def list_edits(args, cfg) -> int:
    target = _target(args, cfg)
    try:
        rows = target.list(args.active)
    finally:
        if args.server:
            target.close()
        else:
            target.service.close()  # listing never rewrites the model
    print("| edit | revision | applied by | state | request_id | prompt | target_new |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return 0


def run(command: str, argv: list[str], load_config) -> int:
    parser = argparse.ArgumentParser(prog=f"mend {command}", description=__doc__.split("\n")[0])
    if command == "edit":
        parser.add_argument("file", help="JSONL edit file")
        parser.add_argument("--batch-size", type=int, default=1, help="edits per update (one ApplyEdits call)")
        parser.add_argument("--dry-run", action="store_true", help="preview: each edit's metrics before and after, nothing written")
        parser.add_argument("--resume", action="store_true", help="skip edits whose request_id is already in the journal")
        parser.add_argument("--continue-on-error", action="store_true", help="apply the valid lines even if some fail")
        parser.add_argument("--results", help="results JSONL (default FILE.results.jsonl)")
    elif command == "rollback":
        parser.add_argument("edit_id", nargs="?", help="the edit to roll back")
        parser.add_argument("--to", type=int, help="restore the state of this revision (0 = the base model)")
    else:
        parser.add_argument("--active", action="store_true", help="only edits now active")
    parser.add_argument("--server", help="ADDR of a running `mend serve` (default: work locally)")
    parser.add_argument("--token", default="", help="bearer token for the server")
    parser.add_argument("--out", help="local mode: edited model + its journal (default: <home>/edited-model)")
    parser.epilog = "Any key=value arguments are config overrides (configs/mend.yaml), used in local mode."
    args, overrides = parser.parse_known_args(argv)
    if getattr(args, "edit_id", None) and "=" in args.edit_id:  # an override, not an edit id
        overrides, args.edit_id = [args.edit_id, *overrides], None
    unknown = [o for o in overrides if o.startswith("-") or "=" not in o]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if command == "edit" and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    cfg = load_config(overrides)
    args.out = args.out or str(Path(cfg.paths.home) / "edited-model")
    try:
        return {"edit": edit, "rollback": rollback, "edits": list_edits}[command](args, cfg)
    except MendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
