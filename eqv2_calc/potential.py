"""The force-provider interface shared by the calculator's batch API, the relaxer and AdsorbML.

A *potential* maps a packed :class:`~eqv2_calc.graph.AtomsBatch` to per-system energies
and per-atom forces::

    energy, forces = potential(batch)   # energy [S] float64 eV, forces [N, 3] float64 eV/Å
    energy, forces, stress = potential(batch, stress=True)   # if potential.provides_stress:
                                                              # stress [S, 3, 3] float64 eV/Å³

Forces are raw (constraints such as ASE ``FixAtoms`` are not applied). Implementations:
:class:`EquiformerV2Potential` (batched, on the model's device) and :class:`ASEPotential`
(any ASE calculator, structure by structure). :func:`resolve_potential` turns what a user
passes (an ASE calculator, an ``EquiformerV2Calculator``, a potential) into one.

Optional capabilities are explicit class attributes, so callers never test concrete classes:

* ``counts_edges``: :meth:`Potential.count_edges` gives edges per system (edge budgets);
* ``provides_stress``: ``potential(batch, keys, stress=True)`` also returns the stress tensor of
  every system (needed by cell relaxations); :meth:`Potential.require_stress` raises a clear
  :class:`~eqv2_calc.errors.InputError` for a potential without it;
* per-structure state: the relaxer calls :meth:`Potential.attach` when a structure joins a
  batch, passes the structures' keys to ``__call__`` and calls :meth:`Potential.release`
  when it leaves. Stateless potentials ignore all three (the defaults).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Callable, Hashable, Literal, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from eqv2_calc.errors import InputError, UnsupportedElementError
from eqv2_calc.graph.batch import AtomsBatch
from eqv2_calc.graph.neighbors import Graph, radius_graph

if TYPE_CHECKING:
    from eqv2_calc.checkpoint.load import CheckpointMeta
    from eqv2_calc.model import EquiformerV2


class Potential:
    """Base class of force providers: energies [S] (eV) and raw forces [N, 3] (eV/Å) of a batch.

    Subclasses implement :meth:`__call__` and set ``device``; they opt into capabilities by
    setting ``counts_edges = True`` (and implementing :meth:`count_edges`), by setting
    ``provides_stress = True`` (and returning the stress when ``__call__`` is asked for it) or
    by overriding :meth:`attach` / :meth:`release` to keep per-structure state.
    """

    device: torch.device = torch.device("cpu")
    counts_edges: bool = False
    """True if :meth:`count_edges` is implemented (needed for ``max_edges`` budgets)."""
    provides_stress: bool = False
    """True if ``__call__(batch, keys, stress=True)`` returns the stress as a third output
    (needed for cell relaxations). A class may set it per instance (e.g. only for checkpoints
    with a stress head)."""
    provides_forces: bool = True
    """False for a potential that predicts energies only (an EquiformerV2 checkpoint without a
    force head, e.g. the direct IS2RE model): its ``__call__`` raises as :meth:`require_forces`
    does, and :func:`resolve_potential` refuses it."""

    def __call__(
        self, batch: AtomsBatch, keys: Sequence[Hashable] | None = None, *, stress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energies [S] float64 (eV) and forces [N, 3] float64 (eV/Å) on ``batch.device``.

        ``keys`` name the structures of the batch in order (those given to :meth:`attach`),
        or None for structures that were never attached.

        With ``stress=True`` (only if ``provides_stress``; otherwise raise as
        :meth:`require_stress` does) return ``(energy, forces, stress)`` with ``stress``
        [S, 3, 3] float64 in eV/Å³, ASE's sign convention (that of
        ``atoms.get_stress(voigt=False)``: σ = (1/V) ∂E/∂ε, so a compressed crystal has negative
        stress and the pressure is −tr(σ)/3), symmetric. Stress is defined for systems periodic
        in all three directions only; ask for it only for such batches.
        """
        raise NotImplementedError

    def require_stress(self, purpose: str = "this calculation") -> None:
        """Raise :class:`~eqv2_calc.errors.InputError` naming this potential if it does not
        provide stress (``provides_stress`` is False); ``purpose`` says what needed it."""
        if not self.provides_stress:
            raise InputError(
                f"{purpose} needs the stress, but the potential {self!r} does not provide it "
                "(provides_stress=False): use a potential that computes stress (an ASE calculator "
                "with 'stress' in its implemented_properties, such as EMT, or an EquiformerV2 "
                "checkpoint with a stress head), or do without it (e.g. relax positions only, "
                "cell_filter=None / no --relax-cell)"
            )

    def require_forces(self, purpose: str = "this calculation") -> None:
        """Raise :class:`~eqv2_calc.errors.InputError` naming this potential if it gives no forces
        (``provides_forces`` is False); ``purpose`` says what needed them."""
        if not self.provides_forces:
            raise InputError(f"{purpose}: the potential {self!r} gives no forces (provides_forces=False)")

    def __repr__(self) -> str:
        return type(self).__name__

    def count_edges(self, batch: AtomsBatch) -> torch.Tensor:
        """Edges per system [S] (int64); only if ``counts_edges`` is True."""
        raise InputError(
            f"{type(self).__name__} cannot count edges: use an atom budget (max_atoms) instead of max_edges"
        )

    def attach(self, key: Hashable, atoms: Atoms) -> None:
        """A structure ``atoms`` joins under ``key`` (default: nothing to remember)."""

    def release(self, key: Hashable) -> None:
        """The structure ``key`` left for good (default: nothing to forget)."""


SharePolicy = Literal["auto", "share", "copy", "fresh"]
SHARE_POLICIES: tuple[str, ...] = ("auto", "share", "copy", "fresh")


class ASEPotential(Potential):
    """Any ASE calculator as a :class:`Potential`, evaluating the structures one by one on the CPU.

    ``policy`` says which calculator object evaluates each structure:

    * ``"share"``: the given ``calc`` for every structure (file-based and third-party
      calculators: never duplicate a model or clash on files);
    * ``"copy"``: one private deep copy of ``calc`` per structure, kept while it relaxes, so a
      calculator with internal state (EMT's neighbour list with skin) updates incrementally,
      exactly as in a sequential ASE run of that structure;
    * ``"fresh"``: a new calculator for every evaluation (``factory()``, or a deep copy of
      ``calc`` as it was when this object was made): results depend only on the structure,
      bitwise;
    * ``"auto"`` (default): ``"copy"`` for ASE's own in-memory calculators (EMT,
      LennardJones, Morse, ... and subclasses), ``"share"`` for everything else.

    Energies come from ``get_potential_energy()``, forces from ``get_forces(apply_constraint=False)``,
    and with ``stress=True`` stresses from ``get_stress(voigt=False, apply_constraint=False)``
    [S, 3, 3] eV/Å³; ``provides_stress`` is True when ``"stress"`` is in the calculator's
    ``implemented_properties`` (EMT, LennardJones, ...). The batch's geometry is evaluated as it
    is: an attached structure takes the batch's positions and, if it is periodic in 3-D, its cell
    (so a cell relaxation deforms it).
    """

    def __init__(
        self,
        calc: BaseCalculator | None = None,
        policy: SharePolicy = "auto",
        factory: Callable[[], BaseCalculator] | None = None,
    ) -> None:
        if policy not in SHARE_POLICIES:
            raise InputError(f"policy={policy!r}; expected one of {SHARE_POLICIES}")
        if calc is None:
            if factory is None:
                raise InputError("ASEPotential needs an ASE calculator (calc=...) or a factory")
            if policy not in ("auto", "fresh"):
                raise InputError(f"policy={policy!r} needs calc=...; a factory alone means policy='fresh'")
            policy = "fresh"
        elif policy == "auto":
            policy = "copy" if is_ase_in_memory(calc) else "share"
        self.calc = calc
        self.policy: str = policy
        self.device = torch.device("cpu")
        self._template = copy.deepcopy(calc) if policy in ("copy", "fresh") and calc is not None else None
        self._factory = factory
        self._slots: dict[Hashable, Atoms] = {}
        probe = calc if calc is not None else self._new_calculator()
        self.provides_stress = "stress" in tuple(getattr(probe, "implemented_properties", ()))

    def __repr__(self) -> str:
        calc = self.calc if self.calc is not None else self._factory
        name = getattr(calc, "__name__", None) or type(calc).__name__
        return f"ASEPotential({name}, policy={self.policy!r})"

    def _new_calculator(self) -> BaseCalculator:
        if self._factory is not None:
            return self._factory()
        return copy.deepcopy(self._template)

    def attach(self, key: Hashable, atoms: Atoms) -> None:
        """Keep a private copy of ``atoms`` (without constraints) and, with ``policy="copy"``,
        its own calculator while the structure relaxes."""
        mine = atoms.copy()  # keeps tags, masses, magnetic moments, charges, info
        mine.set_constraint()
        mine.calc = self._new_calculator() if self.policy == "copy" else self.calc
        self._slots[key] = mine

    def release(self, key: Hashable) -> None:
        self._slots.pop(key, None)

    def __call__(
        self, batch: AtomsBatch, keys: Sequence[Hashable] | None = None, *, stress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if stress:
            self.require_stress("stress=True")
        pos = batch.positions.detach().cpu().numpy()
        cells = batch.cell.detach().cpu().numpy()
        pbcs = batch.pbc.cpu().numpy()
        if stress and not pbcs.all():
            bad = np.flatnonzero(~pbcs.all(axis=1)).tolist()
            raise InputError(f"stress is defined for systems periodic in all 3 directions only; "
                             f"systems {bad[:10]} of the batch are not")
        bounds = batch.atom_bounds()
        unpacked = None
        energies, forces, stresses = [], [], []
        for s in range(batch.num_systems):
            a, b = bounds[s], bounds[s + 1]
            atoms = self._slots.get(keys[s]) if keys is not None else None
            if atoms is not None:
                # a 3-D periodic cell is taken from the batch (cell relaxations change it); other
                # cells are kept as attached (the batch completes their non-periodic rows)
                if pbcs[s].all() and not np.array_equal(atoms.cell.array, cells[s]):
                    atoms.set_cell(cells[s], scale_atoms=False)
                atoms.set_positions(pos[a:b], apply_constraint=False)
            else:  # not attached: a temporary structure, and no state kept for it
                unpacked = batch.to_atoms() if unpacked is None else unpacked
                atoms = unpacked[s]
                atoms.calc = self.calc if self.policy == "share" else self._new_calculator()
            if self.policy == "fresh":
                atoms.calc = self._new_calculator()
            energies.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces(apply_constraint=False))
            if stress:
                stresses.append(atoms.get_stress(voigt=False, apply_constraint=False))
        out = (
            torch.tensor(energies, dtype=torch.float64, device=batch.device),
            torch.as_tensor(np.concatenate(forces), dtype=torch.float64, device=batch.device),
        )
        if stress:
            return out + (torch.as_tensor(np.stack(stresses), dtype=torch.float64, device=batch.device),)
        return out


def is_ase_in_memory(calc: BaseCalculator) -> bool:
    """ASE's own in-memory calculators (EMT, LennardJones, Morse, ... and subclasses of them)
    are cheap and safe to copy per structure; file-based and third-party calculators are not."""
    from ase.calculators.calculator import FileIOCalculator

    try:
        from ase.calculators.genericfileio import GenericFileIOCalculator
    except ImportError:  # pragma: no cover - old ASE
        GenericFileIOCalculator = FileIOCalculator  # type: ignore[misc,assignment]
    if isinstance(calc, (FileIOCalculator, GenericFileIOCalculator)):
        return False
    base_modules = ("ase.calculators.calculator", "ase.calculators.abc", "ase.calculators.genericfileio")
    for cls in type(calc).__mro__:
        if cls.__module__.startswith("ase.calculators."):
            # the first ASE class in the hierarchy: a concrete ASE calculator, or just a base class?
            return cls.__module__ not in base_modules
    return False


def resolve_potential(obj: Any) -> Potential:
    """Turn what the user passed into a :class:`Potential`.

    Accepted: a :class:`Potential`; an object with a ``potential`` attribute that is one
    (e.g. ``EquiformerV2Calculator``); any ASE calculator (wrapped in :class:`ASEPotential`
    with ``policy="auto"``). A potential without forces (``provides_forces`` False: an
    energy-only checkpoint) raises :class:`~eqv2_calc.errors.InputError`, as every user of
    this interface (the relaxer) needs forces.
    """
    inner = obj if isinstance(obj, Potential) else getattr(obj, "potential", None)
    if isinstance(inner, Potential):
        inner.require_forces("relaxing structures (or any other use of the potential as a force provider)")
        return inner
    if isinstance(obj, BaseCalculator):
        return ASEPotential(obj)
    raise InputError(
        f"cannot use a {type(obj).__name__} as force provider: pass an ASE calculator, an "
        "EquiformerV2Calculator, or an eqv2_calc.potential.Potential subclass"
    )


class EquiformerV2Potential(Potential):
    """A loaded EquiformerV2 as a batched :class:`Potential` on the model's device.

    Builds the radius graph of each system (the checkpoint's cutoff, max_neighbors and strict
    mode), runs the model without autograd and returns float64 energies [S] (eV) and forces
    [N, 3] (eV/Å). Atoms with no neighbour within the cutoff get the model's isolated-atom
    energy and zero force. Stateless; counts edges. ``provides_stress`` is True for checkpoints
    with a stress head (the materials models): ``potential(batch, stress=True)`` then also
    returns the stress [S, 3, 3] (float64, eV/Å³, ASE sign convention) of systems periodic in 3-D.
    ``provides_forces`` is False for a checkpoint without a force head (direct IS2RE): then
    ``potential(batch)`` raises :class:`~eqv2_calc.errors.InputError` and :meth:`evaluate` gives
    the energies with ``forces=None``.
    """

    counts_edges = True

    def __init__(self, model: "EquiformerV2", meta: "CheckpointMeta | None" = None):
        self.model = model
        self.meta = meta
        self.device = model.device
        self.provides_stress = bool(model.cfg.regress_stress)
        self.provides_forces = bool(model.cfg.regress_forces)

    def require_forces(self, purpose: str = "this calculation") -> None:
        """Raise :class:`~eqv2_calc.errors.InputError` if the checkpoint has no force head, saying why."""
        if not self.provides_forces:
            what = self.meta.path if self.meta is not None else "this model"
            raise InputError(
                f"{purpose}: {what} is an energy-only model (direct IS2RE, regress_forces=False: no force head); "
                "it predicts the relaxed energy from the initial structure and gives no forces. Use its energies "
                "(calc.get_potential_energy(), predict_batch), or an S2EF checkpoint for forces and relaxations "
                "(e.g. EquiformerV2-S2EF-ODAC)"
            )

    @property
    def cutoff(self) -> float:
        return self.model.cfg.max_radius

    def check_numbers(self, numbers: torch.Tensor) -> None:
        """Raise :class:`UnsupportedElementError` for atomic numbers the model has no embedding for."""
        zmax = self.model.cfg.max_num_elements
        bad = (numbers < 1) | (numbers >= zmax)
        if bool(bad.any()):
            z = sorted(set(numbers[bad].tolist()))
            raise UnsupportedElementError(
                f"atomic numbers {z} are outside this model's range 1..{zmax - 1} (max_num_elements={zmax})"
            )

    def graph(self, batch: AtomsBatch) -> Graph:
        """The model's neighbour graph of ``batch``."""
        cfg = self.model.cfg
        return radius_graph(
            batch, cfg.max_radius, cfg.max_neighbors, cfg.enforce_max_neighbors_strictly, cfg.use_pbc
        )

    def count_edges(self, batch: AtomsBatch) -> torch.Tensor:
        """Edges per system [S] (int64), for batching under an edge budget."""
        return self.graph(batch).num_edges

    @torch.inference_mode()
    def evaluate(
        self, batch: AtomsBatch, graph: Graph, stress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Energies [S] and forces [N, 3] (float64, eV and eV/Å) for a batch and its graph; with
        ``stress=True`` (a stress head is needed) also the stress [S, 3, 3] (float64, eV/Å³) of
        every system — meaningful only for systems periodic in 3-D, which this does not check.
        The forces are None for a checkpoint without a force head (``provides_forces`` False)."""
        self.check_numbers(batch.numbers)
        if stress:
            self._require_stress_head()
        out = self.model(
            batch.numbers, graph.src, graph.dst, graph.vec,
            batch.system_idx, batch.num_systems, stress=stress,
        )
        energy = out[0].double()
        forces = None if out[1] is None else out[1].double()
        if stress:
            return energy, forces, out[2].double()
        return energy, forces

    def _require_stress_head(self) -> None:
        if not self.provides_stress:
            what = self.meta.path if self.meta is not None else "this model"
            raise InputError(
                f"stress was requested, but {what} has no stress head (provides_stress=False); only the "
                "materials checkpoints (OMat24, MPtrj, sAlex, DeNS) predict stress"
            )

    @staticmethod
    def check_stress_pbc(batch: AtomsBatch) -> None:
        """Raise :class:`InputError` unless every system of ``batch`` is periodic in all three directions."""
        pbc = batch.pbc.bool().all(dim=1)
        if not bool(pbc.all()):
            bad = torch.nonzero(~pbc).flatten().tolist()
            raise InputError(
                f"stress is defined only for systems periodic in all three directions; system(s) {bad[:10]} "
                f"of the batch have pbc {batch.pbc[bad[0]].tolist()} (a slab needs pbc=True with vacuum in "
                "its cell, a molecule has no stress)"
            )

    def __call__(
        self, batch: AtomsBatch, keys: Sequence[Hashable] | None = None, *, stress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.require_forces("potential(batch) (energies and forces)")
        batch = batch.as_atoms_batch().to(self.device)
        if stress:
            self._require_stress_head()
            self.check_stress_pbc(batch)
        return self.evaluate(batch, self.graph(batch), stress=stress)


def load_potential(
    path_or_name: "str | os.PathLike",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    use_ema: bool = False,
    trust_checkpoint: bool = False,
) -> EquiformerV2Potential:
    """Load a checkpoint (file or official name) as a batched potential; see :func:`load_model`
    (``trust_checkpoint``: also load files beyond the safe unpickling allow-list)."""
    from eqv2_calc.checkpoint import load_model

    model, meta = load_model(path_or_name, device=resolve_device(device), dtype=resolve_dtype(dtype), use_ema=use_ema,
                             trust_checkpoint=trust_checkpoint)
    return EquiformerV2Potential(model, meta)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None → CUDA if available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """"float32"/"float64" (or torch dtypes) → torch dtype."""
    table = {"float32": torch.float32, "float64": torch.float64, "fp32": torch.float32, "fp64": torch.float64}
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        return dtype
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
