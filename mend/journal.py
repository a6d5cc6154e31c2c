"""The durable edit journal: SQLite (the embedded default) or PostgreSQL, one schema, one code path.

`paths.journal` is a directory (SQLite in WAL mode, synchronous=FULL, `journal.sqlite3`) or a
`postgresql://` URL (psycopg 3; leaders and replicas of one served model share it); the two
databases are `mend.journal_backends`.

Tables
- `meta`: the base model's hash the journal belongs to, and the format.
- `revisions`: one row per state change (revision 0 is the base model, never stored): an `apply`
  of one or more edits, a `rollback` of one edit, or a `rollback_to` an earlier revision, with its
  `author` (the name of the caller's token; "anonymous" when auth is off). `request_id` (unique)
  makes a call of several edits idempotent; `fingerprint` detects a reused id.
- `edits`: one immutable row per edit, in application order (`seq`), with its keys and values per
  layer (`mend.aggregation`) as safetensors bytes in `data`, its `author` and its own `request_id`
  (unique when given; batch edit files use it to resume; a single edit's call is idempotent by it,
  with the edit's `fingerprint`: edits of several callers can share one revision).
- `events`: each revision's changes of edit states: active, superseded (by a newer edit of the
  same fact: `superseded_by`), or rolled back. An edit's state at any revision is its last event up
  to it, so any past state can be restored exactly, and replaying the revisions in order repeats
  every change of the weights.

Integrity (`mend.journal_integrity`): every edit row and every revision carries a `digest` (a hash
of the edit; a hash chain over the revisions). Opening a journal checks them all, and the file's
pages on SQLite; reading keys and values, or a replica's new revisions, checks them again. A damaged
journal raises JournalCorruptError and is never served from.

Durability: a revision, its edits and their keys and values are one transaction, committed before
the call that made it returns. One writer: on PostgreSQL the writing server holds an advisory lock
for its lifetime (a second writer is refused at start), every write transaction takes it too, and
the commit notifies channel `mend_journal` with the new revision, which replicas LISTEN on.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load, save

from mend.aggregation import KeyValues
from mend.errors import EditNotFoundError, JournalCorruptError, StateConflictError
from mend.journal_backends import SCHEMA_LOCK, SQLiteJournalDB, corrupt, open_database, redacted
from mend.journal_integrity import (EDIT_COLUMNS, REVISION_COLUMNS, chain_damage, edit_damage, edit_digest, find_damage,
                                    raise_if_damaged, revision_digest)
from mend.records import EditRecord

# 5: hashes of edits and revisions; 4: keys and values in the database; 3: one safetensors file per
# edit; 2: without authors (all upgraded in place)
FORMAT = "5"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, request_id TEXT UNIQUE, fingerprint TEXT,
    created DOUBLE PRECISION NOT NULL, author TEXT NOT NULL DEFAULT '', digest TEXT);
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY, edit_id TEXT UNIQUE NOT NULL, revision INTEGER NOT NULL,
    record TEXT NOT NULL, pre TEXT NOT NULL, post TEXT NOT NULL, data {blob} NOT NULL,
    editor_hash TEXT NOT NULL, request_id TEXT, author TEXT NOT NULL DEFAULT '', fingerprint TEXT, digest TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS edit_request_ids ON edits (request_id) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, active INTEGER NOT NULL, superseded_by INTEGER,
    PRIMARY KEY (revision, seq));
CREATE INDEX IF NOT EXISTS events_by_seq ON events (seq, revision)
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


class EditJournal:
    def __init__(self, location: str | Path, base_model_hash: str, writer: bool = True):
        """`location`: a directory (SQLite) or a postgresql:// URL. `writer=False` (a replica) only reads.
        A damaged journal raises JournalCorruptError (`mend.journal_integrity`)."""
        self.location = redacted(location)
        self._lock = threading.Lock()
        self._db = open_database(location, writer)
        try:
            self._open(location, base_model_hash, writer)
            raise_if_damaged(self._db)
        except BaseException:
            self._db.close()
            raise

    def _open(self, location, base_model_hash: str, writer: bool) -> None:
        db = self._db
        with db.transaction(SCHEMA_LOCK):
            for statement in SCHEMA.format(blob=db.blob).split(";"):
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("base_model_hash", base_model_hash), ("format", FORMAT)])
                meta = {"base_model_hash": base_model_hash, "format": FORMAT}
        fmt = meta.get("format")
        if fmt in ("2", "3", "4") and (writer or isinstance(db, SQLiteJournalDB)):
            self._upgrade(Path(location), fmt)
        elif fmt != FORMAT:
            raise StateConflictError(f"the journal at {self.location} is of format {fmt or 1}, not {FORMAT}: " + (
                "start its leader first, which upgrades it in place" if fmt in ("2", "3", "4") else
                "it was written by an older version of mend; give the server a new journal directory (or database) and re-apply its edits"))
        if meta["base_model_hash"] != base_model_hash:
            raise StateConflictError(f"the journal at {self.location} belongs to base model {meta['base_model_hash'][:12]}, "
                                     f"not {base_model_hash[:12]}: point the server at that model, or give it a new journal directory (or database)")

    def _upgrade(self, directory: Path, fmt: str) -> None:
        """A journal of format 2 (no authors) or 3 (keys and values in files under factors/; both SQLite
        only) or 4 (no hashes): to format 5, in one transaction."""
        db, factors = self._db, directory / "factors"
        with db.transaction():
            if fmt == "2":
                for table, column in (("revisions", "author TEXT NOT NULL DEFAULT ''"), ("edits", "author TEXT NOT NULL DEFAULT ''"),
                                      ("edits", "fingerprint TEXT")):
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            if fmt in ("2", "3"):
                db.execute("ALTER TABLE edits ADD COLUMN data BLOB")
                for seq, name in db.execute("SELECT seq, factors_file FROM edits").fetchall():
                    db.execute("UPDATE edits SET data=? WHERE seq=?", ((factors / name).read_bytes(), seq))
                db.execute("ALTER TABLE edits DROP COLUMN factors_file")
            for table in ("revisions", "edits"):
                db.execute(f"ALTER TABLE {table} ADD COLUMN digest TEXT")
            for row in db.execute(f"SELECT {EDIT_COLUMNS} FROM edits ORDER BY seq").fetchall():
                db.execute("UPDATE edits SET digest=? WHERE seq=?", (edit_digest(row), row[0]))
            previous = ""
            for row in db.execute(f"SELECT {REVISION_COLUMNS} FROM revisions ORDER BY revision").fetchall():
                events = db.execute("SELECT seq, active, superseded_by FROM events WHERE revision=? ORDER BY seq", (row[0],)).fetchall()
                digests = [d for (d,) in db.execute("SELECT digest FROM edits WHERE revision=? ORDER BY seq", (row[0],)).fetchall()]
                previous = revision_digest(previous, row, events, digests)
                db.execute("UPDATE revisions SET digest=? WHERE revision=?", (previous, row[0]))
            db.execute("UPDATE meta SET value=? WHERE key='format'", (FORMAT,))
        shutil.rmtree(factors, ignore_errors=True)  # after the commit: their bytes are in the database now

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def wait(self, timeout: float) -> None:
        """Block until another process may have written a revision (PostgreSQL: NOTIFY), at most `timeout` s."""
        self._db.wait(timeout)

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

    def changes(self, after: int, upto: int) -> list[tuple[int, dict[int, EditState]]]:
        """(revision, {seq: new state}) of every revision in (after, upto] that changed a state, in order;
        JournalCorruptError when those revisions do not match their hash chain."""
        with self._lock:
            if problems := chain_damage(self._db, after, upto):
                raise corrupt(self._db.name, "; ".join(problems[:3]))
            rows = self._db.execute("SELECT revision, seq, active, superseded_by FROM events WHERE revision>? AND revision<=? "
                                    "ORDER BY revision, seq", (after, upto)).fetchall()
        out: dict[int, dict[int, EditState]] = {}
        for revision, seq, active, by in rows:
            out.setdefault(revision, {})[seq] = EditState(bool(active), by)
        return list(out.items())

    def editor_hashes(self) -> set[str]:
        """The hashes of the editors that made the journal's edits."""
        with self._lock:
            return {h for (h,) in self._db.execute("SELECT DISTINCT editor_hash FROM edits").fetchall()}

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

    def load_key_values(self, seqs: list[int]) -> dict[int, KeyValues]:
        """{seq: its keys and values per layer} for these edits, read in one query and checked against
        their hashes (JournalCorruptError when one differs)."""
        rows, seqs = [], list(seqs)
        with self._lock:
            for i in range(0, len(seqs), 500):  # SQLite takes a bounded number of parameters per statement
                chunk = seqs[i : i + 500]
                rows += self._db.execute(f"SELECT {EDIT_COLUMNS}, digest FROM edits WHERE seq IN ({', '.join('?' * len(chunk))})",
                                         tuple(chunk)).fetchall()
        missing = set(seqs) - {row[0] for row in rows}
        if missing:
            raise EditNotFoundError(f"no edits with sequence numbers {sorted(missing)}")
        if problems := edit_damage(rows):
            raise corrupt(self._db.name, "; ".join(problems[:3]))
        out = {}
        for seq, data in ((row[0], row[6]) for row in rows):
            flat = load(bytes(data))
            out[seq] = {n: (flat[f"{n}.keys"], flat[f"{n}.values"]) for n in sorted({k.rsplit(".", 1)[0] for k in flat})}
        return out

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
        blobs = [save({f"{n}.{k}": t.detach().cpu().contiguous() for n, (u, d) in kv.items() for k, t in (("keys", u), ("values", d))})
                 for kv in key_values]
        with self._lock, self._db.transaction():
            revision = self._last_revision() + 1
            first = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()[0] + 1
            seqs = list(range(first, first + len(records)))
            rows = [(seq, f"edit-{seq:06d}", revision, json.dumps(rec.to_dict()), json.dumps(p), json.dumps(q), blob, editor_hash,
                     key or None, author, print_)
                    for seq, rec, blob, p, q, key, author, print_ in zip(seqs, records, blobs, pre, post, keys, authors, fingerprints)]
            digests = [edit_digest(row) for row in rows]
            self._db.executemany(f"INSERT INTO edits ({EDIT_COLUMNS}, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(*row, d) for row, d in zip(rows, digests)])
            self._write_revision((revision, "apply", request_id or None, fingerprint, time.time(), ", ".join(dict.fromkeys(authors))),
                                 {**{s: EditState(True) for s in seqs}, **(states or {})}, digests)
        return revision, self.edits(revision=revision)

    def _write_revision(self, row: tuple, states: dict[int, EditState], edit_digests: list[str]) -> None:
        """Insert revision `row` (REVISION_COLUMNS) with its state changes, chained to the previous revision's
        hash, and notify replicas (inside a write transaction)."""
        revision = row[0]
        previous = self._db.execute("SELECT digest FROM revisions WHERE revision=?", (revision - 1,)).fetchone() if revision > 1 else ("",)
        events = [(s, int(st.active), st.superseded_by) for s, st in sorted(states.items())]
        digest = revision_digest(previous[0], row, events, edit_digests)
        self._db.execute(f"INSERT INTO revisions ({REVISION_COLUMNS}, digest) VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, digest))
        self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", [(revision, *e) for e in events])
        self._db.notify(revision)

    def append_states(self, kind: str, states: dict[int, EditState], author: str = "anonymous") -> int:
        """A rollback (`kind` rollback or rollback_to): a new revision with these edits' new states."""
        with self._lock, self._db.transaction():
            revision = self._last_revision() + 1
            self._write_revision((revision, kind, None, "", time.time(), author), states, [])
        return revision


def check_journal(location: str | Path) -> list[str]:
    """`mend journal check`: every problem found in the journal at `location`, indexes included ([]: all is well)."""
    try:
        db = open_database(location, writer=False, create=False)
    except JournalCorruptError as e:
        return [str(e)]
    try:
        fmt = dict(db.execute("SELECT key, value FROM meta").fetchall()).get("format")
        if fmt != FORMAT:
            return [f"format {fmt or '?'}, not {FORMAT}: `mend serve` on it upgrades it in place (then check again)"]
        return find_damage(db, full=True)
    except JournalCorruptError as e:
        return [str(e)]
    finally:
        db.close()


def backup_journal(location: str | Path, dest: str | Path) -> Path:
    """`mend journal backup`: an online, consistent copy of the journal at `location`, written to `dest`
    (SQLite: a new directory, which `paths.journal` can name; PostgreSQL: a `pg_dump` archive file)."""
    db = open_database(location, writer=False, create=False)
    try:
        return db.backup(Path(dest))
    finally:
        db.close()
