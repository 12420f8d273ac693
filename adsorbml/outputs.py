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
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adsorbml.energies import (
    DFT_SLAB_GROUND_TRUTH,
    DFT_SLAB_SINGLE_POINT,
    EnergyScheme,
    system_offsets,
)
from adsorbml.export import MLResult, rank_valid
from adsorbml.store import RunStore
from adsorbml.summary import (
    PlacementEnergies,
    SystemAnswer,
    system_answer,
    write_summary,
)
from eqv2_calc.io import atomic_write, atomic_write_text

__all__ = ["ENERGIES_NOTE", "collect_outputs", "ml_result", "plot_system", "row_energy"]

ENERGIES_NOTE = ("results.json (ml_energy, ml+dft_energy) and targets.json hold adsorption energies E_ads in eV "
                 "(E - E(clean slab) - sum n*eps, OC20 scheme); see 'scheme' and 'systems' for the references used")


def ml_result(row: Any) -> MLResult:
    """An ``ml`` store row as an :class:`MLResult` (raw ML energy)."""
    e = row.get("ml_energy", math.nan)
    return MLResult(row.config_id, row.toatoms(), float(e) if e is not None else math.nan, row.anomaly,
                    bool(row.converged), {"nsteps": row.nsteps})


def row_energy(row: Any, key: str) -> float | None:
    """``row[key]`` (eV), else the energy ase.db stored with the structure; None if neither/non-finite."""
    if row is None:
        return None
    e = row.get(key)
    if e is None:
        e = row.get("energy")
    if e is None or not math.isfinite(float(e)):
        return None
    return float(e)


def _scheme(store: RunStore) -> EnergyScheme:
    d = (store.config or {}).get("energy_scheme")
    if not d:
        from adsorbml.errors import InputError

        raise InputError(f"{store.path} records no energy scheme (written by an older version); rerun it in a new directory")
    return EnergyScheme.from_dict(d)


def collect_outputs(
    store: RunStore, cfg: Any, system_ids: Sequence[str], plots: bool = True,
) -> tuple[dict[str, Path], str | None, list[SystemAnswer]]:
    """Write every output file from the store. Returns (files, Markdown metrics table or None,
    the per-system answers)."""
    from adsorbml.metrics import (
        format_table,
        metrics_table,
        write_compute,
        write_results,
        write_targets,
    )

    out = store.directory
    scheme = _scheme(store)
    results: dict[str, dict] = {}
    anomalies: dict[str, dict] = {}
    targets: dict[str, list] = {}
    compute: dict[str, dict] = {}
    energies: dict[str, dict] = {}
    answers: list[SystemAnswer] = []
    plot_data: dict[str, tuple] = {}
    gt_complete = bool(cfg.ground_truth)
    for sid in system_ids:
        prows = list(store.rows("placement", sid))
        order = {r.config_id: i for i, r in enumerate(prows)}
        slab_id = prows[0].slab_id if prows else None
        adsorbate = prows[0].get("adsorbate", "") if prows else ""
        ml = sorted((ml_result(r) for r in store.rows("ml", sid)), key=lambda r: order.get(r.config_id, len(order)))
        dft = {r.config_id: r for r in store.rows("dft_sp", sid)}
        gt_rows = list(store.rows("gt", sid)) if cfg.ground_truth else []
        ml_slab = row_energy(store.get("slab_ml", slab_id, "slab"), "ml_energy") if slab_id else None
        if cfg.ground_truth:
            srow = store.get("slab_gt", slab_id, "slab") if slab_id else None
            dft_slab, dft_ref = row_energy(srow, "gt_energy"), DFT_SLAB_GROUND_TRUTH
        else:
            srow = store.get("dft_sp", slab_id, "slab") if slab_id else None
            dft_slab = row_energy(srow, "dft_energy") if srow is not None and srow.get("dft_ok", True) else None
            dft_ref = DFT_SLAB_SINGLE_POINT
        off = system_offsets(scheme, prows[0].toatoms() if prows else adsorbate.lstrip("*"),
                             ml_slab, dft_slab, dft_ref)
        energies[sid] = {"slab_id": slab_id, "adsorbate": adsorbate, **dataclasses.asdict(off)}

        pe: list[PlacementEnergies] = []
        ads_ml = [dataclasses.replace(r, ml_energy=off.ml_ads(r.ml_energy) if off.ml_ads(r.ml_energy) is not None
                                      else math.nan) for r in ml]
        site = {r.config_id: (r.get("site_kind"), tuple(r.data.get("site", ())) or None) for r in prows}
        for r in ml:
            d = dft.get(r.config_id)
            sk, st = site.get(r.config_id, (None, None))
            pe.append(PlacementEnergies(r.config_id, sk, st, r.anomaly, off.ml_ads(r.ml_energy),
                                        None if d is None else off.dft_ads(d.get("dft_energy")),
                                        None if d is None else d.get("dft_error")))
        results[sid] = {}
        for r in rank_valid(ml):
            d = dft.get(r.config_id)
            results[sid][r.config_id] = {
                "ml_energy": off.ml_ads(r.ml_energy),
                "ml+dft_energy": None if d is None else off.dft_ads(d.get("dft_energy")),
                "scf_steps": None if d is None else d.get("scf_steps"),
                "ionic_steps": None if d is None else d.get("ionic_steps"),
            }
        anomalies[sid] = {r.config_id: r.anomaly for r in ml}
        gt_min = None
        if cfg.ground_truth:
            if len(gt_rows) < len(prows):
                gt_complete = False
            valid = [(r.config_id, off.dft_ads(r.get("gt_energy"))) for r in gt_rows if r.anomaly == "ok"]
            valid = [(c, e) for c, e in valid if e is not None]
            if valid:
                targets[sid] = valid
                gt_min = min(e for _, e in valid)
            compute[sid] = {r.config_id: {"scf": None, "ionic": int(r.force_calls)} for r in gt_rows}
            if srow is not None:
                compute[sid]["surface"] = {"scf": None, "ionic": int(srow.force_calls)}
        answers.append(system_answer(sid, str(slab_id), str(adsorbate), pe, ground_truth=gt_min,
                                     dft_slab_reference=off.dft_slab_reference))
        plot_data[sid] = (ads_ml, {c: off.dft_ads(r.get("dft_energy")) for c, r in dft.items()},
                          {r.config_id: (off.dft_ads(r.get("gt_energy")) if r.anomaly == "ok" else None) for r in gt_rows})

    files = {"results": write_results(out / "results.json", results)}
    atomic_write_text(out / "anomalies.json", json.dumps(anomalies, indent=1))
    files["anomalies"] = out / "anomalies.json"
    meta = {"note": ENERGIES_NOTE, "unit": "eV", "scheme": scheme.to_dict(), "systems": energies}
    atomic_write_text(out / "energies.json", json.dumps(meta, indent=1))
    files["energies"] = out / "energies.json"
    summ = write_summary(out, answers, {"note": ENERGIES_NOTE, "references": scheme.references,
                                        "ml_energy_convention": scheme.ml_convention})
    files["summary"] = summ["summary.json"]
    files["summary_csv"] = summ["summary.csv"]
    table = None
    if cfg.ground_truth and gt_complete and targets:
        files["targets"] = write_targets(out / "targets.json", targets)
        files["compute"] = write_compute(out / "compute.json", compute)
        runs = store.metadata.get("runs", [])
        secs = sum(r.get("ml_seconds", 0.0) for r in runs)
        nrel = sum(r.get("ml_relaxations", 0) for r in runs)
        res_scored = {s: results.get(s, {}) for s in targets}
        rows = metrics_table(targets, res_scored, {s: compute[s] for s in targets}, k_max=cfg.k,
                             ml_seconds_per_relaxation=(secs / nrel) if nrel else None)
        table = format_table(rows)
        dropped = sorted(set(system_ids) - set(targets))
        note = f"\n\nSystems without any valid ground-truth relaxation (not scored): {', '.join(dropped)}\n" if dropped else "\n"
        atomic_write_text(out / "metrics.md", "Energies: adsorption energies (eV).\n\n" + table + note)
        files["metrics"] = out / "metrics.md"
    if plots:
        for sid in system_ids:
            ads_ml, d, g = plot_data[sid]
            files[f"plot:{sid}"] = plot_system(out / "plots" / f"{sid}.png", sid, ads_ml, cfg.k, d, g)
    return files, table, answers


def plot_system(
    path: str | os.PathLike,
    system_id: str,
    ml: Sequence[MLResult],
    k: int,
    dft: Mapping[str, float | None] | None = None,
    ground_truth: Mapping[str, float | None] | None = None,
) -> Path:
    """PNG of one system: E_ads(ML) per placement (input order; ``ml[i].ml_energy`` is taken as
    the adsorption energy), anomalies marked (red ×), the top k highlighted, E_ads(ML+DFT) (◆)
    and the ground-truth minimum (dashed) where known. matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dft = dict(dft or {})
    gt = dict(ground_truth or {})
    x = {r.config_id: i for i, r in enumerate(ml)}
    top = {r.config_id for r in rank_valid(ml, k)} if ml else set()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(ml) + 3), 4.0), dpi=100)
    ok = [r for r in ml if r.anomaly == "ok" and math.isfinite(r.ml_energy)]
    bad = [r for r in ml if r.anomaly != "ok" and math.isfinite(r.ml_energy)]
    ax.scatter([x[r.config_id] for r in ok], [r.ml_energy for r in ok], s=18, c="tab:blue", label="E_ads ML (valid)")
    if bad:
        ax.scatter([x[r.config_id] for r in bad], [r.ml_energy for r in bad], s=30, c="tab:red", marker="x",
                   label="anomalous (ML)")
    tk = [r for r in ok if r.config_id in top]
    if tk:
        ax.scatter([x[r.config_id] for r in tk], [r.ml_energy for r in tk], s=110, facecolors="none",
                   edgecolors="tab:orange", linewidths=1.8, label=f"top {k} by ML")
    dd = [(x[c], e) for c, e in dft.items() if e is not None and c in x]
    if dd:
        ax.scatter(*zip(*dd), s=40, c="tab:green", marker="D", label="E_ads ML+DFT (single point)")
    gv = [e for e in gt.values() if e is not None]
    if gv:
        ax.axhline(min(gv), color="k", ls="--", lw=1, label=f"ground-truth min {min(gv):.3f} eV")
    ax.set_xticks(range(len(ml)))
    ax.set_xticklabels([r.config_id for r in ml], rotation=90, fontsize=6)
    ax.set_xlabel("placement")
    ax.set_ylabel("adsorption energy E_ads (eV)")
    ax.set_title(f"{system_id}: {len(ok)} valid / {len(ml)} relaxed")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path



