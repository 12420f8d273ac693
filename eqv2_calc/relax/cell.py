"""Batched cell relaxation: ASE's ``FrechetCellFilter`` degrees of freedom on packed batches.

Every system is optimized in *generalized coordinates*, the same as those of
``ase.filters.FrechetCellFilter``: its N atoms plus 3 rows of cell degrees of freedom, i.e.
3N + 9 numbers, on which the L-BFGS of :mod:`eqv2_calc.relax.lbfgs` runs unchanged (the cell
rows take part in the dot products, the history and the ``maxstep`` rescaling like atoms).

Notation per system (row vectors, lattice vectors as rows as everywhere in the package):
``C0`` the reference cell (the input cell), ``C`` the current cell, ``F`` the deformation
gradient with ``C = C0 Fᵀ``, ``r_i`` Cartesian positions, ``c`` = ``exp_cell_factor``
(default: the system's number of atoms), ``σ`` the stress (eV/Å³, ASE sign convention), ``V``
the volume (Å³) and ``p`` the scalar pressure (eV/Å³).

==================  =======================================================================
coordinates         ``x_i = F⁻¹ r_i`` (Å; positions in the reference frame) and
                    ``X = c · log F`` (the matrix logarithm; dimensionless, ``X = 0`` at start)
geometry            ``F = exp(X / c)``, ``C = C0 Fᵀ``, ``r_i = F x_i``; with a ``mask`` ``M``
                    a step is projected as ASE's ``set_positions`` does it:
                    ``F = I + (exp(X / c) − I) ∘ Mᵀ`` and then ``X = c · log F``
virial              ``W = −V (σ + p I)`` (eV); ``hydrostatic_strain``: ``W → tr(W)/3 · I``;
                    ``mask`` ``M``: ``W → W ∘ M`` (elementwise)
atom forces         ``f̃_i = Fᵀ f_i`` (eV/Å; constrained forces, fixed atoms give 0)
cell forces         ``Φ = Dexp(log F)*[W F⁻ᵀ] / c`` (eV), where ``Dexp(A)*`` is the adjoint of
                    the Fréchet derivative of the matrix exponential at ``A`` (=
                    ``Dexp(Aᵀ)``); ``constant_volume``: ``Φ → Φ − tr(Φ)/3 · I``
convergence         ``fmax`` = the largest row norm of ``[f̃_1 .. f̃_N, Φ_1, Φ_2, Φ_3]``
==================  =======================================================================

``(f̃, Φ)`` is the negative gradient of ``E + pV`` with respect to ``(x, X)`` (with
``hydrostatic_strain`` / ``constant_volume`` the projected one), exactly what ASE's
``FrechetCellFilter.get_forces()`` returns, and the convergence test is ASE's optimizer test on
that array. With ``constant_volume`` every L-BFGS step is a combination of traceless cell
forces, so ``tr X`` and hence the volume ``V = V0 · exp(tr X / c)`` stay constant (to rounding),
and with ``hydrostatic_strain`` the cell keeps its shape (``F`` stays a multiple of I).
Fixed atoms (``FixAtoms``, OC20 tag 0) keep their coordinates ``x_i``: they move with the cell,
as in ASE; constraints on single Cartesian components are not supported with a cell filter.

``mask`` (ASE's ``mask`` of the ``UnitCellFilter`` family): 6 Voigt components ``(xx, yy, zz,
yz, xz, xy)`` or a symmetric 3×3 array ``M``, True/1 = relax, False/0 = keep; the virial is
multiplied by it elementwise before the cell forces are formed, and so is the deformation
``Fᵀ − I`` of every step (so a kept component of ``C0⁻¹ C − I`` stays 0). Components of
``exp(X / c)`` that the mask removes (products of free shear components can create them) make
``X`` differ from ``c log F``; like ASE, the optimizer continues from ``X = c log F`` of the
cell it actually set, so each masked step costs a matrix logarithm as well.

The 3×3 matrix functions (exponential, logarithm, Fréchet derivative, inverse, determinant)
are those of :mod:`eqv2_calc.relax.matfun`.

Minimal loop (the engine in :mod:`eqv2_calc.relax.engine` adds in-flight refill, failures, outputs)::

    state = cell_init(pos, numbers, natoms, cell, pbc, free, history_size=100)
    filt = CellFilter()   # e.g. CellFilter(mask=[1, 1, 1, 0, 0, 0])
    for _ in range(steps + 1):
        energy, forces, stress = potential(state.as_atoms_batch(), stress=True)
        cell_set_results(state, energy, forces, stress, filt)
        if bool((cell_system_fmax(state) < fmax).all()):
            break
        cell_lbfgs_step(state, LBFGSParams(), filt)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from eqv2_calc.errors import InputError
from eqv2_calc.relax.lbfgs import (
    HistoryBuffer,
    LBFGSParams,
    LBFGSState,
    lbfgs_displacement,
    lbfgs_init,
    lbfgs_set_results,
    segment_max,
)
from eqv2_calc.relax.matfun import det3, expm, expm_frechet_adjoint, inv3, logm3

CELL_FILTERS: tuple[str, ...] = ("frechet",)
"""Cell filters :func:`~eqv2_calc.relax.relax_batch` accepts as ``cell_filter``."""

CELL_FILTER_OPTIONS: tuple[str, ...] = (
    "exp_cell_factor", "hydrostatic_strain", "constant_volume", "scalar_pressure", "cell_mask",
)
"""Keyword arguments of :func:`~eqv2_calc.relax.relax_batch` that configure the cell filter
(``cell_mask`` is :attr:`CellFilter.mask`, the others have the same name there)."""

VOIGT_COMPONENTS: tuple[str, ...] = ("xx", "yy", "zz", "yz", "xz", "xy")
"""Order of the 6 Voigt components of a cell mask (ASE's stress order)."""

_VOIGT_INDEX = ((0, 5, 4), (5, 1, 3), (4, 3, 2))  # 3×3 position -> Voigt component
_VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # Voigt component -> 3×3 position
_AXES = "xyz"

CellMask = tuple[tuple[bool, bool, bool], tuple[bool, bool, bool], tuple[bool, bool, bool]]
"""A normalized cell mask: 3×3 booleans as nested tuples (rows; True = relax)."""


def normalize_cell_mask(mask: Any) -> CellMask | None:
    """``mask`` as ASE's ``UnitCellFilter``/``FrechetCellFilter`` read it, normalized: 6 Voigt
    components ``(xx, yy, zz, yz, xz, xy)`` (expanded symmetrically) or a symmetric 3×3 array
    (rows = Cartesian x, y, z) of booleans or 0/1; None, or a mask of only True (nothing is
    kept), gives None. Anything else raises :class:`~eqv2_calc.errors.InputError`.

    ASE also takes other numbers and asymmetric 3×3 masks, but then its optimizer follows
    forces that are not the gradient of the motion it allows (it multiplies the virial by ``M``
    and the deformation by ``Mᵀ``, and re-reads the cell coordinates after every step): on 8
    strained EMT crystals ASE's LBFGS converged 1 of 16 such relaxations (shear weights 0.5, an
    upper-triangular mask) in 300 steps, and all 32 with symmetric 0/1 masks. Those are refused
    here."""
    if mask is None:
        return None
    if isinstance(mask, (str, bytes)):
        raise InputError(f"cell_mask={mask!r}: expected 6 Voigt components {VOIGT_COMPONENTS} or a 3×3 array, "
                         "not a string")
    try:
        arr = np.asarray(mask)
    except (TypeError, ValueError) as exc:  # ragged nested sequences
        raise InputError(f"cell_mask={mask!r} is not a rectangular array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise InputError(f"cell_mask must hold booleans (or 0/1), got {arr.dtype} values: {mask!r}")
    if arr.shape == (6,):
        arr = arr[np.array(_VOIGT_INDEX)]
    elif arr.shape != (3, 3):
        raise InputError(
            f"cell_mask has shape {arr.shape}; expected 6 Voigt components {VOIGT_COMPONENTS} "
            "or a 3×3 array (as ASE's FrechetCellFilter(mask=...))"
        )
    if not np.isin(arr, (0, 1)).all():
        raise InputError(
            f"cell_mask entries must be True/1 (relax) or False/0 (keep), got {np.asarray(mask).tolist()}: other weights "
            "make ASE's masked cell filter follow inconsistent forces (it does not converge either)"
        )
    arr = arr.astype(bool)
    if not (arr == arr.T).all():
        raise InputError(
            f"a 3×3 cell_mask must be symmetric (the virial is), got {arr.astype(int).tolist()}: ASE masks the "
            "virial with M but the deformation with Mᵀ, so an asymmetric mask gives inconsistent forces"
        )
    if arr.all():
        return None
    return tuple(tuple(bool(v) for v in row) for row in arr)  # type: ignore[return-value]


def cell_mask_voigt(mask: CellMask | None) -> list[bool]:
    """A normalized mask as its 6 Voigt components ``(xx, yy, zz, yz, xz, xy)`` (None: all True)."""
    return [True] * 6 if mask is None else [bool(mask[i][j]) for i, j in _VOIGT_PAIRS]


def _restricted(mask: CellMask, positions: Sequence[tuple[int, int]] = _VOIGT_PAIRS) -> list[str]:
    """Voigt names (``"xx"``, ..., ``"xy"``) of the components a (symmetric) mask keeps."""
    return [_AXES[i] + _AXES[j] for i, j in positions if not mask[i][j]]


@dataclass(frozen=True)
class CellFilter:
    """Settings of a cell relaxation (names, defaults and meaning as in ``ase.filters.FrechetCellFilter``).

    Attributes
    ----------
    kind:
        ``"frechet"``: log-strain (matrix logarithm of the deformation gradient) cell
        coordinates, the only kind so far.
    exp_cell_factor:
        Scale ``c`` of the cell coordinates ``X = c log F``; the cell forces are divided by it.
        None (default) = the number of atoms of each system (ASE's default).
    hydrostatic_strain:
        Only isotropic deformation: the virial is replaced by ``tr(W)/3 · I``; the cell keeps
        its shape and only its volume relaxes.
    constant_volume:
        The trace of the cell forces is removed: the shape relaxes at fixed volume.
    scalar_pressure:
        External pressure ``p`` in eV/Å³ (1 GPa = 0.006241509 eV/Å³): the enthalpy
        ``E + pV`` is minimized (``RelaxResult.energy`` stays the potential energy ``E``).
    mask:
        Which cell components relax (``relax_batch(..., cell_mask=...)``; ASE's ``mask``):
        6 Voigt components ``(xx, yy, zz, yz, xz, xy)`` or a symmetric 3×3 array, True/1 =
        relax, False/0 = keep. Stored normalized (:func:`normalize_cell_mask`: 3×3 nested
        tuples of bools, None if nothing is kept). Not with ``hydrostatic_strain``; with
        ``constant_volume`` only shear components (yz, xz, xy) may be kept. See the module
        docstring.
    """

    kind: Literal["frechet"] = "frechet"
    exp_cell_factor: float | None = None
    hydrostatic_strain: bool = False
    constant_volume: bool = False
    scalar_pressure: float = 0.0
    mask: CellMask | None = None

    def __post_init__(self) -> None:
        if self.kind not in CELL_FILTERS:
            raise InputError(f"cell_filter={self.kind!r}; expected one of {CELL_FILTERS} (or None)")
        if self.exp_cell_factor is not None and not (
            isinstance(self.exp_cell_factor, (int, float)) and np.isfinite(self.exp_cell_factor)
            and self.exp_cell_factor > 0
        ):
            raise InputError(f"exp_cell_factor={self.exp_cell_factor!r} must be a number > 0 (or None)")
        for name in ("hydrostatic_strain", "constant_volume"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name}={getattr(self, name)!r} must be True or False")
        if not (isinstance(self.scalar_pressure, (int, float)) and np.isfinite(self.scalar_pressure)):
            raise InputError(f"scalar_pressure={self.scalar_pressure!r} eV/Å³ must be a finite number")
        mask = normalize_cell_mask(self.mask)
        object.__setattr__(self, "mask", mask)  # frozen dataclass: the normalized form
        if mask is not None and self.hydrostatic_strain:
            raise InputError(
                f"cell_mask keeps {', '.join(_restricted(mask))} but hydrostatic_strain=True allows only an "
                "isotropic deformation of the whole cell: use one or the other"
            )
        if mask is not None and self.constant_volume and _restricted(mask, [(0, 0), (1, 1), (2, 2)]):
            raise InputError(
                f"cell_mask keeps the normal strain(s) {', '.join(_restricted(mask, [(0, 0), (1, 1), (2, 2)]))}; "
                "with constant_volume=True xx, yy and zz must all be free (the volume constraint moves them "
                "together); fix only shear components (yz, xz, xy)"
            )

    def mask_tensor(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """:attr:`mask` as a [3, 3] tensor of 0/1, or None if nothing is kept."""
        return None if self.mask is None else torch.tensor(self.mask, dtype=dtype, device=device)


@dataclass(kw_only=True)
class CellLBFGSState(LBFGSState):
    """:class:`~eqv2_calc.relax.lbfgs.LBFGSState` of a cell relaxation.

    ``positions`` and ``cell`` are the current Cartesian geometry (what the potential
    evaluates); ``forces``/``energy`` the raw potential results there. The optimizer's
    coordinates are ``undeformed`` (atoms) and ``cell_dof`` (cell); ``r0``/``f0`` hold the atom
    block of the previous step's generalized coordinates and forces (``x`` and ``f̃``, not
    Cartesian positions and raw forces). Extra fields (see the module docstring for symbols):

    ================  ==============  ====================================================
    field             shape / dtype   meaning
    ================  ==============  ====================================================
    undeformed        [N, 3] f64      ``x_i = F⁻¹ r_i``, Å
    ref_cell          [S, 3, 3] f64   ``C0``, the cell at the start, Å
    cell_factor       [S] f64         ``c`` (exp_cell_factor)
    cell_dof          [S, 3, 3] f64   ``X = c log F``
    deform            [S, 3, 3] f64   ``F = exp(X / c)``
    stress            [S, 3, 3] f64   potential stress at the current geometry, eV/Å³
    cell_forces       [S, 3, 3] f64   ``Φ`` at the current geometry, eV
    cell_dof0         [S, 3, 3] f64   ``X`` before the last step
    cell_forces0      [S, 3, 3] f64   ``Φ`` before the last step
    cell_rows         [S, 3] int64    history-buffer rows of the three cell rows
    ================  ==============  ====================================================
    """

    PER_ATOM_FIELDS = LBFGSState.PER_ATOM_FIELDS + ("undeformed",)
    PER_SYSTEM_FIELDS = LBFGSState.PER_SYSTEM_FIELDS + (
        "ref_cell", "cell_factor", "cell_dof", "deform", "stress", "cell_forces", "cell_dof0",
        "cell_forces0", "cell_rows",
    )

    undeformed: torch.Tensor
    ref_cell: torch.Tensor
    cell_factor: torch.Tensor
    cell_dof: torch.Tensor
    deform: torch.Tensor
    stress: torch.Tensor
    cell_forces: torch.Tensor
    cell_dof0: torch.Tensor
    cell_forces0: torch.Tensor
    cell_rows: torch.Tensor

    def generalized_atom_forces(self) -> torch.Tensor:
        """``f̃_i = Fᵀ f_i`` of the constrained forces, [N, 3] eV/Å (as row vectors ``f_i F``)."""
        return torch.einsum("ni,nij->nj", self.constrained_forces(), self.deform[self.system_idx])

    def history_rows(self) -> torch.Tensor:
        """Every history-buffer row this state uses (atoms, then cells), int64."""
        return torch.cat([self.rows, self.cell_rows.reshape(-1)])

    def last_evaluated(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the Cartesian positions [N, 3] and cells [S, 3, 3] at the previous
        step's coordinates ``r0``/``cell_dof0``: where ``forces``/``energy``/``stress`` were
        evaluated when a step was taken since (meaningless for systems with ``iteration == 0``)."""
        f0 = expm(self.cell_dof0 / self.cell_factor[:, None, None])
        pos = torch.einsum("nj,nij->ni", self.r0, f0[self.system_idx])
        cell = self.ref_cell @ f0.transpose(1, 2)
        return pos.detach().cpu().numpy(), cell.detach().cpu().numpy()


def cell_init(
    positions: torch.Tensor,
    numbers: torch.Tensor,
    natoms: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    free: torch.Tensor,
    *,
    history_size: int | None = None,
    history: HistoryBuffer | None = None,
    exp_cell_factor: float | None = None,
) -> CellLBFGSState:
    """A :class:`CellLBFGSState` with empty history for systems not evaluated yet.

    Arguments as for :func:`~eqv2_calc.relax.lbfgs.lbfgs_init`; the reference cell is
    ``cell`` (so ``F = I``, ``X = 0``), ``exp_cell_factor`` None means the number of atoms of
    each system. Every system must be periodic in all three directions. Evaluate the potential
    (with stress) and call :func:`cell_set_results` before the first :func:`cell_lbfgs_step`.
    """
    pbc_t = torch.as_tensor(pbc, dtype=torch.bool)
    if not bool(pbc_t.all()):
        bad = torch.nonzero(~pbc_t.all(dim=1)).flatten().tolist()
        raise InputError(f"cell relaxation needs systems periodic in all 3 directions; systems {bad[:10]} are not")
    base = lbfgs_init(positions, numbers, natoms, cell, pbc, free, history_size=history_size, history=history)
    s, dev = base.num_systems, base.device
    cell_rows = torch.as_tensor(base.history.allocate(3 * s), dtype=torch.long, device=dev).reshape(s, 3)
    factor = (base.natoms.to(torch.float64) if exp_cell_factor is None
              else torch.full((s,), float(exp_cell_factor), dtype=torch.float64, device=dev))
    zeros = torch.zeros(s, 3, 3, dtype=torch.float64, device=dev)
    base_fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LBFGSState)}
    return CellLBFGSState(
        **base_fields,
        undeformed=base.positions.clone(),
        ref_cell=base.cell.clone(),
        cell_factor=factor,
        cell_dof=zeros.clone(),
        deform=torch.eye(3, dtype=torch.float64, device=dev).expand(s, 3, 3).clone(),
        stress=zeros.clone(),
        cell_forces=zeros.clone(),
        cell_dof0=zeros.clone(),
        cell_forces0=zeros.clone(),
        cell_rows=cell_rows,
    )


def frechet_cell_forces(
    stress: torch.Tensor,
    cell: torch.Tensor,
    deform: torch.Tensor,
    log_deform: torch.Tensor,
    cell_factor: torch.Tensor,
    filt: CellFilter,
) -> torch.Tensor:
    """Generalized forces on the cell coordinates ``X = c log F``, [S, 3, 3] eV.

    ``stress`` [S, 3, 3] eV/Å³ (ASE sign), ``cell`` [S, 3, 3] Å, ``deform`` = ``F``,
    ``log_deform`` = ``log F`` = ``X / c``, ``cell_factor`` = ``c`` [S]. See the module
    docstring for the formula (ASE's ``FrechetCellFilter.get_forces`` cell rows).
    """
    volume = det3(cell).abs()[:, None, None]
    eye = torch.eye(3, dtype=stress.dtype, device=stress.device)
    virial = -volume * (stress + filt.scalar_pressure * eye)
    if filt.hydrostatic_strain:
        virial = virial.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / 3.0 * eye
    mask = filt.mask_tensor(stress.dtype, stress.device)
    if mask is not None:
        virial = virial * mask
    grad_f = virial @ inv3(deform).transpose(1, 2)  # -dE/dF at fixed x
    phi = expm_frechet_adjoint(log_deform, grad_f)  # -dE/d(log F)
    if filt.constant_volume:
        phi = phi - phi.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / 3.0 * eye
    return phi / cell_factor[:, None, None]


def cell_set_results(
    state: CellLBFGSState, energy: torch.Tensor, forces: torch.Tensor, stress: torch.Tensor, filt: CellFilter
) -> CellLBFGSState:
    """Store a potential evaluation at the current geometry and compute the cell forces (in
    place; returns ``state``): ``energy`` [S] eV, raw ``forces`` [N, 3] eV/Å, ``stress``
    [S, 3, 3] eV/Å³."""
    lbfgs_set_results(state, energy, forces)
    if stress.shape != (state.num_systems, 3, 3):
        raise InputError(f"potential returned stress {tuple(stress.shape)}; expected ({state.num_systems}, 3, 3)")
    state.stress = stress.to(device=state.device, dtype=torch.float64)
    state.cell_forces = frechet_cell_forces(
        state.stress, state.cell, state.deform, state.cell_dof / state.cell_factor[:, None, None],
        state.cell_factor, filt)
    return state


def cell_system_fmax(state: CellLBFGSState) -> torch.Tensor:
    """ASE's convergence measure per system, [S]: the largest row norm over the generalized
    atom forces (eV/Å, fixed atoms 0) and the three rows of the cell forces (eV)."""
    atoms = segment_max(torch.linalg.vector_norm(state.generalized_atom_forces(), dim=1),
                        state.system_idx, state.num_systems)
    cells = torch.linalg.vector_norm(state.cell_forces, dim=2).amax(dim=1)
    return torch.maximum(atoms, cells)  # NaN propagates


def cell_lbfgs_step(state: CellLBFGSState, params: LBFGSParams, filt: CellFilter | None = None) -> CellLBFGSState:
    """One L-BFGS step of every system in the generalized coordinates (in place; returns
    ``state``): the displacement of :func:`~eqv2_calc.relax.lbfgs.lbfgs_displacement` over the
    N + 3 rows per system, then the new ``F``, cell and Cartesian positions (masked by
    ``filt.mask`` if set: pass the filter given to :func:`cell_set_results`). ``forces``,
    ``stress`` and ``cell_forces`` are stale until the next :func:`cell_set_results`."""
    s = state.num_systems
    dev = state.device
    fa = state.generalized_atom_forces()
    x = torch.cat([state.undeformed, state.cell_dof.reshape(3 * s, 3)])
    fc = torch.cat([fa, state.cell_forces.reshape(3 * s, 3)])
    x0 = torch.cat([state.r0, state.cell_dof0.reshape(3 * s, 3)])
    f0 = torch.cat([state.f0, state.cell_forces0.reshape(3 * s, 3)])
    # fixed atoms: every component of a fixed atom is fixed (single components are rejected upstream)
    free = torch.cat([state.free, torch.ones(3 * s, 3, dtype=torch.bool, device=dev)])
    sys_idx = torch.cat([state.system_idx, torch.arange(s, device=dev).repeat_interleave(3)])
    dx = lbfgs_displacement(state, x, fc, x0, f0, free, sys_idx, state.history_rows(), params)
    n = state.num_atoms
    state.r0, state.f0 = state.undeformed, fa
    state.cell_dof0, state.cell_forces0 = state.cell_dof, state.cell_forces
    mask = None if filt is None else filt.mask_tensor(torch.float64, dev)
    cell_set_coordinates(state, state.undeformed + dx[:n], state.cell_dof + dx[n:].reshape(s, 3, 3), mask=mask)
    state.iteration = state.iteration + 1
    return state


def cell_set_coordinates(
    state: CellLBFGSState, undeformed: torch.Tensor, cell_dof: torch.Tensor, mask: torch.Tensor | None = None
) -> CellLBFGSState:
    """Move every system to the generalized coordinates ``undeformed`` [N, 3] (Å) and
    ``cell_dof`` [S, 3, 3] (in place; returns ``state``): sets ``F = exp(X / c)``, the cell
    ``C0 Fᵀ`` and the positions ``F x_i``. With a [3, 3] ``mask`` ``M``
    (:meth:`CellFilter.mask_tensor`), ``F = I + (exp(X / c) − I) ∘ Mᵀ`` instead and
    ``cell_dof`` becomes ``c log F`` (ASE's ``set_positions`` followed by ``get_positions``).
    Results become stale."""
    state.undeformed = undeformed.to(device=state.device, dtype=torch.float64)
    factor = state.cell_factor[:, None, None]
    cell_dof = cell_dof.to(device=state.device, dtype=torch.float64)
    deform = expm(cell_dof / factor)
    if mask is not None:
        eye = torch.eye(3, dtype=torch.float64, device=state.device)
        deform = eye + (deform - eye) * mask.to(deform).T
        cell_dof = factor * logm3(deform)
    state.cell_dof = cell_dof
    state.deform = deform
    state.cell = state.ref_cell @ state.deform.transpose(1, 2)
    state.positions = torch.einsum("nj,nij->ni", state.undeformed, state.deform[state.system_idx])
    return state
