"""The per-system answer of an AdsorbML run: the lowest adsorption energy and where it is.

For each system (one slab, one adsorbate) :func:`system_answer` picks, among the placements
whose ML relaxation is anomaly-free, the lowest E_ads(ML+DFT) over those with a DFT single point
(AdsorbML's answer: the best of the top-k single points); without any single point, the lowest
E_ads(ML). If no placement is anomaly-free the lowest energy over all relaxed placements is
reported with ``anomaly_free = False`` and its anomaly, rather than nothing.

Written as ``summary.json`` (a list of :class:`SystemAnswer` dicts plus the energy scheme) and
``summary.csv`` (one row per system) in the run directory; :func:`format_answers` is the
Markdown table the CLI prints. Energies in eV.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from eqv2_calc.io import atomic_write_text

__all__ = ["PlacementEnergies", "SystemAnswer", "format_answers", "system_answer", "write_summary"]


@dataclass(frozen=True)
class PlacementEnergies:
    """One ML-relaxed placement in adsorption energies (eV; None: not available)."""

    config_id: str
    site_kind: str | None
    site: tuple[float, float, float] | None
    anomaly: str
    e_ads_ml: float | None
    e_ads_ml_dft: float | None = None
    dft_error: str | None = None


@dataclass(frozen=True)
class SystemAnswer:
    """The answer for one system: ``e_ads`` (eV) of placement ``config_id`` at ``site_kind`` /
    ``site`` (x, y, z in Å), from ``source`` (``"ml+dft"``: DFT single point on the ML-relaxed
    structure, ``"ml"``: the ML energy); ``anomaly_free`` with the ML verdict ``anomaly``.
    ``e_ads_ground_truth``: lowest anomaly-free ground-truth E_ads when ground truth was run."""

    system_id: str
    slab_id: str
    adsorbate: str
    e_ads: float | None
    source: str | None
    config_id: str | None
    site_kind: str | None
    site: tuple[float, float, float] | None
    anomaly_free: bool
    anomaly: str | None
    e_ads_ml: float | None
    e_ads_ml_dft: float | None
    n_placements: int
    n_anomaly_free: int
    n_dft: int
    e_ads_ground_truth: float | None = None
    dft_slab_reference: str | None = None


def _ok(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def system_answer(
    system_id: str, slab_id: str, adsorbate: str, placements: Sequence[PlacementEnergies],
    *, ground_truth: float | None = None, dft_slab_reference: str | None = None,
) -> SystemAnswer:
    """The lowest E_ads of one system (see the module docstring); ties broken by config_id."""
    valid = [p for p in placements if p.anomaly == "ok"]
    pool = valid or list(placements)
    with_dft = [p for p in pool if _ok(p.e_ads_ml_dft)]
    if with_dft:
        best, e, src = min(((p, p.e_ads_ml_dft, "ml+dft") for p in with_dft), key=lambda t: (t[1], t[0].config_id))
    else:
        with_ml = [p for p in pool if _ok(p.e_ads_ml)]
        best, e, src = (min(((p, p.e_ads_ml, "ml") for p in with_ml), key=lambda t: (t[1], t[0].config_id))
                        if with_ml else (None, None, None))
    n_dft = sum(_ok(p.e_ads_ml_dft) for p in placements)
    return SystemAnswer(
        system_id, slab_id, adsorbate, e, src, None if best is None else best.config_id,
        None if best is None else best.site_kind, None if best is None else best.site,
        bool(best is not None and best.anomaly == "ok"), None if best is None else best.anomaly,
        None if best is None else best.e_ads_ml, None if best is None else best.e_ads_ml_dft,
        len(placements), len(valid), n_dft, ground_truth, dft_slab_reference,
    )


_CSV_FIELDS = [f.name for f in fields(SystemAnswer)]


def write_summary(out_dir: str | Path, answers: Sequence[SystemAnswer], meta: Mapping[str, Any]) -> dict[str, Path]:
    """``summary.json`` ({"energies": meta, "systems": [...]}) and ``summary.csv`` in ``out_dir``."""
    out = Path(out_dir)
    rows = [asdict(a) for a in answers]
    for r in rows:
        r["site"] = None if r["site"] is None else [float(x) for x in r["site"]]
    atomic_write_text(out / "summary.json", json.dumps({"energies": dict(meta), "systems": rows}, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        r = dict(r)
        r["site"] = "" if r["site"] is None else " ".join(f"{x:.4f}" for x in r["site"])
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(out / "summary.csv", buf.getvalue())
    return {"summary.json": out / "summary.json", "summary.csv": out / "summary.csv"}


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def format_answers(answers: Sequence[SystemAnswer]) -> str:
    """Markdown table: system, lowest E_ads (eV), source, placement, site, anomaly-free."""
    lines = ["| system | E_ads (eV) | from | placement | site | anomaly-free | E_ads ML (eV) | valid/placements |",
             "|---|---|---|---|---|---|---|---|"]
    for a in answers:
        lines.append(f"| {a.system_id} | {_f(a.e_ads)} | {a.source or '–'} | {a.config_id or '–'} | "
                     f"{a.site_kind or '–'} | {'yes' if a.anomaly_free else 'no (' + str(a.anomaly) + ')'} | "
                     f"{_f(a.e_ads_ml)} | {a.n_anomaly_free}/{a.n_placements} |")
    return "\n".join(lines)
