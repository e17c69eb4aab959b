"""Reading an Optuna SQLite study that a running sweep driver is writing, without touching it.

`optuna.load_study(storage=url)` creates the schema when it finds none, and two processes creating it at once (a
test's poll and the driver's `create_study`) race on Alembic's version row: "UNIQUE constraint failed:
alembic_version.version_num" ended the driver in CI. So a poll reads the file read-only with sqlite3."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def trial_states(db: Path, study: str) -> list[tuple[int, str]]:
    """(number, state name) of each trial of `study` in the SQLite file `db`; [] until the driver has created it."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return conn.execute("SELECT t.number, t.state FROM trials t JOIN studies s USING (study_id) "
                                "WHERE s.study_name = ? ORDER BY t.number", (study,)).fetchall()
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):  # the driver has created the file, not yet the schema
                return []
            raise
