"""The resumable AdsorbML run behind ``adsorbml run`` / ``adsorbml demo``.

Settings: :mod:`adsorbml.config` (:class:`RunConfig`, :class:`SlabSpec`, :func:`load_config`);
calculators: :mod:`adsorbml.calculators`; adsorption energies: :mod:`adsorbml.energies`;
output files: :mod:`adsorbml.outputs` (all re-exported here).

:func:`run_workflow` takes a :class:`RunConfig` (slabs × adsorbates, placement and relaxation
settings, calculators) and an output directory, and runs the stages of :mod:`adsorbml.stages`
through the ase.db store of :mod:`adsorbml.store`:

1. slabs (files, or bulk + Miller index via pymatgen) → ``slab`` rows;
2. placements per system (seeded, so regenerating gives the same structures; they are also
   stored, in one transaction per system) → ``placement`` rows;
3. ML relaxation of each clean slab (the anomaly reference) → ``slab_ml``;
4. ML relaxation of every placement with the batched relaxer; each result is written with
   its anomaly verdict from the ``on_result`` callback as soon as it finishes → ``ml``;
5. DFT single points (any ASE calculator) on the top k valid placements → ``dft_sp`` (a failed
   one is retried by the next run, up to :data:`adsorbml.stages.MAX_DFT_ATTEMPTS` attempts);
6. optional ground truth: DFT relaxation of the clean slab and of *every* placement
   (``slab_gt``, ``gt``), as for the OC20-Dense targets; cost = force calls.

Before any of these, the gas references of the run are fixed (:mod:`adsorbml.energies`:
``references`` "oc20" or "computed", the ML model's energy convention) and recorded in the
store's run config (``energy_scheme``). Without ground truth, step 5 also runs a DFT single
point on each ML-relaxed clean slab (``dft_sp`` row ``(slab_id, "slab")``): the DFT clean-slab
energy of E_ads(ML+DFT). A DFT calculator that raises is recorded with its message (``dft_sp``
row ``dft_error``, ``events.jsonl``) and stops the DFT work unless ``continue_on_dft_error``.

Run again with the same settings and it resumes: finished rows are skipped, never redone.
Outputs are rewritten from the store at the end of each run by :mod:`adsorbml.outputs` (per
system results: :mod:`adsorbml.results`); all energies in them are adsorption energies (eV)::

    adsorbml.db       the store            events.jsonl   started/finished work (audit log)
    results.json      OC20-Dense results   anomalies.json {system_id: {config_id: reason}}
    targets.json      OC20-Dense targets   compute.json   ground-truth cost (ground truth only)
    summary.json/.csv the lowest E_ads per system (placement, site, anomaly-free)
    energies.json     which energies the files carry (references, conventions, offsets)
    metrics.md        success/speedup table (ground truth only)
    plots/<system_id>.png
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from adsorbml.calculators import make_dft_calculator, make_ml_calculator, shipped_model_available
from adsorbml.config import RunConfig, SlabSpec, load_config
from adsorbml.outputs import collect_outputs
from adsorbml.records import dft_errors
from adsorbml.stages import (
    RunContext,
    ground_truth_level,
    iter_systems,
    ml_level,
    stage_placements,
    stage_relax,
    stage_single_points,
    stage_slabs,
)
from adsorbml.store import RunStore

__all__ = [
    "SlabSpec",
    "RunConfig",
    "RunSummary",
    "load_config",
    "make_ml_calculator",
    "make_dft_calculator",
    "shipped_model_available",
    "resolve_energy_settings",
    "run_workflow",
]

Log = Callable[[str], None]


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


def resolve_energy_settings(cfg: RunConfig, ml_calc: Any, dft_calc: Any | None) -> RunConfig:
    """``cfg`` with ``references`` and ``ml_energy_convention`` resolved (see :class:`RunConfig`)."""
    from adsorbml.energies import default_references, resolve_ml_convention

    refs = cfg.references or default_references(cfg.dft_calculator, dft_calc)
    conv = resolve_ml_convention(cfg.ml_energy_convention, ml_calc)
    return dataclasses.replace(cfg, references=refs, ml_energy_convention=conv)


def model_sha256(calc: Any) -> str | None:
    """sha256 of the checkpoint file behind an EquiformerV2 calculator (``calc.metadata``), else
    None (a calculator without a file is identified by its name in the config alone). It is part
    of a run's fingerprint, so a store made with one checkpoint is not resumed with another file
    of the same name (e.g. a retrained shipped model)."""
    meta = getattr(calc, "metadata", None)
    return meta.get("sha256") if isinstance(meta, dict) else None


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
    ray: Any | None = None,
) -> RunSummary:
    """Run (or resume) the AdsorbML workflow for ``cfg`` in ``out_dir``.

    ``ml_calculator`` / ``dft_calculator`` override the calculators named in ``cfg`` (e.g. an
    already loaded model); the names in ``cfg`` still label the run and guard resuming.
    A DFT single point that raises stops the DFT work (single points and ground truth) unless
    ``continue_on_dft_error``; the failures are in :attr:`RunSummary.dft_errors` either way.
    ``ray`` (:class:`eqv2_calc.distributed.RayOptions`): run the ML (and ground-truth)
    relaxations on Ray actors; it is not part of the fingerprint, so either way resumes the other.
    """
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
    fingerprint = {**cfg.fingerprint(), "ml_model_sha256": model_sha256(ml_calc)}
    run_id = store.begin_run(dict(cfg.to_dict(), energy_scheme=scheme.to_dict()), fingerprint)
    if run_id > 1:
        log(f"resuming {store.directory} (run {run_id}): finished work in {store.path.name} is kept")
    ctx = RunContext(store, run_id, cfg, progress, log, ray)

    slabs = stage_slabs(ctx)
    if ray is None:
        systems = stage_placements(ctx, slabs)
        ml_now, ml_seconds = stage_relax(ctx, ml_calc, ml_level(cfg), slabs, systems)
    else:  # placements are generated while the actors relax the first ones
        systems = []
        ml_now, ml_seconds = stage_relax(ctx, ml_calc, ml_level(cfg), slabs, iter_systems(ctx, slabs, into=systems))
    n_placements = sum(len(s.placements) for s in systems)
    if ml_now:
        store.update_run(run_id, ml_seconds=ml_seconds, ml_relaxations=ml_now)
    dft_now, stopped = 0, False
    if dft_calc is not None:
        dft_now, stopped = stage_single_points(ctx, dft_calc, slabs, systems, continue_on_error=continue_on_dft_error)
    gt_now = 0
    if cfg.ground_truth and not stopped:
        gt_now, _ = stage_relax(ctx, dft_calc, ground_truth_level(cfg), slabs, systems)

    system_ids = [s.system_id for s in systems]
    files, table, answers = collect_outputs(store, cfg, system_ids, plots=plots)
    errors = dft_errors(store)
    store.update_run(run_id, finished=time.time(), dft_errors=len(errors))
    return RunSummary(store.directory, run_id, system_ids, n_placements, ml_now, n_placements - ml_now, dft_now,
                      gt_now, ml_seconds, files, table, answers, errors, stopped)
