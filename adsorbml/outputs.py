"""The files of a run directory, rewritten from the store (``adsorbml run`` and ``adsorbml import``).

All energies in the OC20-Dense files are **adsorption energies** (eV), per system
E_ads = E − E(clean slab) − Σ n ε (or the model's own energy for a referenced model; see
:mod:`adsorbml.energies`), on one reference for ML, ML+DFT and ground truth::

    results.json   {system_id: {config_id: {ml_energy: E_ads(ML), ml+dft_energy: E_ads(ML+DFT), scf_steps, ionic_steps}}}
    targets.json   {system_id: [(config_id, E_ads(ground truth)), ...]}      (ground truth only)
    compute.json   ground-truth cost                                          (ground truth only)
    energies.json  which energies the files carry: the energy scheme (references, conventions, gas
                   references) and per system the offsets and clean-slab energies used
    summary.json / summary.csv   per system the lowest E_ads, its placement, site, anomaly-free status
    anomalies.json {system_id: {config_id: reason}}
    metrics.md     success/speedup table (ground truth only)
    plots/<system_id>.png        E_ads per placement

The store keeps each calculator's raw energies (``ml_energy``, ``dft_energy``, ``gt_energy``);
within one system E_ads and raw energies differ by one constant, so the ranking is the same.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adsorbml.plots import plot_system
from adsorbml.results import SystemResults, energy_scheme, system_results
from adsorbml.store import RunStore
from adsorbml.summary import SystemAnswer, write_summary
from eqv2_calc.io import atomic_write_text

__all__ = ["ENERGIES_NOTE", "collect_outputs"]

ENERGIES_NOTE = ("results.json (ml_energy, ml+dft_energy) and targets.json hold adsorption energies E_ads in eV "
                 "(E - E(clean slab) - sum n*eps, OC20 scheme); see 'scheme' and 'systems' for the references used")


def collect_outputs(
    store: RunStore, cfg: Any, system_ids: Sequence[str], plots: bool = True,
) -> tuple[dict[str, Path], str | None, list[SystemAnswer]]:
    """Write every output file from the store. Returns (files, Markdown metrics table or None,
    the per-system answers)."""
    from adsorbml.formats import write_compute, write_results, write_targets
    from adsorbml.metrics import format_table, metrics_table

    out = store.directory
    scheme = energy_scheme(store)
    systems: list[SystemResults] = [system_results(store, sid, scheme, bool(cfg.ground_truth)) for sid in system_ids]
    files = {"results": write_results(out / "results.json", {s.system_id: s.results for s in systems})}
    atomic_write_text(out / "anomalies.json", json.dumps(
        {s.system_id: {r.config_id: r.anomaly for r in s.ml} for s in systems}, indent=1))
    files["anomalies"] = out / "anomalies.json"
    energies = {s.system_id: {"slab_id": s.slab_id, "adsorbate": s.adsorbate, **dataclasses.asdict(s.offsets)}
                for s in systems}
    meta = {"note": ENERGIES_NOTE, "unit": "eV", "scheme": scheme.to_dict(), "systems": energies}
    atomic_write_text(out / "energies.json", json.dumps(meta, indent=1))
    files["energies"] = out / "energies.json"
    answers = [s.answer for s in systems]
    summ = write_summary(out, answers, {"note": ENERGIES_NOTE, "references": scheme.references,
                                        "ml_energy_convention": scheme.ml_convention})
    files["summary"] = summ["summary.json"]
    files["summary_csv"] = summ["summary.csv"]
    table = None
    scored = [s for s in systems if s.targets]
    if cfg.ground_truth and scored and all(s.ground_truth_complete for s in systems):
        targets = {s.system_id: s.targets for s in scored}
        compute = {s.system_id: s.compute for s in scored}
        files["targets"] = write_targets(out / "targets.json", targets)
        files["compute"] = write_compute(out / "compute.json", {s.system_id: s.compute for s in systems})
        runs = store.metadata.get("runs", [])
        secs = sum(r.get("ml_seconds", 0.0) for r in runs)
        nrel = sum(r.get("ml_relaxations", 0) for r in runs)
        rows = metrics_table(targets, {s.system_id: s.results for s in scored}, compute, k_max=cfg.k,
                             ml_seconds_per_relaxation=(secs / nrel) if nrel else None)
        table = format_table(rows)
        dropped = sorted(set(system_ids) - set(targets))
        note = f"\n\nSystems without any valid ground-truth relaxation (not scored): {', '.join(dropped)}\n" if dropped else "\n"
        atomic_write_text(out / "metrics.md", "Energies: adsorption energies (eV).\n\n" + table + note)
        files["metrics"] = out / "metrics.md"
    if plots:
        for s in systems:
            files[f"plot:{s.system_id}"] = plot_system(out / "plots" / f"{s.system_id}.png", s.system_id, s.ml_ads(),
                                                       cfg.k, s.dft_ads(), s.ground_truth)
    return files, table, answers
