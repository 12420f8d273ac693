"""AdsorbML success and speedup metrics on OC20-Dense targets/compute/results.

The three layouts (energies in eV) and their files are in :mod:`adsorbml.formats`; energies
in targets and results must share one reference (total or adsorption energy).

Definitions (AdsorbML, Lan et al. 2022; see the notes §4.3–4.4):

* top-k(s) = the k entries of ``results[s]`` with the lowest ``ml_energy``. **This module
  sorts by ML energy itself** (ties broken by ``config_id``) and never relies on the
  insertion order of the results file.
* success@k(s) ⇔ ``min_{c ∈ top-k(s)} E_ML+DFT(s, c) − min_c E_target(s, c) ≤ threshold``
  (threshold 0.1 eV). One-sided: finding a *lower* energy than the ground truth is a
  success. "Much better" ⇔ that difference < −threshold. Top-k entries without a DFT energy
  contribute nothing. A system without any valid result fails. Rates are over all systems
  of ``targets``.
* validated ML-only success(s): c* = lowest ``ml_energy``; success ⇔
  ``|E_ML+DFT(c*) − E_ML(c*)| ≤ threshold`` **and** ``E_ML(c*) − min E_target(s) ≤ threshold``.
* speedup(k) = Σ_s Σ_{c ≠ "surface"} cost_GT(s, c) / Σ_s Σ_{c ∈ top-k(s)} cost_SP(s, c), for
  cost = SCF steps and cost = ionic steps. With an oracle that has no SCF loop (EMT, an ML
  model used as "DFT") use ionic steps = force calls; the SCF speedup is then ``None``.
  The ML relaxations themselves are not in this ratio; report their cost separately
  (``ml_seconds_per_relaxation``).

Float comparisons use ``threshold + 1e-9`` eV so that a difference that is 0.1 eV on paper
is not lost to rounding (``-1.0 - (-1.1) = 0.10000000000000009``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from adsorbml.errors import FormatError
from adsorbml.formats import (
    Compute, Results, Targets, _finite, validate_compute, validate_results, validate_targets,
)

__all__ = [
    "SUCCESS_THRESHOLD",
    "MetricsRow",
    "sorted_results",
    "top_k",
    "success_at_k",
    "system_differences",
    "ml_only_success",
    "speedup",
    "metrics_table",
    "format_table",
]

SUCCESS_THRESHOLD = 0.1  # eV
_EPS = 1e-9  # eV, rounding allowance on the threshold comparison


# --------------------------------------------------------------------------- helpers


def sorted_results(system_results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, dict]]:
    """Entries of one system as ``[(config_id, entry), ...]`` in ascending ML energy.

    Entries whose ``ml_energy`` is missing or not finite are dropped (they cannot be
    ranked). Ties are broken by ``config_id`` so the order is deterministic.
    """
    items = [(str(c), dict(e)) for c, e in system_results.items() if _finite(e.get("ml_energy"))]
    items.sort(key=lambda ce: (float(ce[1]["ml_energy"]), ce[0]))
    return items


def top_k(system_results: Mapping[str, Mapping[str, Any]], k: int) -> list[tuple[str, dict]]:
    """The ``k`` entries with the lowest ML energy (fewer if the system has fewer)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return sorted_results(system_results)[:k]


def _target_minimum(targets: Targets, system_id: str) -> float:
    energies = [float(e) for _, e in targets[system_id] if _finite(e)]
    if not energies:
        raise FormatError(f"targets[{system_id!r}] has no finite energy")
    return min(energies)


# --------------------------------------------------------------------------- success


def system_differences(targets: Targets, results: Results, k: int) -> dict[str, float]:
    """Per system, ``min_{top-k} E_ML+DFT − min E_target`` in eV (``inf`` if none is valid)."""
    diffs: dict[str, float] = {}
    for sid in targets:
        best_gt = _target_minimum(targets, sid)
        dft = [
            float(e["ml+dft_energy"])
            for _, e in top_k(results.get(sid, {}), k)
            if _finite(e.get("ml+dft_energy"))
        ]
        diffs[sid] = (min(dft) - best_gt) if dft else math.inf
    return diffs


def success_at_k(
    targets: Targets, results: Results, k: int, threshold: float = SUCCESS_THRESHOLD
) -> tuple[float, float]:
    """Hybrid ML+DFT success rate and "much better" rate at ``k``.

    Returns
    -------
    (success, much_better):
        Fractions of the systems in ``targets`` (in [0, 1]). success: difference
        ≤ threshold; much better: difference < −threshold.
    """
    if not targets:
        raise FormatError("targets is empty")
    diffs = system_differences(targets, results, k)
    n = len(diffs)
    success = sum(d <= threshold + _EPS for d in diffs.values()) / n
    better = sum(d < -threshold - _EPS for d in diffs.values()) / n
    return success, better


def ml_only_success(targets: Targets, results: Results, threshold: float = SUCCESS_THRESHOLD) -> float:
    """Validated ML-only success rate (fraction of the systems in ``targets``).

    The lowest-ML-energy entry c* must have a DFT single point within ``threshold`` of its
    ML energy, and its ML energy must be ≤ ground-truth minimum + threshold.
    """
    if not targets:
        raise FormatError("targets is empty")
    ok = 0
    for sid in targets:
        best_gt = _target_minimum(targets, sid)
        ranked = top_k(results.get(sid, {}), 1)
        if not ranked:
            continue
        e = ranked[0][1]
        e_ml, e_dft = float(e["ml_energy"]), e.get("ml+dft_energy")
        if not _finite(e_dft) or abs(float(e_dft) - e_ml) > threshold + _EPS:
            continue
        ok += e_ml - best_gt <= threshold + _EPS
    return ok / len(targets)


# --------------------------------------------------------------------------- speedup


def _gt_cost(compute: Compute, targets: Targets, key: str) -> float | None:
    total = 0.0
    for sid in targets:
        if sid not in compute:
            raise FormatError(f"compute has no entry for system {sid!r}")
        for cid, steps in compute[sid].items():
            if cid == "surface":
                continue
            v = steps.get(key)
            if not _finite(v):
                return None
            total += float(v)
    return total


def _ml_cost(results: Results, targets: Targets, k: int, key: str) -> float | None:
    total = 0.0
    for sid in targets:
        for _, e in top_k(results.get(sid, {}), k):
            v = e.get(key)
            if not _finite(v):
                return None
            total += float(v)
    return total


def speedup(compute: Compute, targets: Targets, results: Results, k: int) -> dict[str, float | None]:
    """DFT speedup at ``k`` as ``{"scf": x, "ionic": y}``.

    ``None`` where a needed step count is unknown, ``inf`` when the top-k cost is zero.
    """
    out: dict[str, float | None] = {}
    for gt_key, res_key in (("scf", "scf_steps"), ("ionic", "ionic_steps")):
        num = _gt_cost(compute, targets, gt_key)
        den = _ml_cost(results, targets, k, res_key)
        if num is None or den is None:
            out[gt_key] = None
        else:
            out[gt_key] = num / den if den > 0 else math.inf
    return out


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class MetricsRow:
    """One row of the AdsorbML Table-3-style summary (rates are fractions in [0, 1])."""

    k: int
    success: float
    much_better: float
    speedup_scf: float | None
    speedup_ionic: float | None
    ml_only_success: float
    n_systems: int
    ml_seconds_per_relaxation: float | None = None


def metrics_table(
    targets: Targets,
    results: Results,
    compute: Compute | None = None,
    k_max: int = 5,
    threshold: float = SUCCESS_THRESHOLD,
    ml_seconds_per_relaxation: float | None = None,
) -> list[MetricsRow]:
    """Success, "much better", speedups and ML-only success for k = 1..``k_max``."""
    validate_targets(targets)
    validate_results(results)
    if compute is not None:
        validate_compute(compute)
    ml_only = ml_only_success(targets, results, threshold)
    rows = []
    for k in range(1, k_max + 1):
        s, b = success_at_k(targets, results, k, threshold)
        sp = speedup(compute, targets, results, k) if compute is not None else {"scf": None, "ionic": None}
        rows.append(
            MetricsRow(k, s, b, sp["scf"], sp["ionic"], ml_only, len(targets), ml_seconds_per_relaxation)
        )
    return rows


def _fmt_speed(x: float | None) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞"
    return f"{x:,.1f}×"


def format_table(rows: Sequence[MetricsRow]) -> str:
    """A Markdown table in the shape of AdsorbML's Table 3."""
    lines = [
        "| k | success | much better | speedup (SCF) | speedup (ionic / force calls) | ML-only success | systems | ML s/relaxation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ml_s = "–" if r.ml_seconds_per_relaxation is None else f"{r.ml_seconds_per_relaxation:.2f}"
        lines.append(
            f"| {r.k} | {100 * r.success:.1f} % | {100 * r.much_better:.1f} % | {_fmt_speed(r.speedup_scf)}"
            f" | {_fmt_speed(r.speedup_ionic)} | {100 * r.ml_only_success:.1f} % | {r.n_systems} | {ml_s} |"
        )
    return "\n".join(lines)
