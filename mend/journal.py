"""The durable edit journal: SQLite (the embedded default) or PostgreSQL, one schema, one code path.

`paths.journal` is a directory (SQLite in WAL mode, synchronous=FULL, `journal.sqlite3`) or a
`postgresql://` URL (psycopg 3; leaders and replicas of one served model share it).

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

Durability: a revision, its edits and their keys and values are one transaction, committed before
the call that made it returns. One writer: on PostgreSQL the writing server holds an advisory lock
for its lifetime (a second writer is refused at start), every write transaction takes it too, and
the commit notifies channel `mend_journal` with the new revision, which replicas LISTEN on.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load, save

from mend.aggregation import KeyValues
from mend.errors import EditNotFoundError, JournalUnavailableError, StateConflictError
from mend.records import EditRecord

FORMAT = "4"  # 4: keys and values in the database; 3: one safetensors file per edit; 2: without authors (both upgraded in place)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, request_id TEXT UNIQUE, fingerprint TEXT,
    created DOUBLE PRECISION NOT NULL, author TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS edits (
    seq INTEGER PRIMARY KEY, edit_id TEXT UNIQUE NOT NULL, revision INTEGER NOT NULL,
    record TEXT NOT NULL, pre TEXT NOT NULL, post TEXT NOT NULL, data {blob} NOT NULL,
    editor_hash TEXT NOT NULL, request_id TEXT, author TEXT NOT NULL DEFAULT '', fingerprint TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS edit_request_ids ON edits (request_id) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, active INTEGER NOT NULL, superseded_by INTEGER,
    PRIMARY KEY (revision, seq));
CREATE INDEX IF NOT EXISTS events_by_seq ON events (seq, revision)
"""

EDIT_COLUMNS = "seq, edit_id, revision, record, pre, post, data, editor_hash, request_id, author, fingerprint"
CHANNEL = "mend_journal"  # PostgreSQL: NOTIFY channel of new revisions
WRITER_LOCK = 0x6D656E64  # PostgreSQL: advisory lock held by the one writer ("mend"), and by every write transaction
SCHEMA_LOCK = WRITER_LOCK + 1  # PostgreSQL: taken while the schema is created (replicas too)


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def redacted(location: str | Path) -> str:
    """The journal's location for logs: a URL without its password."""
    text = str(location)
    if not is_url(text) or "@" not in text:
        return text
    scheme, rest = text.split("://", 1)
    user, host = rest.rsplit("@", 1)
    return f"{scheme}://{user.split(':', 1)[0]}:***@{host}" if ":" in user else text


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class _SQLite:
    """The embedded default: one file in a directory."""

    blob = "BLOB"

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(directory / "journal.sqlite3", check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, args=()):
        return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows) -> None:
        self.conn.executemany(sql, rows)

    @contextmanager
    def transaction(self, lock: int = 0):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def notify(self, revision: int) -> None:  # readers poll
        pass

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def close(self) -> None:
        self.conn.close()


class _Postgres:
    """A PostgreSQL database (psycopg 3), shared by the writing server and its replicas."""

    blob = "BYTEA"

    def __init__(self, url: str, writer: bool):
        import psycopg

        self.psycopg, self.url, self.writer = psycopg, url, writer
        self.conn = self._connect()
        self._listener = None
        self._in_transaction = False

    def _connect(self):
        try:
            conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self.psycopg.OperationalError as e:
            raise JournalUnavailableError(f"cannot connect to the journal database {redacted(self.url)} ({_first_line(e)}); "
                                          "nothing was written: retry when it is reachable") from None
        if self.writer and not conn.execute("SELECT pg_try_advisory_lock(%s)", (WRITER_LOCK,)).fetchone()[0]:
            conn.close()
            raise StateConflictError(f"another server is writing to the journal {redacted(self.url)}: send edits to it, "
                                     "or start this one as a replica (server.role=replica)")
        return conn

    @contextmanager
    def _unavailable(self):
        try:
            yield
        except self.psycopg.OperationalError as e:
            raise JournalUnavailableError(
                f"the journal database {redacted(self.url)} became unreachable ({_first_line(e)}): "
                "retry; with the same request_id a write that did commit is not applied twice") from None

    def _first(self, sql: str, args=()):
        """Run a statement that starts something (a read, a BEGIN): on a connection the database dropped
        (a restart, a terminated session), once more on a new one, which takes the writer's lock again."""
        with self._unavailable():
            try:
                return self.conn.execute(sql, args)
            except self.psycopg.OperationalError:
                if not self.conn.broken:
                    raise
                self.conn = self._connect()
                return self.conn.execute(sql, args)

    def execute(self, sql: str, args=()):
        sql = sql.replace("?", "%s")
        if self._in_transaction:
            with self._unavailable():
                return self.conn.execute(sql, args)
        return self._first(sql, args)

    def executemany(self, sql: str, rows) -> None:  # only inside a transaction
        with self._unavailable(), self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    @contextmanager
    def transaction(self, lock: int = WRITER_LOCK):
        self._first("BEGIN")
        self._in_transaction = True
        try:
            self.execute("SELECT pg_advisory_xact_lock(?)", (lock,))  # one at a time
            yield
            self.execute("COMMIT")
        except BaseException:
            if not self.conn.broken:
                with suppress(self.psycopg.OperationalError):  # the error that got here is the one to report
                    self.conn.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False

    def notify(self, revision: int) -> None:  # inside the write transaction: delivered at its commit
        self.execute("SELECT pg_notify(?, ?)", (CHANNEL, str(revision)))

    def wait(self, timeout: float) -> None:
        """Until a revision is committed (LISTEN), or `timeout` seconds: polling stays the fallback."""
        try:
            if self._listener is None or self._listener.broken:
                self._listener = self.psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                self._listener.execute(f"LISTEN {CHANNEL}")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except self.psycopg.OperationalError:
            self._listener = None
            time.sleep(timeout)

    def close(self) -> None:
        for conn in (self.conn, self._listener):
            if conn is not None:
                conn.close()


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
        """`location`: a directory (SQLite) or a postgresql:// URL. `writer=False` (a replica) only reads."""
        self.location = redacted(location)
        self._lock = threading.Lock()
        self._db = _Postgres(str(location), writer) if is_url(location) else _SQLite(Path(location))
        try:
            self._open(location, base_model_hash)
        except BaseException:
            self._db.close()
            raise

    def _open(self, location, base_model_hash: str) -> None:
        db = self._db
        with db.transaction(SCHEMA_LOCK):
            for statement in SCHEMA.format(blob=db.blob).split(";"):
                db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("base_model_hash", base_model_hash), ("format", FORMAT)])
                meta = {"base_model_hash": base_model_hash, "format": FORMAT}
        if isinstance(db, _SQLite) and meta.get("format") in ("2", "3"):
            self._upgrade(Path(location), meta["format"])
            meta["format"] = FORMAT
        if meta.get("format") != FORMAT:
            raise StateConflictError(f"the journal at {self.location} was written by an older version (format {meta.get('format', 1)}, "
                                     f"not {FORMAT}): give the server a new journal directory (or database) and re-apply its edits")
        if meta["base_model_hash"] != base_model_hash:
            raise StateConflictError(f"the journal at {self.location} belongs to base model {meta['base_model_hash'][:12]}, "
                                     f"not {base_model_hash[:12]}: point the server at that model, or give it a new journal directory (or database)")

    def _upgrade(self, directory: Path, fmt: str) -> None:
        """An SQLite journal of format 2 (no authors) or 3 (keys and values in files under factors/): to format 4."""
        db, factors = self._db, directory / "factors"
        with db.transaction():
            if fmt == "2":
                for table, column in (("revisions", "author TEXT NOT NULL DEFAULT ''"), ("edits", "author TEXT NOT NULL DEFAULT ''"),
                                      ("edits", "fingerprint TEXT")):
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            db.execute("ALTER TABLE edits ADD COLUMN data BLOB")
            for seq, name in db.execute("SELECT seq, factors_file FROM edits").fetchall():
                db.execute("UPDATE edits SET data=? WHERE seq=?", ((factors / name).read_bytes(), seq))
            db.execute("ALTER TABLE edits DROP COLUMN factors_file")
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
        """(revision, {seq: new state}) of every revision in (after, upto] that changed a state, in order."""
        with self._lock:
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
        """{seq: its keys and values per layer} for these edits, read in one query."""
        rows, seqs = [], list(seqs)
        with self._lock:
            for i in range(0, len(seqs), 500):  # SQLite takes a bounded number of parameters per statement
                chunk = seqs[i : i + 500]
                rows += self._db.execute(f"SELECT seq, data FROM edits WHERE seq IN ({', '.join('?' * len(chunk))})", tuple(chunk)).fetchall()
        missing = set(seqs) - {seq for seq, _ in rows}
        if missing:
            raise EditNotFoundError(f"no edits with sequence numbers {sorted(missing)}")
        out = {}
        for seq, data in rows:
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
            self._db.execute("INSERT INTO revisions VALUES (?, 'apply', ?, ?, ?, ?)",
                             (revision, request_id or None, fingerprint, time.time(), ", ".join(dict.fromkeys(authors))))
            self._db.executemany(f"INSERT INTO edits ({EDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (seq, f"edit-{seq:06d}", revision, json.dumps(rec.to_dict()), json.dumps(p), json.dumps(q), blob, editor_hash,
                 key or None, author, print_)
                for seq, rec, blob, p, q, key, author, print_ in zip(seqs, records, blobs, pre, post, keys, authors, fingerprints)])
            self._insert_events(revision, {**{s: EditState(True) for s in seqs}, **(states or {})})
        return revision, self.edits(revision=revision)

    def _insert_events(self, revision: int, states: dict[int, EditState]) -> None:  # inside a write transaction
        self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                             [(revision, s, int(st.active), st.superseded_by) for s, st in sorted(states.items())])
        self._db.notify(revision)

    def append_states(self, kind: str, states: dict[int, EditState], author: str = "anonymous") -> int:
        """A rollback (`kind` rollback or rollback_to): a new revision with these edits' new states."""
        with self._lock, self._db.transaction():
            revision = self._last_revision() + 1
            self._db.execute("INSERT INTO revisions VALUES (?, ?, NULL, '', ?, ?)", (revision, kind, time.time(), author))
            self._insert_events(revision, states)
        return revision
