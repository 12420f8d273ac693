"""The ``adsorbml_index`` table of a run's ase.db file: (stage, system_id, config_id) → row id.

:class:`adsorbml.store.RunStore` writes an entry in the same transaction as each row (and a
trigger drops it when ase.db deletes the row). It makes the existence check, ``get``, ``done``
and per-system ``rows`` index lookups instead of scans over ase.db's key-value tables, and its
primary key makes a duplicate row impossible even with two writers. ase.db ignores the table;
a store written without it (older versions) is indexed once when opened (:func:`ensure`).
All functions run on an open ``sqlite3`` connection, inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3

__all__ = ["add", "count", "done", "ensure", "find", "select_rows"]

_DDL = (
    """CREATE TABLE IF NOT EXISTS adsorbml_index (
    stage TEXT NOT NULL, system_id TEXT NOT NULL, config_id TEXT NOT NULL, id INTEGER NOT NULL UNIQUE,
    PRIMARY KEY (stage, system_id, config_id))""",
    """CREATE TRIGGER IF NOT EXISTS adsorbml_index_delete AFTER DELETE ON systems
    BEGIN DELETE FROM adsorbml_index WHERE id = old.id; END""",
)
# (stage, system_id, config_id) of every ase.db row, pivoted from ase.db's text key-value table
_REBUILD = """INSERT OR IGNORE INTO adsorbml_index (stage, system_id, config_id, id)
SELECT st, sy, co, id FROM (
  SELECT id, MAX(CASE WHEN key = 'stage' THEN value END) AS st, MAX(CASE WHEN key = 'system_id' THEN value END) AS sy,
         MAX(CASE WHEN key = 'config_id' THEN value END) AS co
  FROM text_key_values WHERE key IN ('stage', 'system_id', 'config_id') GROUP BY id)
WHERE st IS NOT NULL AND sy IS NOT NULL AND co IS NOT NULL ORDER BY id"""


def ensure(con: sqlite3.Connection) -> None:
    """Create the table and its trigger; index the rows of an older store that has none."""
    for ddl in _DDL:
        con.execute(ddl)
    n_index = con.execute("SELECT COUNT(*) FROM adsorbml_index").fetchone()[0]
    if n_index != con.execute("SELECT COUNT(*) FROM systems").fetchone()[0]:
        con.execute(_REBUILD)  # a store from an older version (or foreign rows)


def find(con: sqlite3.Connection, stage: str, system_id: str, config_id: str) -> int | None:
    """The row id of (stage, system_id, config_id), or None."""
    r = con.execute("SELECT id FROM adsorbml_index WHERE stage = ? AND system_id = ? AND config_id = ?",
                    (stage, system_id, config_id)).fetchone()
    return None if r is None else r[0]


def add(con: sqlite3.Connection, stage: str, system_id: str, config_id: str, row_id: int) -> None:
    con.execute("INSERT INTO adsorbml_index (stage, system_id, config_id, id) VALUES (?, ?, ?, ?)",
                (stage, system_id, config_id, row_id))


def done(con: sqlite3.Connection, stage: str) -> set[tuple[str, str]]:
    """``{(system_id, config_id)}`` of a stage (one query, no atoms read)."""
    return set(con.execute("SELECT system_id, config_id FROM adsorbml_index WHERE stage = ?", (stage,)))


def count(con: sqlite3.Connection, stage: str, **selection: str) -> int:
    """Number of entries of ``stage`` with the given ``system_id`` / ``config_id``."""
    where = " AND ".join(["stage = ?"] + [f"{k} = ?" for k in selection])
    return con.execute(f"SELECT COUNT(*) FROM adsorbml_index WHERE {where}", (stage, *selection.values())).fetchone()[0]


def select_rows(con: sqlite3.Connection, where: str, args: tuple) -> list[tuple]:
    """The ase.db ``systems`` rows whose index entries match ``where`` (SQL on the columns
    stage, system_id, config_id), in insertion order, fetched at once (no cursor stays open)."""
    return con.execute(f"SELECT systems.* FROM adsorbml_index JOIN systems ON systems.id = adsorbml_index.id "
                       f"WHERE {where} ORDER BY adsorbml_index.id", args).fetchall()
