"""Plots of a run: E_ads per placement for one system (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from adsorbml.ranking import MLResult, rank_valid
from eqv2_calc.io import atomic_write

__all__ = ["plot_system"]


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
