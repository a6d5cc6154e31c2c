"""`mend journal check` and `mend journal backup DEST`: operations on the journal at `paths.journal`.

check: SQLite's integrity check of the file (indexes included) and every edit's and revision's hash
(`mend.journal_integrity`); prints each problem; exit 0 only when all is well (1: damaged, 2: no journal).
backup: an online, consistent copy while the server runs: SQLite's backup API into the new directory
DEST (serve it with paths.journal=DEST); PostgreSQL: `pg_dump --format=custom` into the file DEST
(restore: `createdb NEW && pg_restore --dbname=postgresql://.../NEW DEST`). The copy is checked.
"""

from __future__ import annotations

import argparse
import sys

from mend.errors import MendError


def run(argv: list[str], load_config) -> int:
    from mend.journal import backup_journal, check_journal
    from mend.journal_backends import is_url, redacted

    parser = argparse.ArgumentParser(prog="mend journal", description=__doc__.split("\n")[0],
                                     epilog="key=value arguments are config overrides, e.g. paths.journal=DIR_OR_URL")
    parser.add_argument("action", choices=["check", "backup"])
    parser.add_argument("dest", nargs="?", help="backup: a new directory (SQLite) or file (PostgreSQL)")
    args, overrides = parser.parse_known_args(argv)
    if args.dest and "=" in args.dest:
        overrides, args.dest = [args.dest, *overrides], None
    if unknown := [o for o in overrides if "=" not in o]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.action == "backup" and not args.dest:
        parser.error("backup needs DEST: a new directory (SQLite journal) or file (PostgreSQL journal)")
    location = str(load_config(overrides).paths.journal)
    try:
        if args.action == "backup":
            copy = backup_journal(location, args.dest)
            print(f"backed up {redacted(location)} -> {copy}")
            if is_url(location):
                return 0
            location = str(copy.parent)
        problems = check_journal(location)
    except MendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"damaged: {p}")
    print(f"{redacted(location)}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return 1 if problems else 0
