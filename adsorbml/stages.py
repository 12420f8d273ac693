"""The stages of an AdsorbML run, each reading and writing the run's store.

:func:`adsorbml.workflow.run_workflow` calls them in order; every stage skips what the store
already holds, so calling them again resumes. Row layouts: :mod:`adsorbml.records`.

1. :func:`stage_slabs` — slab sources → ``slab`` rows (stored rows win on resume);
2. :func:`stage_placements` — seeded placements per system → ``placement`` rows, one
   transaction per system;
3. :func:`stage_relax` — a relaxation level (ML: ``slab_ml`` + ``ml``; ground truth: ``slab_gt``
   + ``gt``): the clean slabs, then every placement with the batched relaxer, each result written
   with its anomaly verdict (against the clean slab relaxed at the same level) as it finishes;
4. :func:`stage_single_points` — DFT single points on the ML-relaxed clean slabs (without ground
   truth: the DFT clean-slab energy of E_ads(ML+DFT)) and the top k valid placements per system.
   A failure is recorded with its message and retried by the next run, up to
   :data:`MAX_DFT_ATTEMPTS` attempts in all.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ase import Atoms

from adsorbml.adsorbates import as_adsorbate
from adsorbml.anomalies import detect_anomalies
from adsorbml.config import RunConfig
from adsorbml.errors import InputError
from adsorbml.inputs import SlabRecord, load_slab, slabs_from_bulk
from adsorbml.placements import Placement, generate_placements
from adsorbml.ranking import rank_valid
from adsorbml.records import (
    dft_failed,
    ml_result,
    placement_from_row,
    placement_row,
    relaxation_values,
    single_point_values,
    slab_from_row,
    slab_row,
)
from adsorbml.single_points import single_point
from adsorbml.store import RunStore

__all__ = [
    "MAX_DFT_ATTEMPTS",
    "Level",
    "RunContext",
    "System",
    "build_slabs",
    "ground_truth_level",
    "iter_systems",
    "ml_level",
    "stage_placements",
    "stage_relax",
    "stage_single_points",
    "stage_slabs",
    "system_id_for",
]

MAX_DFT_ATTEMPTS = 3
"""Attempts per DFT single point over all runs of a directory (a failure is retried on resume)."""

Log = Callable[[str], None]


@dataclass
class RunContext:
    """What every stage needs: the store, this invocation's run id, the settings, and where the
    relaxations run (``ray``: :class:`eqv2_calc.distributed.RayOptions`; None = this process).
    Execution settings are not part of the run's fingerprint: either can resume the other."""

    store: RunStore
    run_id: int
    cfg: RunConfig
    progress: bool = True
    log: Log = print
    ray: Any = None


@dataclass
class System:
    """One slab × adsorbate system and its placements."""

    system_id: str
    slab_id: str
    adsorbate: str
    placements: list[Placement]


def system_id_for(slab_id: str, adsorbate: str) -> str:
    """``<slab_id>_<adsorbate without *>``, e.g. ``Pt_111_0.167_CO``."""
    return f"{slab_id}_{adsorbate.lstrip('*')}"


def build_slabs(cfg: RunConfig) -> list[SlabRecord]:
    """The prepared slabs of ``cfg.slabs`` (files, bulk + Miller index, in-memory records)."""
    from ase.build import bulk as ase_bulk

    out: list[SlabRecord] = []
    for spec in cfg.slabs:
        if spec.record is not None:
            out.append(spec.record)
        elif spec.structure_sha256 is not None:
            raise InputError(f"slab {spec.slab_id!r} was given in memory (SlabSpec.of / run_system): pass the same "
                             "SlabRecord again to resume this run")
        elif spec.file is not None:
            out.append(load_slab(spec.file, spec.slab_id))
        else:
            src = spec.bulk
            if not os.path.exists(src):
                try:
                    src = ase_bulk(spec.bulk)
                except (KeyError, ValueError, RuntimeError) as e:
                    raise InputError(f"bulk {spec.bulk!r} is neither a file nor an element ase.build.bulk knows: {e}") from None
            out.extend(slabs_from_bulk(src, spec.miller, max_slabs=spec.max_slabs))
    ids = [s.slab_id for s in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"duplicate slab ids {dup}; give distinct 'slab_id's")
    return out


def stage_slabs(ctx: RunContext) -> dict[str, SlabRecord]:
    """``slab`` rows; a resumed run uses exactly the stored structures. Returns slab_id → slab."""
    slabs: dict[str, SlabRecord] = {}
    new_rows = []
    for rec in build_slabs(ctx.cfg):
        row = ctx.store.get("slab", rec.slab_id, "slab")
        if row is None:
            new_rows.append(slab_row(rec, ctx.run_id))
            slabs[rec.slab_id] = rec
        else:
            slabs[rec.slab_id] = slab_from_row(row)
    ctx.store.write_many(new_rows)
    return slabs


def iter_systems(ctx: RunContext, slabs: dict[str, SlabRecord], into: list[System] | None = None
                 ) -> Iterator[System]:
    """Every slab × adsorbate with its placements, one system at a time: generated (seeded) and
    stored in one transaction the first time, read from the store after that. ``into`` collects
    the systems as they are produced (for a lazy consumer such as the Ray relaxation stage)."""
    cfg, store = ctx.cfg, ctx.store
    pairs = [(slab_id, as_adsorbate(a).name) for slab_id in slabs for a in cfg.adsorbates]
    ids = [system_id_for(slab_id, name) for slab_id, name in pairs]
    if len(set(ids)) != len(ids):
        raise InputError("two systems share an id; use distinct slab ids / adsorbates")
    for (slab_id, name), sid in zip(pairs, ids):
        if store.count("placement", system_id=sid):
            pl = [placement_from_row(r) for r in store.rows("placement", sid)]
        else:
            pl = generate_placements(slabs[slab_id], name, num_random=cfg.num_random, heuristic=cfg.heuristic,
                                     seed=cfg.seed)
            store.write_many([placement_row(sid, slab_id, name, p, ctx.run_id) for p in pl])
        system = System(sid, slab_id, name, pl)
        if into is not None:
            into.append(system)
        yield system


def stage_placements(ctx: RunContext, slabs: dict[str, SlabRecord]) -> list[System]:
    """All systems of :func:`iter_systems` at once (with a progress bar)."""
    from tqdm.auto import tqdm

    total = len(slabs) * len(ctx.cfg.adsorbates)
    return list(tqdm(iter_systems(ctx, slabs), total=total, desc="placements", unit="system",
                     disable=not ctx.progress))


@dataclass(frozen=True)
class Level:
    """A level of theory's relaxation stages and settings."""

    slab_stage: str
    stage: str
    energy_key: str
    fmax: float
    steps: int
    name: str


def ml_level(cfg: RunConfig) -> Level:
    return Level("slab_ml", "ml", "ml_energy", cfg.fmax, cfg.steps, "ML relaxations")


def ground_truth_level(cfg: RunConfig) -> Level:
    return Level("slab_gt", "gt", "gt_energy", cfg.gt_fmax, cfg.gt_steps, "ground-truth (DFT) relaxations")


def _energy(r: Any) -> float | None:
    e = float(r.energy)
    return e if math.isfinite(e) else None


Item = tuple[str, str, Atoms]  # (system_id, config_id, structure)


def _relax_into_store(
    ctx: RunContext, stage: str, groups: Iterable[list[Item]], calc: Any, level: Level, *,
    progress: bool, values: Callable[[str, str, Any], dict],
) -> tuple[int, float]:
    """Relax the items of ``groups`` with relax_batch (or on Ray actors, drawing the groups lazily
    as the actors take work), writing each result to ``stage`` (key values from
    ``values(system_id, config_id, result)``) the moment it arrives, here in the driver: the only
    writer of the store. A ``start`` event is logged per group as it is taken. Returns (items
    relaxed, wall time s)."""
    store = ctx.store
    seen: list[Item] = []

    def structures() -> Iterator[Atoms]:
        for group in groups:
            store.log_event(event="start", stage=stage, run_id=ctx.run_id, items=[[s, c] for s, c, _ in group])
            for item in group:
                seen.append(item)
                yield item[2]

    def on_result(r: Any) -> None:
        sid, cid, _ = seen[r.index]
        kvp = dict(relaxation_values(r, ctx.run_id), **values(sid, cid, r))
        _, written = store.write(stage, sid, cid, r.atoms, kvp, {"initial_energy": float(r.initial_energy)})
        store.log_event(event="finish", stage=stage, run_id=ctx.run_id, system_id=sid, config_id=cid, written=written)

    t0 = time.perf_counter()
    settings = dict(fmax=level.fmax, steps=level.steps, max_atoms=ctx.cfg.max_atoms)
    if ctx.ray is None:
        from eqv2_calc.relax import relax_batch

        atoms = list(structures())
        if atoms:
            relax_batch(atoms, calc, progress=progress, on_result=on_result, **settings)
    else:
        from eqv2_calc.distributed import relax_on_ray

        _, stats = relax_on_ray(structures(), calc, ctx.ray, progress=progress, on_result=on_result,
                                keep_results=False, log=ctx.log, **settings)
        if seen:
            store.log_event(event="ray", stage=stage, run_id=ctx.run_id, actors=stats.actors_started,
                            nodes=len({a["node"] for a in stats.actor_info}), deaths=stats.actor_deaths,
                            resubmitted=stats.resubmitted, duplicates_ignored=stats.duplicates_ignored,
                            given_up=stats.given_up)
    return len(seen), time.perf_counter() - t0


def stage_relax(
    ctx: RunContext, calc: Any, level: Level, slabs: dict[str, SlabRecord], systems: Iterable[System],
) -> tuple[int, float]:
    """Relax the clean slabs (``level.slab_stage``), then every placement (``level.stage``) not in
    the store yet, each with its anomaly verdict. ``systems`` may be lazy (:func:`iter_systems`):
    on Ray, placements are then generated while the actors relax the earlier ones. Returns
    (placements relaxed, their wall time s)."""
    store = ctx.store
    done = store.done(level.stage)
    slab_pending = [(i, "slab", slabs[i].atoms) for i in slabs if store.get(level.slab_stage, i, "slab") is None]

    def slab_values(sid: str, cid: str, r: Any) -> dict:
        return {level.energy_key: _energy(r), "energy_ok": _energy(r) is not None}

    _relax_into_store(ctx, level.slab_stage, [slab_pending] if slab_pending else [], calc, level, progress=False,
                      values=slab_values)
    reference = {i: store.get(level.slab_stage, i, "slab").toatoms() for i in slabs}
    initial: dict[tuple[str, str], Atoms] = {}  # the pending placements' starting structures
    slab_of: dict[str, str] = {}

    def pending() -> Iterator[list[Item]]:
        for s in systems:
            slab_of[s.system_id] = s.slab_id
            group = [(s.system_id, p.config_id, p.atoms) for p in s.placements if (s.system_id, p.config_id) not in done]
            initial.update(((sid, cid), a) for sid, cid, a in group)
            if group:
                yield group

    def verdict(sid: str, cid: str, r: Any) -> dict:
        e = _energy(r)
        start = initial.pop((sid, cid))
        if r.failed or e is None:
            anomaly = f"relaxation_{r.reason}" if r.failed else "relaxation_non_finite"
        else:
            anomaly = detect_anomalies(start, r.atoms, reference[slab_of[sid]], ctx.cfg.checks).reason
        return {level.energy_key: e, "anomaly": anomaly}

    n, seconds = _relax_into_store(ctx, level.stage, pending(), calc, level, progress=ctx.progress, values=verdict)
    if n:
        ctx.log(f"{level.name}: {n} relaxed, {len(done)} were already in the store")
    return n, seconds if n else 0.0


def stage_single_points(
    ctx: RunContext, dft_calc: Any, slabs: dict[str, SlabRecord], systems: Sequence[System], *,
    continue_on_error: bool = False,
) -> tuple[int, bool]:
    """DFT single points on the ML-relaxed clean slabs (only without ground truth) and on the top
    k valid placements of every system, each written to ``dft_sp`` as it finishes. A failure is
    written with its message (``dft_error``, also to events.jsonl) and stops the stage unless
    ``continue_on_error``. Returns (number run, whether it stopped at an error)."""
    from tqdm.auto import tqdm

    store = ctx.store
    existing = {(r.system_id, r.config_id): r for r in store.rows("dft_sp")}

    def wanted(key: tuple[str, str]) -> bool:
        row = existing.get(key)
        return row is None or (dft_failed(row) and int(row.get("dft_attempts", 1)) < MAX_DFT_ATTEMPTS)

    todo: list[tuple[str, str, Atoms]] = []
    if not ctx.cfg.ground_truth:
        todo += [(i, "slab", store.get("slab_ml", i, "slab").toatoms()) for i in slabs if wanted((i, "slab"))]
    for s in systems:
        ranked = rank_valid([ml_result(r) for r in store.rows("ml", s.system_id)], ctx.cfg.k)
        todo += [(s.system_id, r.config_id, r.atoms) for r in ranked if wanted((s.system_id, r.config_id))]
    n = 0
    for sid, cid, atoms in tqdm(todo, desc="DFT single points", unit="sp", disable=not ctx.progress):
        d = single_point(atoms, dft_calc)
        previous = existing.get((sid, cid))
        attempts = 1 if previous is None else int(previous.get("dft_attempts", 1)) + 1
        kvp = single_point_values(d, ctx.run_id, attempts)
        structure = d.atoms if d.atoms is not None else atoms
        if previous is None:
            store.write("dft_sp", sid, cid, structure, kvp, {})
        else:  # a retry of a recorded failure
            store.replace("dft_sp", sid, cid, structure, kvp, {})
        n += 1
        if d.error is not None:
            store.log_event(event="dft_error", stage="dft_sp", run_id=ctx.run_id, system_id=sid, config_id=cid,
                            error=d.error, attempt=attempts)
            ctx.log(f"DFT single point {sid}/{cid} failed (attempt {attempts} of {MAX_DFT_ATTEMPTS}): {d.error}")
            if not continue_on_error:
                return n, True
    return n, False
