"""The journal's two databases behind one small interface (execute, transaction, notify, wait,
integrity, backup): SQLite, the embedded default (a directory holding `journal.sqlite3`, WAL mode,
synchronous=FULL), and PostgreSQL (psycopg 3; leaders and replicas of one served model share it).

Each turns its database's failures into the library's typed errors, so that the service never
branches on which one it has: a database or disk that cannot grow is `JournalFullError`, a damaged
file `JournalCorruptError`, a database that cannot be reached `JournalUnavailableError`.
"""

from __future__ import annotations

import glob
import shutil
import sqlite3
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from mend.errors import JournalCorruptError, JournalFullError, JournalUnavailableError, StateConflictError

FILE = "journal.sqlite3"  # the SQLite journal's file in its directory
CHANNEL = "mend_journal"  # PostgreSQL: NOTIFY channel of new revisions
WRITER_LOCK = 0x6D656E64  # PostgreSQL: advisory lock held by the one writer ("mend"), and by every write transaction
SCHEMA_LOCK = WRITER_LOCK + 1  # PostgreSQL: taken while the schema is created (replicas too)

FULL_ADVICE = ("nothing was written; free disk space (or raise the database's size limit) and retry: "
               "the served model and its revision are unchanged")


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


def corrupt(location: str, what: str) -> JournalCorruptError:
    return JournalCorruptError(f"the journal at {location} is damaged ({what}); nothing was served from it. Restore it from a backup "
                               "(`mend journal backup` makes one), or move it aside and start on a new journal; "
                               "`mend journal check` lists what is damaged")


class SQLiteJournalDB:
    """The embedded default: one file in a directory."""

    blob = "BLOB"
    SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB, SQLITE_IOERR = 11, 13, 26, 10

    def __init__(self, directory: Path, create: bool = True):
        self.path = directory / FILE
        self.name = str(self.path)  # what messages call it
        if not create and not self.path.is_file():
            raise JournalUnavailableError(f"no journal at {directory} (no {FILE} there)")
        wal = self.path.with_name(FILE + "-wal")
        if self.path.is_file() and self.path.stat().st_size == 0 and not (wal.is_file() and wal.stat().st_size):
            raise corrupt(str(self.path), "the file is empty: it was truncated")  # a new journal's file is never empty once opened
        directory.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._translated():
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _translated(self):
        """SQLite's failures as the library's errors; others as they are."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # the primary result code of an extended one
            if code == self.SQLITE_FULL:
                raise JournalFullError(f"the journal at {self.path} cannot grow ({e}): {FULL_ADVICE}") from None
            if code in (self.SQLITE_CORRUPT, self.SQLITE_NOTADB):
                raise corrupt(str(self.path), str(e)) from None
            if code == self.SQLITE_IOERR:
                raise JournalUnavailableError(f"the journal file {self.path} cannot be read or written ({e}); "
                                              "nothing was written: check the disk, then retry") from None
            raise

    def execute(self, sql: str, args=()):
        with self._translated():
            return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows) -> None:
        with self._translated():
            self.conn.executemany(sql, rows)

    @contextmanager
    def transaction(self, lock: int = 0):
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:  # SQLite may have rolled it back itself (a full disk, say)
                with suppress(sqlite3.Error):  # the error that got here is the one to report
                    self.conn.execute("ROLLBACK")
            raise

    def notify(self, revision: int) -> None:  # readers poll
        pass

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def integrity(self, full: bool) -> list[str]:
        """SQLite's own check of the file's pages and records ("ok" -> []); `full` also checks the indexes."""
        rows = self.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
        return [r[0] for r in rows if r[0] != "ok"]

    def backup(self, dest: Path) -> Path:
        """An online, consistent copy (SQLite's backup API) into the new directory `dest`; `paths.journal=DEST` opens it."""
        target = dest / FILE
        if target.exists():
            raise StateConflictError(f"{target} already exists: give a new directory for the backup")
        dest.mkdir(parents=True, exist_ok=True)
        copy = sqlite3.connect(target)
        try:
            with self._translated():
                self.conn.backup(copy)
        finally:
            copy.close()
        return target

    def close(self) -> None:
        self.conn.close()


class PostgresJournalDB:
    """A PostgreSQL database (psycopg 3), shared by the writing server and its replicas."""

    blob = "BYTEA"

    def __init__(self, url: str, writer: bool):
        import psycopg

        self.psycopg, self.url, self.writer = psycopg, url, writer
        self.name = redacted(url)  # what messages call it
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
        except self.psycopg.errors.DiskFull as e:
            raise JournalFullError(f"the journal database {redacted(self.url)} cannot grow ({_first_line(e)}): {FULL_ADVICE}") from None
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

    def integrity(self, full: bool) -> list[str]:
        """PostgreSQL checks its own pages as it reads them; the journal's hashes cover the rest."""
        return []

    def backup(self, dest: Path) -> Path:
        """The documented route: `pg_dump --format=custom`, a consistent snapshot of the live database
        (restore: `createdb NEW && pg_restore --dbname=URL/NEW DEST`)."""
        if dest.exists():
            raise StateConflictError(f"{dest} already exists: give a new file for the backup")
        dest.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([pg_tool("pg_dump"), "--format=custom", f"--file={dest}", f"--dbname={self.url}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            dest.unlink(missing_ok=True)
            raise JournalUnavailableError(f"pg_dump of {redacted(self.url)} failed: {_first_line(RuntimeError(done.stderr))}")
        return dest

    def close(self) -> None:
        for conn in (self.conn, self._listener):
            if conn is not None:
                conn.close()


def pg_tool(name: str) -> str:
    """A PostgreSQL client program: on PATH, else the newest of Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
                                                   reverse=True)), None)
    if found is None:
        raise JournalUnavailableError(f"{name} is not installed: install PostgreSQL's client programs (Debian: postgresql-client)")
    return found


def open_database(location: str | Path, writer: bool = True, create: bool = True):
    """The journal's database at `location`: a directory (SQLite) or a postgresql:// URL."""
    return PostgresJournalDB(str(location), writer) if is_url(location) else SQLiteJournalDB(Path(location), create)
