"""How the journal knows it is intact: a hash of every edit row and a hash chain over the revisions.

- An edit's `digest` is the sha256 of every column of its row (its record, metrics, ids, author and
  its keys and values), so a changed byte of its keys or values, or of anything else it says, shows.
- A revision's `digest` is the sha256 of the previous revision's digest, its own row, the state
  changes (`events`) it made and the digests of the edits it applied: a changed, added or removed
  event, edit or revision breaks the chain from there on.

The journal checks both (and, on SQLite, the file's pages) when it opens, and hashes what it reads
after that (`mend.journal.EditJournal`); `mend journal check` runs the same checks, indexes included.
"""

from __future__ import annotations

import hashlib
import json

from mend.journal_backends import corrupt

EDIT_COLUMNS = "seq, edit_id, revision, record, pre, post, data, editor_hash, request_id, author, fingerprint"
REVISION_COLUMNS = "revision, kind, request_id, fingerprint, created, author"
CHUNK = 200  # edits read at a time while hashing them all (their keys and values are ~0.2 MiB each)


def edit_digest(row: tuple) -> str:
    """`row`: the edit's EDIT_COLUMNS, as stored."""
    seq, edit_id, revision, record, pre, post, data, *rest = row
    h = hashlib.sha256(json.dumps([seq, edit_id, revision, record, pre, post, *rest]).encode())
    h.update(bytes(data))
    return h.hexdigest()


def revision_digest(previous: str, row: tuple, events: list[tuple], edit_digests: list[str]) -> str:
    """`row`: the revision's REVISION_COLUMNS; `events`: its (seq, active, superseded_by) in seq order;
    `edit_digests`: those of the edits it applied, in seq order."""
    events = [[int(s), int(a), None if b is None else int(b)] for s, a, b in events]
    return hashlib.sha256(json.dumps([previous, *row, events, edit_digests]).encode()).hexdigest()


def chain_damage(db, after: int, upto: int) -> list[str]:
    """What does not match in the hash chain of the revisions (after, upto]."""
    previous = "" if after == 0 else (db.execute("SELECT digest FROM revisions WHERE revision=?", (after,)).fetchone() or [None])[0]
    if previous is None:
        return [f"revision {after} is missing"]
    revisions = db.execute(f"SELECT {REVISION_COLUMNS}, digest FROM revisions WHERE revision>? AND revision<=? ORDER BY revision",
                           (after, upto)).fetchall()
    events: dict[int, list] = {}
    for revision, seq, active, by in db.execute("SELECT revision, seq, active, superseded_by FROM events "
                                                "WHERE revision>? AND revision<=? ORDER BY revision, seq", (after, upto)).fetchall():
        events.setdefault(revision, []).append((seq, active, by))
    edits: dict[int, list] = {}
    for revision, digest in db.execute("SELECT revision, digest FROM edits WHERE revision>? AND revision<=? ORDER BY seq",
                                       (after, upto)).fetchall():
        edits.setdefault(revision, []).append(digest)
    problems = []
    for expected, (*row, stored) in zip(range(after + 1, upto + 1), revisions):
        if row[0] != expected:
            return problems + [f"revision {expected} is missing"]
        previous = revision_digest(previous, tuple(row), events.get(expected, []), edits.get(expected, []))
        if previous != stored:
            problems.append(f"revision {expected}: its state changes or edits differ from what was written (hash mismatch)")
    if len(revisions) < upto - after:
        problems.append(f"revision {after + len(revisions) + 1} is missing")
    return problems


def edit_damage(rows: list[tuple]) -> list[str]:
    """The edits among `rows` (EDIT_COLUMNS + digest) whose contents differ from their hash."""
    return [f"edit {row[1]} (seq {row[0]}): its keys, values or record differ from what was written (hash mismatch)"
            for row in rows if edit_digest(row[:-1]) != row[-1]]


def find_damage(db, full: bool = False) -> list[str]:
    """Every problem found in the journal's database `db`: the file's own check (SQLite; `full` also
    checks indexes), every edit's hash, the revisions' hash chain, rows beyond the last revision."""
    problems = db.integrity(full)
    if problems:  # the file itself is damaged: what is read from it cannot be trusted
        return problems
    last = db.execute("SELECT COALESCE(MAX(revision), 0) FROM revisions").fetchone()[0]
    top = db.execute("SELECT COALESCE(MAX(seq), 0) FROM edits").fetchone()[0]
    for first in range(1, top + 1, CHUNK):
        problems += edit_damage(db.execute(f"SELECT {EDIT_COLUMNS}, digest FROM edits WHERE seq>=? AND seq<?",
                                           (first, first + CHUNK)).fetchall())
    problems += chain_damage(db, 0, last)
    for table in ("edits", "events"):
        (n,) = db.execute(f"SELECT COUNT(*) FROM {table} WHERE revision>?", (last,)).fetchone()
        if n:
            problems.append(f"{n} row(s) of {table} belong to no revision (beyond the last, {last})")
    return problems


def raise_if_damaged(db) -> None:
    if problems := find_damage(db):
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise corrupt(db.name, "; ".join(problems[:3]) + more)
