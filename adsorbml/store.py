"""Persistent, resumable store of an AdsorbML run: one SQLite file (ase.db) per output directory.

Layout of ``<out_dir>/adsorbml.db`` (an ordinary ase.db; browse it with ``ase db``):

* one row per (``stage``, ``system_id``, ``config_id``); every stage writes its rows through
  :meth:`RunStore.write` / :meth:`RunStore.write_many`, which check for an existing row and
  insert in **one SQLite transaction**, so a row is either fully there or not at all and is
  never written twice;
* searchable scalars in ``key_value_pairs``: ``stage``, ``system_id``, ``config_id``,
  ``run_id`` (which invocation of ``adsorbml run`` wrote it) and per stage e.g.
  ``converged``, ``nsteps``, ``ml_energy``, ``anomaly`` (``"ok"`` or the reasons);
* arrays and provenance in ``data`` (placement site and rotation, slab info, ...);
* ``metadata``: ``{"schema_version": 1, "fingerprint": {...}, "fingerprint_sha256": "...",
  "config": {...}, "runs": [...]}`` (``fingerprint``: the settings that determine the results,
  see :meth:`RunStore.begin_run`);
* one extra table, ``adsorbml_index`` (:mod:`adsorbml.row_index`): (stage, system_id,
  config_id) → row id, written in the same transaction as each row.

Stages: :data:`STAGES`; the rows each stage writes: :mod:`adsorbml.records`.

Crash safety (``kill -9``) and group commit: relaxations are written one by one from
``relax_batch``'s ``on_result`` callback as soon as each finishes. :meth:`RunStore.write` is
atomic (existence check + row + index entry; a half-written row never exists) and is
committed by a **group commit**: at the latest when 50 rows are pending or 0.5 s after the
write (a timer thread commits a quiet batch; ``batch_rows`` / ``batch_seconds``), and before
any metadata write, :meth:`~RunStore.flush`, :meth:`~RunStore.close`, another ``RunStore``
of the same file opened in this process, and interpreter exit. So a ``kill -9`` loses at
most the last 0.5 s / 50 results, which a resumed run simply redoes; everything committed
is consistent. Events (:meth:`~RunStore.log_event`) logged while rows are pending are
written right after those rows are committed, so ``events.jsonl`` never reports a finished
result the store lost. ``batch_rows=1`` commits every write before it returns.
The file is in SQLite's WAL journal mode with ``synchronous=NORMAL``: a commit appends to
``adsorbml.db-wal`` without an fsync; this survives a killed process completely, and an
operating-system crash or power loss can drop the last commits but not corrupt the file.
``RunStore(..., journal_mode="delete")`` keeps the classic rollback journal (for network file
systems, where WAL is not supported). New files are created without ase.db's optional
key-value indexes (``create_indices=False``; each per-row commit would rewrite ~40 index
pages; ``ase db`` queries still work, by scanning). Throughput: ``benchmarks/adsorbml_store.py``.
ase.db's own lock *file* is disabled (``use_lock_file=False``): a killed process would leave
it behind and the next run would wait forever; SQLite's locking is enough for the single
writer (plus any number of readers) this store is designed for.
"""

from __future__ import annotations

import atexit
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.db import connect
from ase.db.row import AtomsRow

from adsorbml import row_index
from adsorbml.asedb_rows import ASE_DB_VERSION, delete_row, insert_row, key_value
from adsorbml.errors import AdsorbMLError
from adsorbml.events import EventLog

__all__ = ["DB_NAME", "SCHEMA_VERSION", "STAGES", "RunStore", "StoreError"]

SCHEMA_VERSION = 1
DB_NAME = "adsorbml.db"
STAGES: tuple[str, ...] = ("slab", "slab_ml", "slab_gt", "placement", "ml", "dft_sp", "gt")

_OPEN: weakref.WeakSet[RunStore] = weakref.WeakSet()  # this process's stores (see RunStore.__init__)


@atexit.register
def _flush_all() -> None:
    for st in list(_OPEN):
        try:
            st.flush()
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit
            pass


class StoreError(AdsorbMLError):
    """The output directory holds an incompatible store (other schema or other settings)."""


class RunStore:
    """The ase.db store of one run directory.

    Parameters
    ----------
    directory:
        Output directory (created if missing); the database is ``<directory>/adsorbml.db``.
    create:
        If False, a missing database is an error (for commands that read a finished run).
    batch_rows, batch_seconds:
        Group commit of :meth:`write`: a row is committed at the latest when ``batch_rows``
        rows are pending or ``batch_seconds`` after it was written (a timer thread commits a
        quiet batch), and whenever the store writes metadata, reads with ase.db, closes or the
        interpreter exits. ``batch_rows=1``: every write commits before it returns.
    journal_mode:
        SQLite journal mode set on the file (``"wal"``; ``"delete"`` for network file systems).
    """

    def __init__(self, directory: str | os.PathLike, create: bool = True, *, batch_rows: int = 50,
                 batch_seconds: float = 0.5, journal_mode: str = "wal") -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no AdsorbML store {self.path} (run `adsorbml run` first)")
            self.directory.mkdir(parents=True, exist_ok=True)
        for other in list(_OPEN):  # another store of this file in this process: its rows first
            if other.path == self.path:
                other.flush()
        self._db = connect(str(self.path), type="db", use_lock_file=False, create_indices=False)
        with self._db.managed_connection():  # creates ase.db's tables in a new file
            pass
        md = self.metadata
        if md and md.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema_version {md.get('schema_version')!r}; this version reads "
                f"{SCHEMA_VERSION}. Use a new output directory."
            )
        # one connection for this store's writes and index lookups, in autocommit mode: every
        # transaction is an explicit BEGIN IMMEDIATE ... COMMIT (see transaction())
        self._con = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._depth = 0  # nesting of transaction()
        self._pending = 0  # rows written but not committed
        self._pending_since = 0.0
        self._log = EventLog(self.directory / "events.jsonl")
        self._timer: threading.Timer | None = None
        self.batch_rows, self.batch_seconds = max(1, int(batch_rows)), float(batch_seconds)
        try:
            if journal_mode:
                self._con.execute(f"PRAGMA journal_mode={journal_mode}")
            self._con.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError:  # another process holds the file: keep its journal mode
            pass
        self._fast = self._db.version == ASE_DB_VERSION
        ext = [r[0] for r in self._con.execute("SELECT value FROM information WHERE name = 'external_table_name'")]
        if not ext:  # ase.db would open a connection per row read just to learn there are none
            self._db._get_external_table_names = lambda db_con=None: []
        with self.transaction():
            row_index.ensure(self._con)
        _OPEN.add(self)

    def close(self) -> None:
        """Commit what is pending and close the write connection (also done when the object is
        garbage-collected)."""
        if getattr(self, "_con", None) is None:
            return
        with self._lock:
            self.flush()
            self._con.close()
            self._con = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110
            pass

    # ------------------------------------------------------------------ metadata

    @property
    def metadata(self) -> dict:
        """``{"schema_version", "config", "runs"}`` (empty dict for a new store); read from the
        file each time (ase.db caches it per connection object, which would go stale when
        another process or RunStore writes)."""
        return dict(connect(str(self.path), type="db", use_lock_file=False).metadata)

    def _set_metadata(self, md: Mapping[str, Any]) -> None:
        self.flush()  # ase.db writes through its own connection, which waits for ours
        self._db.metadata = json.loads(json.dumps(md))  # plain JSON types only

    @property
    def config(self) -> dict | None:
        """The run configuration this store was created with (None for a new store)."""
        return self.metadata.get("config")

    def begin_run(self, config: Mapping[str, Any], fingerprint: Mapping[str, Any] | None = None) -> int:
        """Register one invocation of a run; returns its ``run_id`` (1, 2, ...).

        ``fingerprint`` is the part of the configuration that determines the results (an
        allow-list, e.g. :meth:`adsorbml.workflow.RunConfig.fingerprint`; default: all of
        ``config``); a store created with a different fingerprint raises :class:`StoreError`
        naming each differing key with its stored and current value (resuming would mix
        incompatible results), see :func:`eqv2_calc.resume.check_settings`. ``config`` is
        recorded as given.
        """
        from eqv2_calc.resume import check_settings, settings_sha256

        fp = json.loads(json.dumps(dict(fingerprint if fingerprint is not None else config)))
        md = self.metadata
        if md:
            check_settings(md.get("fingerprint") or {}, fp, where=str(self.directory),
                           hint="use a new output directory (--out)", error=StoreError)
        else:
            md = {"schema_version": SCHEMA_VERSION, "fingerprint": fp, "fingerprint_sha256": settings_sha256(fp),
                  "runs": []}
        md["config"] = json.loads(json.dumps(dict(config)))
        runs = list(md.get("runs", []))
        run_id = len(runs) + 1
        runs.append({"run_id": run_id, "started": time.time()})
        md["runs"] = runs
        self._set_metadata(md)
        return run_id

    def update_run(self, run_id: int, **values: Any) -> None:
        """Add or accumulate (numbers are summed) values in this run's metadata entry."""
        md = self.metadata
        for entry in md.get("runs", []):
            if entry.get("run_id") == run_id:
                for k, v in values.items():
                    if isinstance(v, (int, float)) and isinstance(entry.get(k), (int, float)):
                        entry[k] = entry[k] + v
                    else:
                        entry[k] = v
        self._set_metadata(md)

    # ------------------------------------------------------------------ event log

    @property
    def events_path(self) -> Path:
        """``<directory>/events.jsonl``: the audit log of started/finished work (:mod:`adsorbml.events`)."""
        return self._log.path

    def log_event(self, **event: Any) -> None:
        """Append one event to :attr:`events_path`. While rows are pending (group commit) the
        event waits for them: it is never on disk before the rows written ahead of it."""
        with self._lock:
            self._log.add(event, hold=bool(self._pending))

    def events(self) -> list[dict]:
        """All events of :attr:`events_path`."""
        self.flush()
        return self._log.read()

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _check_stage(stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")

    def _begin(self) -> None:
        if not self._con.in_transaction:
            self._con.execute("BEGIN IMMEDIATE")

    def flush(self) -> None:
        """Commit the pending rows (then write the events held back for them). Inside
        :meth:`transaction` this does nothing; the block commits when it exits."""
        with self._lock:
            if self._depth or self._con is None:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._con.in_transaction:
                try:
                    self._con.execute("COMMIT")
                except BaseException:
                    if self._con.in_transaction:
                        self._con.execute("ROLLBACK")
                    self._pending = 0
                    self._log.drop_held()
                    raise
            self._pending = 0
            self._log.write_held()

    def _after_write(self, written: bool) -> None:
        """Group commit: commit now, or make sure the timer will."""
        if self._depth:
            return
        if written and not self._pending:
            self._pending_since = time.monotonic()
        self._pending += written
        if not self._pending or self._pending >= self.batch_rows or \
                time.monotonic() - self._pending_since >= self.batch_seconds:
            self.flush()
        elif self._timer is None:
            self._timer = threading.Timer(self.batch_seconds, self._on_timer)  # not a daemon: exit waits for it
            self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._pending and self._con is not None:
                if self._depth:  # a transaction() block is open: it commits at its end
                    return
                self.flush()

    @contextmanager
    def transaction(self) -> Iterator[RunStore]:
        """Group writes into one all-or-nothing unit: committed (with anything pending) when the
        outermost ``with`` exits, rolled back if it raises (rows written before the block are
        kept). Nested blocks are savepoints of the outer one."""
        with self._lock:
            self._begin()
            name = f"adsorbml_txn{self._depth}"
            self._con.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                self._con.execute(f"ROLLBACK TO {name}")
                self._con.execute(f"RELEASE {name}")
                if not self._depth and not self._pending:
                    self._con.execute("ROLLBACK")
                raise
            self._depth -= 1
            self._con.execute(f"RELEASE {name}")
            if not self._depth:
                self.flush()

    def _find(self, stage: str, system_id: str, config_id: str) -> int | None:
        return row_index.find(self._con, stage, system_id, config_id)

    def _insert(self, stage: str, system_id: str, config_id: str, atoms: Atoms,
                key_value_pairs: Mapping[str, Any] | None, data: Mapping[str, Any] | None) -> tuple[int, bool]:
        """Existence check + insert, inside the caller's transaction."""
        self._check_stage(stage)
        sid, cid = str(system_id), str(config_id)
        existing = self._find(stage, sid, cid)
        if existing is not None:
            return existing, False
        kvp = {k: key_value(v) for k, v in (key_value_pairs or {}).items() if v is not None}
        kvp.update(stage=stage, system_id=sid, config_id=cid)
        if self._fast:
            rid = insert_row(self._con, atoms, kvp, dict(data or {}))
        else:  # another ase.db file format: let ase.db write it, through this transaction
            self._db.connection, self._db.change_count = self._con, 0
            try:
                rid = self._db.write(atoms, key_value_pairs=kvp, data=dict(data or {}))
            finally:
                self._db.connection = None
        row_index.add(self._con, stage, sid, cid, rid)
        return rid, True

    def write(
        self,
        stage: str,
        system_id: str,
        config_id: str,
        atoms: Atoms,
        key_value_pairs: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool]:
        """Insert the row (stage, system_id, config_id) unless it exists (check and insert are
        atomic), committed by the group commit (see the class docstring: within
        ``batch_seconds`` or ``batch_rows`` rows; call :meth:`flush` to commit now).

        Returns ``(row id, written)``; ``written`` is False if the row was already there (it
        is then left unchanged: a finished result is never overwritten).
        """
        with self._lock:
            self._begin()
            self._con.execute("SAVEPOINT adsorbml_write")
            try:
                rid, written = self._insert(stage, system_id, config_id, atoms, key_value_pairs, data)
            except BaseException:
                self._con.execute("ROLLBACK TO adsorbml_write")
                self._con.execute("RELEASE adsorbml_write")
                if not self._depth and not self._pending:
                    self._con.execute("ROLLBACK")
                raise
            self._con.execute("RELEASE adsorbml_write")
            self._after_write(written)
            return rid, written

    def replace(
        self,
        stage: str,
        system_id: str,
        config_id: str,
        atoms: Atoms,
        key_value_pairs: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> int:
        """Write the row (stage, system_id, config_id), deleting an existing one in the same
        transaction. Only for rows that record a failure to be retried (a failed DFT single
        point); finished results go through :meth:`write`, which never overwrites. Returns the
        new row id."""
        with self.transaction():
            old = self._find(stage, str(system_id), str(config_id))
            if old is not None:
                delete_row(self._con, old)  # the trigger drops the index entry
            return self._insert(stage, system_id, config_id, atoms, key_value_pairs, data)[0]

    def write_many(self, rows: list[tuple[str, str, str, Atoms, Mapping[str, Any], Mapping[str, Any]]]) -> int:
        """Insert several rows ``(stage, system_id, config_id, atoms, kvp, data)`` in one
        transaction (all or nothing); rows that already exist are skipped. Returns the number
        written."""
        with self.transaction():
            return sum(self._insert(*row)[1] for row in rows)

    def _to_row(self, values: tuple) -> AtomsRow:
        return self._db._convert_tuple_to_row(values)

    def _rows_where(self, where: str, args: tuple) -> Iterator[AtomsRow]:
        with self._lock:
            rows = row_index.select_rows(self._con, where, args)
        for values in rows:
            yield self._to_row(values)

    def get(self, stage: str, system_id: str, config_id: str) -> AtomsRow | None:
        """The row, or None if that stage has not finished for it."""
        self._check_stage(stage)
        for row in self._rows_where("stage = ? AND system_id = ? AND config_id = ?",
                                    (stage, str(system_id), str(config_id))):
            return row
        return None

    def rows(self, stage: str, system_id: str | None = None) -> Iterator[AtomsRow]:
        """All rows of a stage (optionally of one system), in insertion order."""
        self._check_stage(stage)
        if system_id is None:
            yield from self._rows_where("stage = ?", (stage,))
        else:
            yield from self._rows_where("stage = ? AND system_id = ?", (stage, str(system_id)))

    def done(self, stage: str) -> set[tuple[str, str]]:
        """``{(system_id, config_id)}`` of the finished rows of a stage (from the index: one
        query, no atoms read)."""
        self._check_stage(stage)
        with self._lock:
            return row_index.done(self._con, stage)

    def count(self, stage: str, **selection: Any) -> int:
        """Number of rows of a stage matching extra key=value selections (e.g. ``run_id=1``)."""
        self._check_stage(stage)
        if set(selection) <= {"system_id", "config_id"}:
            with self._lock:
                return row_index.count(self._con, stage, **{k: str(v) for k, v in selection.items()})
        self.flush()  # ase.db reads through its own connection
        return self._db.count(stage=stage, **selection)
