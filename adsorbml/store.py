"""Persistent, resumable store of an AdsorbML run: one SQLite file (ase.db) per output directory.

Layout of ``<out_dir>/adsorbml.db`` (an ordinary ase.db; browse it with ``ase db``):

* one row per (``stage``, ``system_id``, ``config_id``); every stage writes its rows through
  :meth:`RunStore.write`, which checks for an existing row and inserts in **one SQLite
  transaction**, so a row is either fully there or not at all and is never written twice;
* searchable scalars in ``key_value_pairs``: ``stage``, ``system_id``, ``config_id``,
  ``run_id`` (which invocation of ``adsorbml run`` wrote it) and per stage e.g.
  ``converged``, ``nsteps``, ``ml_energy``, ``anomaly`` (``"ok"`` or the reasons);
* arrays and provenance in ``data`` (placement site and rotation, slab info, ...);
* ``metadata``: ``{"schema_version": 1, "fingerprint": {...}, "fingerprint_sha256": "...",
  "config": {...}, "runs": [...]}`` (``fingerprint``: the settings that determine the results,
  see :meth:`RunStore.begin_run`).

Stages (see :data:`STAGES`)::

    slab         input clean slab            (system_id = slab_id, config_id = "slab")
    slab_ml      clean slab relaxed with ML   (same keys)
    slab_gt      clean slab relaxed with DFT  (same keys; ground-truth runs only)
    placement    initial adslab               (system_id, config_id = "heur0", "rand3", ...)
    ml           ML-relaxed placement         (+ converged, nsteps, ml_energy, anomaly, ...)
    dft_sp       DFT single point on an ML-relaxed top-k placement (+ dft_energy, ionic_steps)
    gt           DFT-relaxed placement, the ground truth (+ gt_energy, nsteps, anomaly)

Crash safety: relaxations are written one by one from ``relax_batch``'s ``on_result``
callback as soon as each finishes; SQLite's journal rolls back a transaction interrupted by
``kill -9``. ase.db's own lock *file* is disabled (``use_lock_file=False``): a killed process
would leave it behind and the next run would wait forever; SQLite's locking is enough for the
single writer (plus any number of readers) this store is designed for.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from ase import Atoms
from ase.db import connect
from ase.db.row import AtomsRow

from adsorbml.errors import AdsorbMLError

__all__ = ["RunStore", "StoreError", "SCHEMA_VERSION", "DB_NAME", "STAGES"]

SCHEMA_VERSION = 1
DB_NAME = "adsorbml.db"
STAGES: tuple[str, ...] = ("slab", "slab_ml", "slab_gt", "placement", "ml", "dft_sp", "gt")


class StoreError(AdsorbMLError):
    """The output directory holds an incompatible store (other schema or other settings)."""


def _kvp_value(v: Any) -> Any:
    """ase.db accepts bool/int/float/str key values; numpy scalars become Python ones."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, str):
        return v
    raise TypeError(f"key value {v!r} must be bool, int, float or str")


class RunStore:
    """The ase.db store of one run directory.

    Parameters
    ----------
    directory:
        Output directory (created if missing); the database is ``<directory>/adsorbml.db``.
    create:
        If False, a missing database is an error (for commands that read a finished run).
    """

    def __init__(self, directory: str | os.PathLike, create: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no AdsorbML store {self.path} (run `adsorbml run` first)")
            self.directory.mkdir(parents=True, exist_ok=True)
        self._db = connect(str(self.path), type="db", use_lock_file=False)
        md = self.metadata
        if md and md.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema_version {md.get('schema_version')!r}; this version reads "
                f"{SCHEMA_VERSION}. Use a new output directory."
            )

    # ------------------------------------------------------------------ metadata

    @property
    def metadata(self) -> dict:
        """``{"schema_version", "config", "runs"}`` (empty dict for a new store); read from the
        file each time (ase.db caches it per connection object, which would go stale when
        another process or RunStore writes)."""
        return dict(connect(str(self.path), type="db", use_lock_file=False).metadata)

    def _set_metadata(self, md: Mapping[str, Any]) -> None:
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
        """``<directory>/events.jsonl``: an append-only log of started/finished work."""
        return self.directory / "events.jsonl"

    def log_event(self, **event: Any) -> None:
        """Append one JSON line (flushed and fsync'ed) to :attr:`events_path`.

        The log is an audit trail independent of the database (e.g. which relaxations each
        run started and finished); the database stays the source of truth for results.
        """
        event.setdefault("time", time.time())
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict]:
        """All events of :attr:`events_path` (a torn last line from a crash is skipped)."""
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _check_stage(stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")

    def write(
        self,
        stage: str,
        system_id: str,
        config_id: str,
        atoms: Atoms,
        key_value_pairs: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool]:
        """Insert the row (stage, system_id, config_id) unless it exists, in one transaction.

        Returns ``(row id, written)``; ``written`` is False if the row was already there (it
        is then left unchanged: a finished result is never overwritten).
        """
        self._check_stage(stage)
        kvp = {k: _kvp_value(v) for k, v in (key_value_pairs or {}).items() if v is not None}
        kvp.update(stage=stage, system_id=str(system_id), config_id=str(config_id))
        with self._db as db:  # one connection, committed at exit, rolled back on error
            existing = [r.id for r in db.select(stage=stage, system_id=str(system_id), config_id=str(config_id))]
            if existing:
                return existing[0], False
            rid = db.write(atoms, key_value_pairs=kvp, data=dict(data or {}))
        return rid, True

    def write_many(self, rows: list[tuple[str, str, str, Atoms, Mapping[str, Any], Mapping[str, Any]]]) -> int:
        """Insert several rows ``(stage, system_id, config_id, atoms, kvp, data)`` in one
        transaction (all or nothing); rows that already exist are skipped. Returns the number
        written."""
        n = 0
        with self._db as db:
            for stage, sid, cid, atoms, kvp, data in rows:
                self._check_stage(stage)
                if db.count(stage=stage, system_id=str(sid), config_id=str(cid)):
                    continue
                k = {kk: _kvp_value(v) for kk, v in (kvp or {}).items() if v is not None}
                k.update(stage=stage, system_id=str(sid), config_id=str(cid))
                db.write(atoms, key_value_pairs=k, data=dict(data or {}))
                n += 1
        return n

    def get(self, stage: str, system_id: str, config_id: str) -> AtomsRow | None:
        """The row, or None if that stage has not finished for it."""
        self._check_stage(stage)
        for row in self._db.select(stage=stage, system_id=str(system_id), config_id=str(config_id)):
            return row
        return None

    def rows(self, stage: str, system_id: str | None = None) -> Iterator[AtomsRow]:
        """All rows of a stage (optionally of one system), in insertion order."""
        self._check_stage(stage)
        kw: dict[str, Any] = {"stage": stage}
        if system_id is not None:
            kw["system_id"] = str(system_id)
        yield from self._db.select(sort="id", **kw)

    def done(self, stage: str) -> set[tuple[str, str]]:
        """``{(system_id, config_id)}`` of the finished rows of a stage."""
        return {(r.system_id, r.config_id) for r in self.rows(stage)}

    def count(self, stage: str, **selection: Any) -> int:
        """Number of rows of a stage matching extra key=value selections (e.g. ``run_id=1``)."""
        self._check_stage(stage)
        return self._db.count(stage=stage, **selection)
