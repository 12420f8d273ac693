"""One AdsorbML system from Python: a thin use of :func:`adsorbml.workflow.run_workflow`.

:func:`run_system` runs the same stages as ``adsorbml run`` (placements → batched ML
relaxation with anomaly verdicts → top-k single points → outputs) for one prepared slab and
one adsorbate, with calculator objects, and returns the system's results in adsorption
energies. The run lives in ``out_dir`` (resumable, as any run directory) or, without one, in a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ase import Atoms

from adsorbml.adsorbates import Adsorbate, as_adsorbate
from adsorbml.anomalies import DEFAULT_CHECKS
from adsorbml.config import RunConfig, SlabSpec
from adsorbml.errors import InputError
from adsorbml.inputs import SlabRecord
from adsorbml.results import SystemResults, energy_scheme, system_results
from adsorbml.store import RunStore
from adsorbml.workflow import RunSummary, run_workflow

__all__ = ["ADSORBML_FMAX", "ADSORBML_STEPS", "SystemRun", "calculator_label", "run_system"]

ADSORBML_FMAX = 0.02  # eV/Å
ADSORBML_STEPS = 300


@dataclass
class SystemRun:
    """:func:`run_system`'s answer: ``results`` (adsorption energies, the answer, per-placement
    data; raw ML energies in ``results.ml``), the ML-relaxed clean slab, and the run's summary
    (``summary.out_dir`` is gone when no ``out_dir`` was given)."""

    results: SystemResults
    relaxed_slab: Atoms
    summary: RunSummary

    @property
    def e_ads(self) -> float | None:
        """The system's answer: lowest anomaly-free E_ads (eV), see :class:`adsorbml.summary.SystemAnswer`."""
        return self.results.answer.e_ads


def calculator_label(calc: Any) -> str:
    """``module:Class`` of a calculator object: its label in the run config."""
    return f"{type(calc).__module__}:{type(calc).__qualname__}"


def run_system(
    slab: SlabRecord,
    adsorbate: "str | Adsorbate",
    ml_calculator: Any,
    *,
    dft_calculator: Any | None = None,
    out_dir: str | os.PathLike | None = None,
    k: int = 5,
    num_random: int = 100,
    heuristic: bool = True,
    seed: int = 0,
    fmax: float = ADSORBML_FMAX,
    steps: int = ADSORBML_STEPS,
    checks: Sequence[str] = DEFAULT_CHECKS,
    references: str | None = None,
    ml_energy_convention: str | None = None,
    max_atoms: int | None = None,
    progress: bool = True,
) -> SystemRun:
    """Run one system (``slab`` from :func:`adsorbml.inputs.prepare_slab`) and return its results.

    ``ml_calculator``: an ``EquiformerV2Calculator`` (batched) or any ASE calculator;
    ``dft_calculator``: if given, single points on the top ``k`` valid placements and on the
    ML-relaxed clean slab (EMT as a stand-in). ``references`` / ``ml_energy_convention``: as in
    :class:`adsorbml.config.RunConfig` (None: the run's defaults). ``fmax`` (eV/Å) and ``steps``
    default to AdsorbML's 0.02 and 300. A DFT single point that raises is recorded (see
    ``results.placements[i].dft_error``), not raised.
    """
    if not isinstance(slab, SlabRecord):
        raise InputError(f"slab must be an adsorbml.inputs.SlabRecord (see prepare_slab), got {type(slab).__name__}")
    cfg = RunConfig(
        slabs=[SlabSpec.of(slab)], adsorbates=[as_adsorbate(adsorbate).name], num_random=num_random,
        heuristic=heuristic, seed=seed, fmax=fmax, steps=steps, k=k, ml_calculator=calculator_label(ml_calculator),
        dft_calculator="none" if dft_calculator is None else calculator_label(dft_calculator),
        checks=list(checks), max_atoms=max_atoms, references=references, ml_energy_convention=ml_energy_convention,
    )
    with tempfile.TemporaryDirectory(prefix="adsorbml-") as tmp:
        directory = Path(out_dir) if out_dir is not None else Path(tmp)
        summary = run_workflow(cfg, directory, ml_calculator=ml_calculator, dft_calculator=dft_calculator,
                               plots=out_dir is not None, progress=progress, log=lambda _msg: None,
                               continue_on_dft_error=True)
        store = RunStore(directory, create=False)
        try:
            (system_id,) = summary.systems
            results = system_results(store, system_id, energy_scheme(store), ground_truth=False)
            relaxed_slab = store.get("slab_ml", slab.slab_id, "slab").toatoms()
        finally:
            store.close()
    return SystemRun(results, relaxed_slab, summary)
