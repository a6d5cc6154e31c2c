"""The durable edit journal: SQLite (WAL) for records, one safetensors file of keys and values per edit.

Tables
- `meta`: the base model's hash the journal belongs to.
- `revisions`: one row per state change (revision 0 is the base model, never stored): an `apply`
  of one or more edits, a `rollback` of one edit, or a `rollback_to` an earlier revision, with its
  `author` (the name of the caller's token; "anonymous" when auth is off). `request_id` (unique)
  makes a call of several edits idempotent; `fingerprint` detects a reused id.
- `edits`: one immutable row per edit, in application order (`seq`), pointing to its file of keys
  and values per layer (`mend.aggregation`), with its `author` and its own `request_id` (unique when
  given; batch edit files use it to resume; a single edit's call is idempotent by it, with the
  edit's `fingerprint`: edits of several callers can share one revision).
- `events`: each revision's changes of edit states: active, superseded (by a newer edit of the
  same fact: `superseded_by`), or rolled back. An edit's state at any revision is its last event up
  to it, so any past state can be restored exactly, and replaying the revisions in order repeats
  every change of the weights.

Durability: a file of keys and values is written to a temporary name, fsynced and renamed before the
transaction that references it commits (synchronous=FULL). A crash before the commit leaves an
unreferenced file, removed at the next open; after it, the edit is complete on disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from mend.aggregation import KeyValues
from mend.errors import EditNotFoundError, StateConflictError
from mend.records import EditRecord

FORMAT = "3"  # 3: authors, per-edit fingerprints (2: without; upgraded in place); 1: summed rank-1 factors

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, request_id TEXT UNIQUE, fingerprint TEXT,
    created REAL NOT NULL, author TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY, edit_id TEXT UNIQUE NOT NULL, revision INTEGER NOT NULL,
    record TEXT NOT NULL, pre TEXT NOT NULL, post TEXT NOT NULL, factors_file TEXT NOT NULL,
    editor_hash TEXT NOT NULL, request_id TEXT, author TEXT NOT NULL DEFAULT '', fingerprint TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS edit_request_ids ON edits (request_id) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, active INTEGER NOT NULL, superseded_by INTEGER,
    PRIMARY KEY (revision, seq));
CREATE INDEX IF NOT EXISTS events_by_seq ON events (seq, revision);
"""


@dataclass(frozen=True)
class EditState:
    """An edit's state after a revision: active, superseded by the newer edit `superseded_by`, or
    rolled back (neither)."""

    active: bool
    superseded_by: int | None = None

    @property
    def live(self) -> bool:  # applied and not rolled back: it returns when whatever supersedes it goes
        return self.active or self.superseded_by is not None


ROLLED_BACK = EditState(False)


@dataclass(frozen=True)
class JournalEdit:
    seq: int
    edit_id: str
    revision: int  # the revision that applied it
    record: EditRecord
    pre: dict[str, float]  # metrics before the edit (mend.metrics.EditMetrics fields)
    post: dict[str, float]  # metrics right after it
    active: bool
    rolled_back_at: int | None  # revision that rolled it back, when it is rolled back
    superseded_by: str  # edit_id of the newer active edit of the same fact, when superseded ("" otherwise)
    editor_hash: str
    request_id: str  # the edit's own idempotency key ("" when none)
    created: float
    applied_by: str = ""  # who applied it: the name of the caller's token ("" in journals older than format 3)
    rolled_back_by: str = ""  # who rolled it back, when it is rolled back


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EditJournal:
    def __init__(self, directory: str | Path, base_model_hash: str):
        self.dir = Path(directory)
        self.factors_dir = self.dir / "factors"
        self.factors_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "journal.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        fmt = self._db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        row = self._db.execute("SELECT value FROM meta WHERE key='base_model_hash'").fetchone()
        if row is not None and fmt is not None and fmt[0] == "2":  # add the columns of format 3; old writes have no author
            for table, column in (("revisions", "author TEXT NOT NULL DEFAULT ''"), ("edits", "author TEXT NOT NULL DEFAULT ''"),
                                  ("edits", "fingerprint TEXT")):
                if column.split()[0] not in {c[1] for c in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            self._db.execute("UPDATE meta SET value=? WHERE key='format'", (FORMAT,))
            fmt = (FORMAT,)
        if row is not None and (fmt is None or fmt[0] != FORMAT):
            self._db.close()
            raise StateConflictError(f"the journal at {self.dir} was written by an older version (format {fmt[0] if fmt else 1}, "
                                     f"not {FORMAT}): give the server a new journal directory and re-apply its edits")
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('base_model_hash', ?)", (base_model_hash,))
            self._db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        elif row[0] != base_model_hash:
            self._db.close()
            raise StateConflictError(
                f"the journal at {self.dir} belongs to base model {row[0][:12]}, not {base_model_hash[:12]}: "
                "point the server at that model, or give it a new journal directory"
            )
        self._remove_orphans()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _remove_orphans(self) -> None:
        """Factor files (and temporaries) of transactions that never committed."""
        known = {r[0] for r in self._db.execute("SELECT factors_file FROM edits")}
        for f in self.factors_dir.iterdir():
            if f.name not in known:
                f.unlink()

    # ------------------------------------------------------------------ reads

    def _last_revision(self) -> int:  # caller holds self._lock
        return self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM revisions").fetchone()[0]

    @property
    def revision(self) -> int:
        with self._lock:
            return self._last_revision()

    def find_request(self, request_id: str) -> tuple[int, str] | None:
        """(revision, fingerprint) of an earlier apply with this request id."""
        with self._lock:
            return self._db.execute("SELECT revision, fingerprint FROM revisions WHERE request_id=?", (request_id,)).fetchone()

    def find_edit_request(self, request_id: str) -> tuple[str, str | None] | None:
        """(edit_id, fingerprint) of the edit whose own key is `request_id` (fingerprint None when it came
        in a call of several edits)."""
        with self._lock:
            return self._db.execute("SELECT edit_id, fingerprint FROM edits WHERE request_id=?", (request_id,)).fetchone()

    def existing_edit_ids(self, request_ids: list[str]) -> dict[str, str]:
        """{request_id: edit_id} for the given per-edit request ids already in the journal."""
        with self._lock:
            rows = [self._db.execute("SELECT request_id, edit_id FROM edits WHERE request_id=?", (k,)).fetchone() for k in request_ids if k]
        return dict(r for r in rows if r)

    def states(self, revision: int | None = None) -> dict[int, EditState]:
        """Every edit's state after `revision` (default: now)."""
        with self._lock:
            if revision is None:
                revision = self._last_revision()
            rows = self._db.execute("SELECT seq, active, superseded_by FROM events WHERE revision<=? ORDER BY revision",
                                    (revision,)).fetchall()
        return {seq: EditState(bool(active), by) for seq, active, by in rows}

    def history(self):
        """(revision, {seq: active after it}) for every revision that changed the active set, in order:
        replaying these changes repeats every change the weights went through."""
        with self._lock:
            rows = self._db.execute("SELECT revision, seq, active FROM events ORDER BY revision, seq").fetchall()
        state: dict[int, bool] = {}
        changes: dict[int, dict[int, bool]] = {}
        for revision, seq, active in rows:
            if state.get(seq, False) != bool(active):
                changes.setdefault(revision, {})[seq] = bool(active)
            state[seq] = bool(active)
        return sorted(changes.items())

    def next_seq(self) -> int:
        """The sequence number the next applied edit gets (the caller serialises applies)."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()[0] + 1

    def get(self, edit_id: str) -> JournalEdit:
        edits = self._select("WHERE e.edit_id=?", (edit_id,))
        if not edits:
            raise EditNotFoundError(f"no edit {edit_id!r} in the journal: ListEdits shows the known ids")
        return edits[0]

    def edits(self, *, active_only: bool = False, revision: int | None = None, after_seq: int = 0, limit: int = 1000) -> list[JournalEdit]:
        """Edits in application order; `revision` selects those applied by that revision."""
        where, args = "WHERE e.seq>?", [after_seq]
        if revision is not None:
            where, args = where + " AND e.revision=?", args + [revision]
        found = self._select(where + " ORDER BY e.seq", tuple(args))
        found = [e for e in found if e.active] if active_only else found
        return found[:limit]

    def _select(self, where: str, args: tuple) -> list[JournalEdit]:
        with self._lock:
            rows = self._db.execute(
                "SELECT e.seq, e.edit_id, e.revision, e.record, e.pre, e.post, e.editor_hash, e.request_id, r.created, "
                "v.active, v.revision, (SELECT edit_id FROM edits s WHERE s.seq=v.superseded_by), e.author, l.author "
                "FROM edits e JOIN revisions r ON r.revision=e.revision "
                "JOIN events v ON v.seq=e.seq AND v.revision=(SELECT MAX(revision) FROM events w WHERE w.seq=e.seq) "
                "JOIN revisions l ON l.revision=v.revision "
                f"{where}", args).fetchall()
        return [
            JournalEdit(seq, edit_id, rev, EditRecord.from_dict(json.loads(rec)), json.loads(pre), json.loads(post),
                        bool(active), None if active or by else last, by or "", editor_hash, request_id or "", created,
                        applied_by, "" if active or by else last_by)
            for seq, edit_id, rev, rec, pre, post, editor_hash, request_id, created, active, last, by, applied_by, last_by in rows
        ]

    def load_key_values(self, seq: int) -> KeyValues:
        with self._lock:
            row = self._db.execute("SELECT factors_file FROM edits WHERE seq=?", (seq,)).fetchone()
        if row is None:
            raise EditNotFoundError(f"no edit with sequence number {seq}")
        flat = load_file(self.factors_dir / row[0])
        names = sorted({k.rsplit(".", 1)[0] for k in flat})
        return {n: (flat[f"{n}.keys"], flat[f"{n}.values"]) for n in names}

    # ------------------------------------------------------------------ writes

    def append_edits(self, records: list[EditRecord], key_values: list[KeyValues], pre: list[dict], post: list[dict],
                     editor_hash: str, request_id: str = "", fingerprint: str = "",
                     edit_request_ids: list[str] | None = None,
                     states: dict[int, EditState] | None = None, authors: list[str] | None = None,
                     fingerprints: list[str | None] | None = None) -> tuple[int, list[JournalEdit]]:
        """Persist one apply of `records` as a new revision; returns (revision, the new edits). The new
        edits get the sequence numbers from `next_seq()` on; `states` gives their states and any
        older edit's new state (superseded), all active by default. `authors` and `fingerprints` are
        per edit (a single edit's call is idempotent by its key and fingerprint)."""
        keys = edit_request_ids or [""] * len(records)
        authors = authors or ["anonymous"] * len(records)
        fingerprints = fingerprints or [None] * len(records)
        with self._lock:
            revision = self._last_revision() + 1
            first = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()[0] + 1
            seqs = list(range(first, first + len(records)))
            states = {**{s: EditState(True) for s in seqs}, **(states or {})}
            files = []
            for seq, kv in zip(seqs, key_values):
                name = f"{seq:08d}.safetensors"
                tmp = self.factors_dir / f"{name}.tmp"
                save_file({f"{n}.{k}": t.detach().cpu().contiguous() for n, (u, d) in kv.items() for k, t in (("keys", u), ("values", d))}, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                tmp.replace(self.factors_dir / name)
                files.append(name)
            _fsync_dir(self.factors_dir)
            created = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO revisions VALUES (?, 'apply', ?, ?, ?, ?)",
                                 (revision, request_id or None, fingerprint, created, ", ".join(dict.fromkeys(authors))))
                for seq, rec, name, p, q, key, author, print_ in zip(seqs, records, files, pre, post, keys, authors, fingerprints):
                    self._db.execute("INSERT INTO edits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                        seq, f"edit-{seq:06d}", revision, json.dumps(rec.to_dict()), json.dumps(p), json.dumps(q), name,
                        editor_hash, key or None, author, print_))
                self._insert_events(revision, states)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                for name in files:
                    (self.factors_dir / name).unlink(missing_ok=True)
                raise
        return revision, self.edits(revision=revision)

    def _insert_events(self, revision: int, states: dict[int, EditState]) -> None:  # inside a transaction
        self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                             [(revision, s, int(st.active), st.superseded_by) for s, st in sorted(states.items())])

    def append_states(self, kind: str, states: dict[int, EditState], author: str = "anonymous") -> int:
        """A rollback (`kind` rollback or rollback_to): a new revision with these edits' new states."""
        with self._lock:
            revision = self._last_revision() + 1
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO revisions VALUES (?, ?, NULL, '', ?, ?)", (revision, kind, time.time(), author))
                self._insert_events(revision, states)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return revision
