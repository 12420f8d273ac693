"""Training loss and error metrics (OC20 S2EF conventions).

* Energy term: mean over frames of |E_pred − E_ref| / n_atoms (eV/atom), divided by the
  energy scale per atom (so that it is O(1)), times ``energy_coef``.
* Force term ("L2-MAE"): mean over **free** atoms of ‖F_pred − F_ref‖₂ (eV/Å), divided by the
  force scale, times ``force_coef``. Atoms fixed by ``FixAtoms`` are excluded (OC20
  ``train_on_free_atoms``); their forces are meaningless for a relaxation.

Inputs: energies [S] eV, forces [N, 3] eV/Å, natoms [S], free [N] bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    """The loss and its two (already scaled and weighted) terms, as 0-d tensors."""

    total: torch.Tensor
    energy: torch.Tensor
    force: torch.Tensor


def energy_force_loss(
    pred_energy: torch.Tensor, pred_forces: torch.Tensor,
    energy: torch.Tensor, forces: torch.Tensor, natoms: torch.Tensor, free: torch.Tensor,
    energy_coef: float = 1.0, force_coef: float = 1.0,
    energy_scale: float = 1.0, force_scale: float = 1.0,
) -> LossParts:
    """energy_coef · mean_s(|ΔE_s| / n_s) / energy_scale + force_coef · mean_free(‖ΔF_i‖) / force_scale.

    energy_scale in eV/atom, force_scale in eV/Å. With no free atom the force term is 0.
    """
    e_term = ((pred_energy - energy).abs() / natoms.to(pred_energy.dtype)).mean() / energy_scale
    if bool(free.any()):
        f_term = (pred_forces[free] - forces[free]).norm(dim=1).mean() / force_scale
    else:
        f_term = pred_forces.sum() * 0.0
    e_term, f_term = energy_coef * e_term, force_coef * f_term
    return LossParts(total=e_term + f_term, energy=e_term, force=f_term)


class MetricSums:
    """Accumulates error sums over batches; :meth:`result` gives the means.

    Metrics: ``energy_mae_per_atom`` (eV/atom), ``energy_mae`` (eV per frame), ``force_mae``
    (eV/Å, mean |ΔF| over the Cartesian components of free atoms, OC20 ``forces_mae``),
    ``force_l2_mae`` (eV/Å, mean ‖ΔF‖ over free atoms), counts ``frames`` and ``free_atoms``.
    """

    def __init__(self) -> None:
        self.e_atom = self.e_abs = self.f_comp = self.f_l2 = 0.0
        self.frames = self.free_atoms = 0

    def add(self, pred_energy, pred_forces, energy, forces, natoms, free) -> None:
        de = (pred_energy.double() - energy.double()).abs()
        self.e_atom += float((de / natoms.double()).sum())
        self.e_abs += float(de.sum())
        self.frames += int(natoms.shape[0])
        df = (pred_forces.double() - forces.double())[free]
        self.f_comp += float(df.abs().sum())
        self.f_l2 += float(df.norm(dim=1).sum())
        self.free_atoms += int(df.shape[0])

    def result(self) -> dict[str, float]:
        nf, na = max(self.frames, 1), max(self.free_atoms, 1)
        return {
            "energy_mae_per_atom": self.e_atom / nf, "energy_mae": self.e_abs / nf,
            "force_mae": self.f_comp / (3 * na), "force_l2_mae": self.f_l2 / na,
            "frames": self.frames, "free_atoms": self.free_atoms,
        }


__all__ = ["LossParts", "energy_force_loss", "MetricSums"]
