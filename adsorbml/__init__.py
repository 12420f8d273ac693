"""AdsorbML workflow: placements → batched ML relaxations → anomaly filters → ranking →
top-k export for DFT single points → success and speedup metrics.

Stages live in submodules (import what you need; heavy dependencies such as pymatgen are
only imported by the stages that use them):

* :mod:`adsorbml.inputs` — slabs (file, Atoms, or bulk + Miller index) with OC20 tags.
* :mod:`adsorbml.adsorbates` — built-in adsorbate table and binding atoms.
* :mod:`adsorbml.placements` — heuristic and random placements, seeded.
* :mod:`adsorbml.anomalies` — desorption, dissociation, surface change, intercalation.
* :mod:`adsorbml.export` — ranking, VASP/extxyz top-k export, VASP import.
* :mod:`adsorbml.metrics` — OC20-Dense formats, success@k, speedup.
* :mod:`adsorbml.pipeline` — one system end to end in memory (``run_system``).
* :mod:`adsorbml.store` — the resumable ase.db store of a run directory.
* :mod:`adsorbml.workflow` — ``run_workflow``: the resumable run (many systems, ground truth,
  OC20-Dense output files, plots), ``export_run``.
* :mod:`adsorbml.cli` — ``adsorbml run | export | metrics | demo`` (entry point ``adsorbml.cli:main``).

Units: energies eV, lengths Å, forces eV/Å.
"""

from adsorbml.errors import AdsorbMLError, FormatError, InputError, PlacementError, UnknownAdsorbateError

__all__ = ["AdsorbMLError", "FormatError", "InputError", "PlacementError", "UnknownAdsorbateError"]
