"""AdsorbML workflow: placements → batched ML relaxations → anomaly filters → ranking →
top-k export for DFT single points → success and speedup metrics.

Stages live in submodules (import what you need; heavy dependencies such as pymatgen are
only imported by the stages that use them):

* :mod:`adsorbml.inputs` — slabs (file, Atoms, or bulk + Miller index) with OC20 tags.
* :mod:`adsorbml.adsorbates` — built-in adsorbate table and binding atoms.
* :mod:`adsorbml.placements` — heuristic and random placements, seeded.
* :mod:`adsorbml.anomalies` — desorption, dissociation, surface change, intercalation.
* :mod:`adsorbml.ranking` — ML-relaxed placements (``MLResult``) and their ranking.
* :mod:`adsorbml.references`, :mod:`adsorbml.energies` — gas references, energy conventions,
  adsorption energies.
* :mod:`adsorbml.config` — run settings (``RunConfig``, ``SlabSpec``).
* :mod:`adsorbml.calculators` — ML and DFT calculators from their names.
* :mod:`adsorbml.store`, :mod:`adsorbml.records` — the resumable ase.db store of a run
  directory, and its rows ↔ domain objects.
* :mod:`adsorbml.stages` — the stages: slabs, placements, relaxations with verdicts, single points.
* :mod:`adsorbml.workflow` — ``run_workflow``: the one orchestrator of the stages (``adsorbml run``).
* :mod:`adsorbml.pipeline` — ``run_system``: one system from Python, through ``run_workflow``.
* :mod:`adsorbml.single_points` — in-process DFT single points with any ASE calculator.
* :mod:`adsorbml.results`, :mod:`adsorbml.summary` — a system's results in adsorption energies
  and its answer (lowest E_ads).
* :mod:`adsorbml.outputs`, :mod:`adsorbml.plots` — the output files of a run directory.
* :mod:`adsorbml.export`, :mod:`adsorbml.vasp_import`, :mod:`adsorbml.dft_import` — top-k VASP
  inputs, and finished VASP single points read back into a run.
* :mod:`adsorbml.metrics`, :mod:`adsorbml.formats` — success@k, speedup; the OC20-Dense files.
* :mod:`adsorbml.reuse` — another run's ground truth copied into a new run (compare ML models on it).
* :mod:`adsorbml.cli` — ``adsorbml run | export | import | metrics | demo`` (entry point ``adsorbml.cli:main``).

Units: energies eV, lengths Å, forces eV/Å.
"""

from adsorbml.errors import AdsorbMLError, FormatError, InputError, PlacementError, UnknownAdsorbateError

__all__ = ["AdsorbMLError", "FormatError", "InputError", "PlacementError", "UnknownAdsorbateError"]
