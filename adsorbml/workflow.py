"""The resumable AdsorbML run behind ``adsorbml run`` / ``adsorbml demo``.

Settings: :mod:`adsorbml.config` (:class:`RunConfig`, :class:`SlabSpec`, :func:`load_config`);
calculators: :mod:`adsorbml.calculators`; adsorption energies: :mod:`adsorbml.energies`;
output files: :mod:`adsorbml.outputs` (all re-exported here).

:func:`run_workflow` takes a :class:`RunConfig` (slabs × adsorbates, placement and relaxation
settings, calculators) and an output directory, and runs every stage through the ase.db store
of :mod:`adsorbml.store`:

1. slabs (files, or bulk + Miller index via pymatgen) → ``slab`` rows;
2. placements per system (seeded, so regenerating gives the same structures; they are also
   stored, in one transaction per system) → ``placement`` rows;
3. ML relaxation of each clean slab (the anomaly reference) → ``slab_ml``;
4. ML relaxation of every placement with the batched relaxer; each result is written with
   its anomaly verdict from the ``on_result`` callback as soon as it finishes → ``ml``;
5. DFT single points (any ASE calculator) on the top k valid placements → ``dft_sp``;
6. optional ground truth: DFT relaxation of the clean slab and of *every* placement
   (``slab_gt``, ``gt``), as for the OC20-Dense targets; cost = force calls.

Before any of these, the gas references of the run are fixed (:mod:`adsorbml.energies`:
``references`` "oc20" or "computed", the ML model's energy convention) and recorded in the
store's run config (``energy_scheme``). Without ground truth, step 5 also runs a DFT single
point on each ML-relaxed clean slab (``dft_sp`` row ``(slab_id, "slab")``): the DFT clean-slab
energy of E_ads(ML+DFT). A DFT calculator that raises is recorded with its message (``dft_sp``
row ``dft_error``, ``events.jsonl``) and stops the DFT work unless ``continue_on_dft_error``.

Run again with the same settings and it resumes: finished rows are skipped, never redone.
Outputs are rewritten from the store at the end of each run by :mod:`adsorbml.outputs`; all
energies in them are adsorption energies (eV)::

    adsorbml.db       the store            events.jsonl   started/finished work (audit log)
    results.json      OC20-Dense results   anomalies.json {system_id: {config_id: reason}}
    targets.json      OC20-Dense targets   compute.json   ground-truth cost (ground truth only)
    summary.json/.csv the lowest E_ads per system (placement, site, anomaly-free)
    energies.json     which energies the files carry (references, conventions, offsets)
    metrics.md        success/speedup table (ground truth only)
    plots/<system_id>.png
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms

from adsorbml.adsorbates import as_adsorbate
from adsorbml.anomalies import detect_anomalies
from adsorbml.calculators import make_dft_calculator, make_ml_calculator, shipped_model_available
from adsorbml.config import RunConfig, SlabSpec, load_config
from adsorbml.errors import InputError
from adsorbml.export import MLResult, export_top_k, rank_valid, write_vasp_inputs
from adsorbml.inputs import SlabRecord, load_slab, slabs_from_bulk
from adsorbml.outputs import collect_outputs, ml_result, plot_system
from adsorbml.placements import Placement, generate_placements
from adsorbml.single_points import single_point
from adsorbml.store import RunStore
from eqv2_calc.io import atomic_write_text

__all__ = [
    "SlabSpec",
    "RunConfig",
    "RunSummary",
    "load_config",
    "make_ml_calculator",
    "make_dft_calculator",
    "shipped_model_available",
    "run_workflow",
    "export_run",
    "collect_outputs",
    "plot_system",
]

Log = Callable[[str], None]



# --------------------------------------------------------------------------- systems


@dataclass
class _System:
    system_id: str
    slab_id: str
    adsorbate: str
    placements: list[Placement]


def system_id_for(slab_id: str, adsorbate: str) -> str:
    """``<slab_id>_<adsorbate without *>``, e.g. ``Pt_111_0.167_CO``."""
    return f"{slab_id}_{adsorbate.lstrip('*')}"


def _build_slabs(cfg: RunConfig) -> list[SlabRecord]:
    from ase.build import bulk as ase_bulk

    out: list[SlabRecord] = []
    for spec in cfg.slabs:
        if spec.file is not None:
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


def _slab_from_row(row: Any) -> SlabRecord:
    info = dict(row.data.get("info", {}))
    millers = info.get("millers")
    return SlabRecord(row.system_id, row.toatoms(), tuple(millers) if millers else None, info.get("shift"), info)


def _placement_from_row(row: Any) -> Placement:
    d = row.data
    return Placement(row.config_id, row.toatoms(), np.asarray(d["site"], float), str(d["site_kind"]),
                     int(d["binding_index"]), np.asarray(d["rotation"], float))


# --------------------------------------------------------------------------- the run


@dataclass
class RunSummary:
    """What a run produced (counts refer to this invocation unless stated)."""

    out_dir: Path
    run_id: int
    systems: list[str]
    n_placements: int
    ml_relaxed_now: int
    ml_skipped: int
    dft_now: int
    gt_relaxed_now: int
    ml_seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    table: str | None = None
    answers: list = field(default_factory=list)  # adsorbml.summary.SystemAnswer per system
    dft_errors: dict[str, str] = field(default_factory=dict)  # "<system_id>/<config_id>" → message
    dft_stopped: bool = False  # DFT work stopped at the first error (no continue_on_dft_error)


def _verdict(systems: Sequence[Any], slab_refs: dict, checks: Any, energy_key: str) -> Callable[[str, str, Any], dict]:
    """Row values for a finished relaxation: its energy (eV) under ``energy_key`` and the
    anomaly verdict against the relaxed clean slab of its system (same level of theory)."""
    initial = {(s.system_id, p.config_id): p.atoms for s in systems for p in s.placements}
    slab_of = {s.system_id: s.slab_id for s in systems}

    def verdict(sid: str, cid: str, r: Any) -> dict:
        e = float(r.energy)
        if r.failed or not math.isfinite(e):
            anomaly = f"relaxation_{r.reason}" if r.failed else "relaxation_non_finite"
        else:
            anomaly = detect_anomalies(initial[(sid, cid)], r.atoms, slab_refs[slab_of[sid]], checks).reason
        return {energy_key: e if math.isfinite(e) else None, "anomaly": anomaly}

    return verdict


def _relax_into_store(
    store: RunStore, run_id: int, stage: str, items: list[tuple[str, str, Atoms]], calc: Any, *,
    fmax: float, steps: int, max_atoms: int | None, progress: bool,
    verdict: Callable[[str, str, Any], dict] | None = None,
) -> float:
    """Relax ``items`` [(system_id, config_id, atoms)] with relax_batch, writing each result to
    ``stage`` the moment it finishes. Returns the wall time (s)."""
    from eqv2_calc.relax import relax_batch

    if not items:
        return 0.0
    store.log_event(event="start", stage=stage, run_id=run_id, items=[[s, c] for s, c, _ in items])

    def on_result(r: Any) -> None:
        sid, cid, _ = items[r.index]
        e = float(r.energy)
        kvp: dict[str, Any] = {
            "run_id": run_id, "converged": bool(r.converged), "nsteps": int(r.nsteps),
            "force_calls": int(r.nsteps) + 1, "final_fmax": float(r.fmax) if math.isfinite(r.fmax) else None,
            "relax_reason": r.reason, "failed": bool(r.failed),
        }
        if verdict is not None:
            kvp.update(verdict(sid, cid, r))
        else:
            kvp["energy_ok"] = math.isfinite(e)
        _, written = store.write(stage, sid, cid, r.atoms, kvp, {"initial_energy": float(r.initial_energy)})
        store.log_event(event="finish", stage=stage, run_id=run_id, system_id=sid, config_id=cid, written=written)

    t0 = time.perf_counter()
    relax_batch([a for _, _, a in items], calc, fmax=fmax, steps=steps, max_atoms=max_atoms,
                progress=progress, on_result=on_result)
    return time.perf_counter() - t0


def resolve_energy_settings(cfg: RunConfig, ml_calc: Any, dft_calc: Any | None) -> RunConfig:
    """``cfg`` with ``references`` and ``ml_energy_convention`` resolved (see :class:`RunConfig`)."""
    import dataclasses

    from adsorbml.energies import default_references, resolve_ml_convention

    refs = cfg.references or default_references(cfg.dft_calculator, dft_calc)
    conv = resolve_ml_convention(cfg.ml_energy_convention, ml_calc)
    return dataclasses.replace(cfg, references=refs, ml_energy_convention=conv)


def _dft_single_points(
    store: RunStore, run_id: int, todo: list[tuple[str, str, Atoms]], dft_calc: Any, *,
    continue_on_error: bool, progress: bool, log: Log,
) -> tuple[int, bool]:
    """Single points on ``todo`` [(system_id, config_id, atoms)], each written to ``dft_sp`` as it
    finishes (a failure with its message as ``dft_error``, also in events.jsonl). Returns (number
    run, whether it stopped at an error)."""
    from tqdm.auto import tqdm

    n = 0
    for sid, cid, atoms in tqdm(todo, desc="DFT single points", unit="sp", disable=not progress):
        d = single_point(atoms, dft_calc)
        store.write("dft_sp", sid, cid, d.atoms if d.atoms is not None else atoms,
                    {"run_id": run_id, "dft_energy": d.energy, "dft_ok": d.energy is not None,
                     "scf_steps": d.scf_steps, "ionic_steps": d.ionic_steps, "dft_error": d.error}, {})
        n += 1
        if d.error is not None:
            store.log_event(event="dft_error", stage="dft_sp", run_id=run_id, system_id=sid, config_id=cid,
                            error=d.error)
            log(f"DFT single point {sid}/{cid} failed: {d.error}")
            if not continue_on_error:
                return n, True
    return n, False


def dft_errors(store: RunStore) -> dict[str, str]:
    """Every failed DFT single point in the store: ``"<system_id>/<config_id>"`` → message."""
    return {f"{r.system_id}/{r.config_id}": r.get("dft_error") or "failed (no message recorded)"
            for r in store.rows("dft_sp") if not r.get("dft_ok", r.get("dft_energy") is not None)}


def run_workflow(
    cfg: RunConfig,
    out_dir: str | os.PathLike,
    *,
    ml_calculator: Any | None = None,
    dft_calculator: Any | None = None,
    plots: bool = True,
    progress: bool = True,
    log: Log = print,
    continue_on_dft_error: bool = False,
) -> RunSummary:
    """Run (or resume) the AdsorbML workflow for ``cfg`` in ``out_dir``.

    ``ml_calculator`` / ``dft_calculator`` override the calculators named in ``cfg`` (e.g. an
    already loaded model); the names in ``cfg`` still label the run and guard resuming.
    A DFT single point that raises stops the DFT work (single points and ground truth) unless
    ``continue_on_dft_error``; the failures are in :attr:`RunSummary.dft_errors` either way.
    """
    from tqdm.auto import tqdm

    from adsorbml.energies import build_scheme

    cfg.check()
    # build the calculators first: a bad model or calculator fails before any work is done
    ml_calc = ml_calculator if ml_calculator is not None else make_ml_calculator(cfg.ml_calculator)
    dft_calc = dft_calculator if dft_calculator is not None else make_dft_calculator(cfg.dft_calculator)
    cfg = resolve_energy_settings(cfg, ml_calc, dft_calc)
    store = RunStore(out_dir)
    # the gas references (a resumed run keeps its stored ones), recorded with the run config
    previous = (store.config or {}).get("energy_scheme")
    scheme = build_scheme(cfg.references, cfg.ml_energy_convention, ml_calc, dft_calc, previous)
    run_id = store.begin_run(dict(cfg.to_dict(), energy_scheme=scheme.to_dict()), cfg.fingerprint())
    out = store.directory
    if run_id > 1:
        log(f"resuming {out} (run {run_id}): finished work in {store.path.name} is kept")

    # 1. slabs (stored rows win, so a resumed run uses exactly the same structures)
    slabs: dict[str, SlabRecord] = {}
    new_rows = []
    for rec in _build_slabs(cfg):
        row = store.get("slab", rec.slab_id, "slab")
        if row is None:
            new_rows.append(("slab", rec.slab_id, "slab", rec.atoms, {"run_id": run_id},
                             {"info": json.loads(json.dumps(rec.info))}))
            slabs[rec.slab_id] = rec
        else:
            slabs[rec.slab_id] = _slab_from_row(row)
    store.write_many(new_rows)

    # 2. placements, one transaction per system
    systems: list[_System] = []
    pairs = [(sid, a) for sid in slabs for a in cfg.adsorbates]
    for slab_id, ads in tqdm(pairs, desc="placements", unit="system", disable=not progress):
        name = as_adsorbate(ads).name
        sid = system_id_for(slab_id, name)
        if store.count("placement", system_id=sid):
            pl = [_placement_from_row(r) for r in store.rows("placement", sid)]
        else:
            pl = generate_placements(slabs[slab_id], name, num_random=cfg.num_random, heuristic=cfg.heuristic,
                                     seed=cfg.seed)
            store.write_many([
                ("placement", sid, p.config_id, p.atoms, {"run_id": run_id, "site_kind": p.site_kind,
                                                          "slab_id": slab_id, "adsorbate": name},
                 p.metadata()) for p in pl
            ])
        systems.append(_System(sid, slab_id, name, pl))
    if len({s.system_id for s in systems}) != len(systems):
        raise InputError("two systems share an id; use distinct slab ids / adsorbates")
    n_placements = sum(len(s.placements) for s in systems)

    # 3.-4. ML relaxations: clean slabs, then every placement
    ml_done = store.done("ml")
    pending = [(s.system_id, p.config_id, p.atoms) for s in systems for p in s.placements
               if (s.system_id, p.config_id) not in ml_done]
    slab_pending = [(i, "slab", slabs[i].atoms) for i in slabs if store.get("slab_ml", i, "slab") is None]
    ml_seconds = 0.0
    if pending or slab_pending:
        _relax_into_store(store, run_id, "slab_ml", slab_pending, ml_calc, fmax=cfg.fmax, steps=cfg.steps,
                          max_atoms=cfg.max_atoms, progress=False, verdict=_slab_energy("ml_energy"))
    if pending:
        ref = {i: store.get("slab_ml", i, "slab").toatoms() for i in slabs}
        ml_verdict = _verdict(systems, ref, cfg.checks, "ml_energy")
        log(f"ML relaxations: {len(pending)} to run, {len(ml_done)} already in the store")
        ml_seconds = _relax_into_store(store, run_id, "ml", pending, ml_calc, fmax=cfg.fmax, steps=cfg.steps,
                                       max_atoms=cfg.max_atoms, progress=progress, verdict=ml_verdict)
        store.update_run(run_id, ml_seconds=ml_seconds, ml_relaxations=len(pending))

    # 5. DFT single points: the ML-relaxed clean slabs (E_ads reference without ground truth),
    #    then the top k of every system
    dft_now, stopped = 0, False
    if dft_calc is not None:
        dft_done = store.done("dft_sp")
        todo: list[tuple[str, str, Atoms]] = []
        if not cfg.ground_truth:
            todo += [(i, "slab", store.get("slab_ml", i, "slab").toatoms()) for i in slabs
                     if (i, "slab") not in dft_done]
        for s in systems:
            ranked = rank_valid([ml_result(r) for r in store.rows("ml", s.system_id)], cfg.k)
            todo += [(s.system_id, r.config_id, r.atoms) for r in ranked if (s.system_id, r.config_id) not in dft_done]
        dft_now, stopped = _dft_single_points(store, run_id, todo, dft_calc, continue_on_error=continue_on_dft_error,
                                              progress=progress, log=log)

    # 6. ground truth: DFT relaxations of the clean slabs and of every placement
    gt_now = 0
    if cfg.ground_truth and not stopped:
        gt_done = store.done("gt")
        gt_pending = [(s.system_id, p.config_id, p.atoms) for s in systems for p in s.placements
                      if (s.system_id, p.config_id) not in gt_done]
        slab_gt_pending = [(i, "slab", slabs[i].atoms) for i in slabs if store.get("slab_gt", i, "slab") is None]
        if gt_pending or slab_gt_pending:
            _relax_into_store(store, run_id, "slab_gt", slab_gt_pending, dft_calc, fmax=cfg.gt_fmax,
                              steps=cfg.gt_steps, max_atoms=cfg.max_atoms, progress=False,
                              verdict=_slab_energy("gt_energy"))
        if gt_pending:
            gref = {i: store.get("slab_gt", i, "slab").toatoms() for i in slabs}
            gt_verdict = _verdict(systems, gref, cfg.checks, "gt_energy")
            log(f"ground-truth (DFT) relaxations: {len(gt_pending)} to run")
            _relax_into_store(store, run_id, "gt", gt_pending, dft_calc, fmax=cfg.gt_fmax, steps=cfg.gt_steps,
                              max_atoms=cfg.max_atoms, progress=progress, verdict=gt_verdict)
            gt_now = len(gt_pending)

    files, table, answers = collect_outputs(store, cfg, [s.system_id for s in systems], plots=plots)
    errors = dft_errors(store)
    store.update_run(run_id, finished=time.time(), dft_errors=len(errors))
    return RunSummary(out, run_id, [s.system_id for s in systems], n_placements, len(pending),
                      n_placements - len(pending), dft_now, gt_now, ml_seconds, files, table, answers,
                      errors, stopped)


def _slab_energy(key: str) -> Callable[[str, str, Any], dict]:
    """Row values of a clean-slab relaxation: its energy (eV) under ``key``."""

    def verdict(sid: str, cid: str, r: Any) -> dict:
        e = float(r.energy)
        return {key: e if math.isfinite(e) else None, "energy_ok": math.isfinite(e)}

    return verdict


# --------------------------------------------------------------------------- export


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, k: int | None = None, vasp: bool = True,
) -> list[Path]:
    """Top-k VASP inputs + extxyz of a finished (or partial) run, from its store.

    Writes to ``out`` (default ``<run_dir>/export``); ``k`` defaults to the run's k.
    With ``vasp``, each ML-relaxed clean slab is exported too, as ``<out>/<slab_id>/slab``
    (its single point is the DFT clean-slab energy of E_ads(ML+DFT); ``adsorbml import`` maps it
    back). Returns the VASP calculation directories, clean slabs first (also in ``paths.txt``;
    see :func:`adsorbml.export.export_top_k`).
    """
    store = RunStore(run_dir, create=False)
    cfg = store.config or {}
    k = int(k if k is not None else cfg.get("k", 5))
    ranked: dict[str, list[MLResult]] = {}
    for row in store.rows("ml"):
        ranked.setdefault(row.system_id, []).append(ml_result(row))
    if not ranked:
        raise InputError(f"{store.path} has no finished ML relaxations yet")
    dest = Path(out) if out is not None else store.directory / "export"
    paths = export_top_k(ranked, dest, k=k, vasp=vasp)
    if vasp:
        slabs = [write_vasp_inputs(r.toatoms(), dest / r.system_id / "slab", single_point=True)
                 for r in store.rows("slab_ml")]
        paths = slabs + paths
        atomic_write_text(dest / "paths.txt", "".join(f"{p}\n" for p in paths))
    return paths
