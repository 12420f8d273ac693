"""ASE calculator for EquiformerV2 checkpoints.

``EquiformerV2Calculator`` follows the ASE conventions: ``implemented_properties`` (energy,
free_energy = energy, forces, and stress for checkpoints with a stress head; only energy for an
energy-only checkpoint such as the direct IS2RE model), raw forces (ASE
applies ``FixAtoms``), stress in Voigt order (xx, yy, zz, yz, xz, xy) in eV/Å³, results cached
until positions, numbers, cell or pbc change. It evaluates one structure per call;
:meth:`EquiformerV2Calculator.predict_batch` packs many structures into batches under an
atom/edge budget.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from eqv2_calc.batching import DEFAULT_MAX_ATOMS, DEFAULT_MAX_EDGES, Budget, is_out_of_memory
from eqv2_calc.errors import CheckpointError, InputError
from eqv2_calc.graph.batch import AtomsBatch, atoms_to_batch, check_atoms
from eqv2_calc.graph.neighbors import Graph
from eqv2_calc.potential import EquiformerV2Potential, load_potential


def default_checkpoint() -> str:
    """The model shipped with the package (see :func:`eqv2_calc.checkpoint.registry.shipped_checkpoint`)."""
    from eqv2_calc.checkpoint.registry import shipped_checkpoint

    return str(shipped_checkpoint())


class EquiformerV2Calculator(Calculator):
    """ASE calculator running an EquiformerV2 checkpoint.

    Parameters
    ----------
    checkpoint_path: a fairchem EquiformerV2 checkpoint file.
    model_name: an official name (see ``eqv2_calc.OFFICIAL_CHECKPOINTS``), downloaded to the cache.
    device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
    dtype: "float32" (like fairchem) or "float64".
    use_ema: use the checkpoint's EMA weights instead of ``state_dict``.
    trust_checkpoint: also load a file whose pickle holds objects beyond the safe allow-list
        (full unpickling can run code from the file; only for files you trust). Without it
        such a file raises :class:`~eqv2_calc.errors.CheckpointError`.
    tune_allocator: opt-in (default False): call :func:`eqv2_calc.runtime.tune_allocator`, a
        process-wide, irreversible glibc malloc setting. The model no longer needs it for
        speed (it keeps its temporaries small and reused); the ``eqv2``/``adsorbml`` CLIs set it.

    Results: ``energy`` / ``free_energy`` in eV (meaning: ``calc.metadata["energy_convention"]``),
    ``forces`` [N, 3] in eV/Å, unconstrained; for checkpoints with a stress head (the materials
    models) also ``stress``: Voigt 6 (xx, yy, zz, yz, xz, xy) in eV/Å³ with ASE's sign convention
    (negative when compressed; pressure = −trace/3), predicted directly by the model. Stress is
    defined for structures periodic in all three directions: it is computed whenever the
    structure is, and asking for it otherwise raises :class:`~eqv2_calc.errors.InputError`.
    A checkpoint without a force head (``regress_forces=False``: the direct IS2RE model
    ``EquiformerV2-IS2RE-ODAC``) predicts the relaxed energy from the initial structure only:
    ``implemented_properties`` is ``("energy",)``, and asking for forces (or the force-consistent
    ``free_energy``) raises ``PropertyNotImplementedError`` saying so.
    """

    implemented_properties = ("energy", "free_energy", "forces")
    """Without a stress head; an instance whose checkpoint has one also lists ``stress``, one
    without a force head lists only ``energy``."""

    def __init__(
        self,
        checkpoint_path: str | os.PathLike | None = None,
        model_name: str | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        use_ema: bool = False,
        potential: EquiformerV2Potential | None = None,
        tune_allocator: bool = False,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if tune_allocator:
            from eqv2_calc.runtime import tune_allocator as _tune

            _tune()
        if potential is None:
            if checkpoint_path is not None and model_name is not None:
                raise CheckpointError("give either checkpoint_path or model_name, not both")
            source = checkpoint_path if checkpoint_path is not None else model_name
            potential = load_potential(source or default_checkpoint(), device=device, dtype=dtype, use_ema=use_ema,
                                       trust_checkpoint=trust_checkpoint)
        self.potential = potential
        props = type(self).implemented_properties if potential.provides_forces else ("energy",)
        if potential.provides_stress:
            self.implemented_properties = (*props, "stress")
        elif not potential.provides_forces:
            self.implemented_properties = props

    def get_property(self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True) -> Any:
        """ASE's ``get_property``; for an energy-only checkpoint, forces and free_energy raise
        ``PropertyNotImplementedError`` with the reason (ASE's own message names no reason)."""
        if name in ("forces", "free_energy") and not self.potential.provides_forces:
            from ase.calculators.calculator import PropertyNotImplementedError

            what = "calc.get_forces()" if name == "forces" else "'free_energy' (the force-consistent energy)"
            try:
                self.potential.require_forces(what)
            except InputError as exc:
                raise PropertyNotImplementedError(str(exc)) from None
        return super().get_property(name, atoms, allow_calculation)

    @property
    def metadata(self) -> dict[str, Any]:
        """Architecture, energy convention, cutoff (Å), max_neighbors, checkpoint sha256, ..."""
        meta = self.potential.meta.to_dict() if self.potential.meta is not None else {}
        meta["device"] = str(self.potential.device)
        meta["dtype"] = str(self.potential.model.dtype).replace("torch.", "")
        return meta

    def calculate(
        self, atoms: Atoms | None = None, properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        Calculator.calculate(self, atoms, properties, system_changes)
        batch = atoms_to_batch([self.atoms], self.potential.device)
        with_stress = self.potential.provides_stress and bool(batch.pbc.all())
        if properties is not None and "stress" in properties and not with_stress:
            if self.potential.provides_stress:
                self.potential.check_stress_pbc(batch)  # raises: not periodic in 3-D
            from ase.calculators.calculator import PropertyNotImplementedError

            raise PropertyNotImplementedError("stress: this checkpoint has no stress head")
        if self.potential.provides_forces:
            out = self.potential(batch, stress=with_stress)
        else:  # an energy-only checkpoint (potential(batch) refuses: its callers need forces)
            out = self.potential.evaluate(batch, self.potential.graph(batch), stress=with_stress)
        e = float(out[0][0])
        self.results = {"energy": e}
        if out[1] is not None:
            self.results.update(free_energy=e, forces=out[1].cpu().numpy())
        if with_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out[2][0].cpu().numpy())

    def predict_batch(
        self,
        atoms_list: Sequence[Atoms],
        max_atoms: int | None = DEFAULT_MAX_ATOMS,
        max_edges: int | None = DEFAULT_MAX_EDGES,
        progress: bool = False,
        stress: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Energies and forces (and stresses) of many structures, evaluated in packed batches.

        Structures are grouped in input order so that each model call holds at most
        ``max_atoms`` atoms and ``max_edges`` edges (defaults 4096 and 100 000; None =
        unlimited; a single larger structure runs alone).
        Returns one dict per structure: ``energy`` (float, eV), ``forces`` ((n, 3) array, eV/Å;
        absent for an energy-only checkpoint) and, for a checkpoint with a stress head,
        ``stress`` (Voigt 6 array (xx, yy, zz, yz, xz, xy), eV/Å³, as ``calc.results["stress"]``)
        for every structure periodic in 3-D.
        ``stress``: None (default) = as just said; True = required (InputError for a checkpoint
        without a stress head or a structure not periodic in 3-D); False = not computed.
        """
        return predict_batch(self.potential, atoms_list, max_atoms, max_edges, progress, stress=stress)


def predict_batch(
    potential: EquiformerV2Potential,
    atoms_list: Sequence[Atoms],
    max_atoms: int | None = DEFAULT_MAX_ATOMS,
    max_edges: int | None = DEFAULT_MAX_EDGES,
    progress: bool = False,
    stress: bool | None = None,
) -> list[dict[str, Any]]:
    """See :meth:`EquiformerV2Calculator.predict_batch`.

    Graphs are built structure by structure and evaluated as soon as the next structure would
    overflow the budget, so at most one budget's worth of graphs is alive at a time. An
    out-of-memory error splits the chunk in halves (a single structure that does not fit
    alone re-raises it).
    """
    budget = Budget(max_atoms, max_edges)
    atoms_list = list(atoms_list)
    for i, a in enumerate(atoms_list):  # all input errors before any work
        if not isinstance(a, Atoms):
            raise InputError(f"structure {i} is a {type(a).__name__}, expected ase.Atoms")
        check_atoms(a, i)
    provides_stress = bool(getattr(potential, "provides_stress", False))
    if stress:
        if not provides_stress:
            raise InputError("stress=True: this checkpoint has no stress head (only the materials models have one)")
        for i, a in enumerate(atoms_list):
            if not all(a.pbc):
                raise InputError(f"structure {i}: stress is defined only for structures periodic in all three "
                                 f"directions (pbc={a.pbc.tolist()})")
    with_stress = provides_stress if stress is None else bool(stress)
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    pending: list[tuple[AtomsBatch, Graph]] = []
    atoms = edges = 0
    with tqdm(total=len(atoms_list), disable=not progress, desc="eqv2 predict", unit="struct") as bar:
        for i, a in enumerate(atoms_list):
            batch = atoms_to_batch([a], potential.device)
            try:
                potential.check_numbers(batch.numbers)
                graph = potential.graph(batch)
            except InputError as exc:
                raise type(exc)(f"structure {i}: {exc}") from exc
            n, e = len(a), int(graph.num_edges[0])
            if pending and not budget.fits(atoms + n, edges + e):
                results += _evaluate_chunk(potential, pending, with_stress)
                bar.update(len(pending))
                pending, atoms, edges = [], 0, 0
            pending.append((batch, graph))
            atoms, edges = atoms + n, edges + e
        if pending:
            results += _evaluate_chunk(potential, pending, with_stress)
            bar.update(len(pending))
    return results


def _evaluate_chunk(
    potential: EquiformerV2Potential, parts: list[tuple[AtomsBatch, Graph]], with_stress: bool = False
) -> list[dict[str, Any]]:
    """Evaluate single-structure (batch, graph) pairs in one model call; halve on out-of-memory.
    With ``with_stress``, structures periodic in 3-D also get their ``stress`` (Voigt 6, eV/Å³)."""
    batch = AtomsBatch.concat([b for b, _ in parts])
    graph = Graph.concat([g for _, g in parts], [b.num_atoms for b, _ in parts])
    periodic = batch.pbc.bool().all(dim=1).cpu().numpy()
    with_stress = with_stress and bool(periodic.any())
    try:
        out = potential.evaluate(batch, graph, stress=True) if with_stress else potential.evaluate(batch, graph)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
        if len(parts) == 1 or not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(parts) // 2
        return (_evaluate_chunk(potential, parts[:half], with_stress)
                + _evaluate_chunk(potential, parts[half:], with_stress))
    energy = out[0].cpu().numpy()
    results: list[dict[str, Any]] = [{"energy": float(energy[k])} for k in range(len(parts))]
    if out[1] is not None:  # None: an energy-only checkpoint
        forces, bounds = out[1].cpu().numpy(), batch.atom_bounds()
        for k, res in enumerate(results):
            res["forces"] = forces[bounds[k] : bounds[k + 1]]
    if with_stress:
        stress = out[2].cpu().numpy()
        for k, res in enumerate(results):
            if periodic[k]:
                res["stress"] = full_3x3_to_voigt_6_stress(stress[k])
    return results
