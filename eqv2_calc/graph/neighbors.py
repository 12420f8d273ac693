"""Periodic radius graph with EquiformerV2's max-neighbour rule.

Candidate pairs come from vesin-torch cell lists (CPU and CUDA; memory linear in the number
of atoms; periodic, non-periodic and mixed pbc; any number of periodic images, so a 1×1
surface cell works). Each system is searched on its own, so batching never changes a graph.

Selection per centre atom i, as fairchem 1.x defines it:

* keep pairs with 1e-4 Å² < d² ≤ cutoff² (self-images of small cells are neighbours);
* if ``max_neighbors`` is exceeded, sort the neighbours of i by d²;
  - strict: keep the ``max_neighbors`` nearest;
  - non-strict: keep every neighbour with d² ≤ d²_(k+1) + 0.01 Å², where d²_(k+1) is the
    (max_neighbors+1)-th smallest (so at least max_neighbors+1 survive).

Exact ties in strict mode are broken deterministically by (neighbour index, image shift);
fairchem breaks them with an unstable sort, which no other code can reproduce.

Edge convention: ``src`` = neighbour j, ``dst`` = centre i, ``vec`` = r_j + shift·cell − r_i,
computed in float64. Edges are ordered by centre, then distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from vesin_torch import NeighborList

from eqv2_calc.errors import InputError
from eqv2_calc.graph.batch import MIN_DISTANCE, AtomsBatch

NONSTRICT_TOLERANCE = 0.01
"""Å², added to the (k+1)-th squared distance in non-strict mode (fairchem's degeneracy tolerance)."""

SELF_DISTANCE_SQ = 1e-4
"""Å²; pairs at or below this squared distance are not edges (fairchem)."""


@dataclass
class Graph:
    """Edges of a batch: src/dst [E] int64 (global atom indices), vec [E, 3] float64 Å,
    shifts [E, 3] int64 (lattice translations), num_edges [S] int64 per system."""

    src: torch.Tensor
    dst: torch.Tensor
    vec: torch.Tensor
    shifts: torch.Tensor
    num_edges: torch.Tensor

    @classmethod
    def concat(cls, graphs: Sequence["Graph"], num_atoms: Sequence[int]) -> "Graph":
        """Graphs of consecutive batches (``num_atoms[k]`` atoms in part k) as one graph."""
        offsets = np.cumsum([0] + [int(n) for n in num_atoms[:-1]])
        return cls(
            src=torch.cat([g.src + int(o) for g, o in zip(graphs, offsets)]),
            dst=torch.cat([g.dst + int(o) for g, o in zip(graphs, offsets)]),
            vec=torch.cat([g.vec for g in graphs]),
            shifts=torch.cat([g.shifts for g in graphs]),
            num_edges=torch.cat([g.num_edges for g in graphs]),
        )

    def select(self, systems: Sequence[int] | np.ndarray, natoms: torch.Tensor) -> "Graph":
        """Edges of ``systems`` (in that order), re-indexed like ``AtomsBatch.select``;
        ``natoms`` [S] are the atoms per system of the batch this graph belongs to."""
        sys_np = np.asarray(systems, dtype=np.int64).reshape(-1)
        nat = natoms.cpu().numpy()
        ne = self.num_edges.cpu().numpy()
        a_off, e_off = np.cumsum(nat) - nat, np.cumsum(ne) - ne
        new_a_off = np.cumsum(nat[sys_np]) - nat[sys_np]
        rows = np.concatenate([np.arange(e_off[s], e_off[s] + ne[s]) for s in sys_np]) if len(sys_np) else []
        shift = np.repeat(new_a_off - a_off[sys_np], ne[sys_np])  # new index - old index, per edge
        dev = self.src.device
        rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=dev)
        shift_t = torch.as_tensor(shift, dtype=torch.long, device=dev)
        return Graph(src=self.src[rows_t] + shift_t, dst=self.dst[rows_t] + shift_t, vec=self.vec[rows_t],
                     shifts=self.shifts[rows_t],
                     num_edges=self.num_edges[torch.as_tensor(sys_np, dtype=torch.long, device=dev)])


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting by keys[0], then keys[1], ... (stable sorts, least significant first)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _select_max_neighbors(
    centre: torch.Tensor, d2: torch.Tensor, num_atoms: int, max_neighbors: int, strict: bool
) -> torch.Tensor:
    """Boolean mask over pairs already sorted by (centre, d2)."""
    counts = torch.bincount(centre, minlength=num_atoms)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(centre.shape[0], device=centre.device) - starts[centre]
    if strict:
        return rank < max_neighbors
    over = counts > max_neighbors
    kth = torch.full((num_atoms,), float("inf"), dtype=d2.dtype, device=d2.device)
    kth[over] = d2[starts[over] + max_neighbors] + NONSTRICT_TOLERANCE
    return d2 <= kth[centre]


def system_graph(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    cutoff: float,
    max_neighbors: int | None,
    strict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graph of one system: (src [E], dst [E], vec [E, 3] float64 Å, shifts [E, 3] int64).

    positions [n, 3] Å, cell [3, 3] (rows = lattice vectors), pbc [3] bool.
    """
    pos = positions.to(torch.float64)
    cell = cell.to(torch.float64)
    nl = NeighborList(cutoff=cutoff * (1 + 1e-9), full_list=True)
    i, j, shift = nl.compute(pos, cell, pbc.to(torch.bool), quantities="ijS")
    shift = shift.to(torch.long)
    vec = pos[j] - pos[i] + shift.to(torch.float64) @ cell
    d2 = (vec * vec).sum(1)
    too_close = d2 < MIN_DISTANCE**2
    if bool(too_close.any()):
        k = int(torch.nonzero(too_close)[0, 0])
        raise InputError(
            f"atoms {int(i[k])} and {int(j[k])} are {float(d2[k].sqrt()):.4f} Å apart "
            f"(minimum {MIN_DISTANCE} Å): overlapping atoms or a too small cell"
        )
    keep = (d2 > SELF_DISTANCE_SQ) & (d2 <= cutoff * cutoff)
    i, j, shift, vec, d2 = i[keep], j[keep], shift[keep], vec[keep], d2[keep]
    num_atoms = pos.shape[0]
    order = _lexsort([i, d2, j, shift[:, 0], shift[:, 1], shift[:, 2]])
    i, j, shift, vec, d2 = i[order], j[order], shift[order], vec[order], d2[order]
    if max_neighbors is not None and max_neighbors > 0 and i.numel() > 0:
        mask = _select_max_neighbors(i, d2, num_atoms, max_neighbors, strict)
        i, j, shift, vec = i[mask], j[mask], shift[mask], vec[mask]
    return j, i, vec, shift


def radius_graph(
    batch: AtomsBatch,
    cutoff: float,
    max_neighbors: int | None = None,
    strict: bool = True,
    use_pbc: bool = True,
) -> Graph:
    """Radius graph of every system in ``batch`` (see module docstring); cutoff in Å.

    ``use_pbc=False`` ignores the batch's periodicity (non-periodic model).
    """
    if cutoff <= 0:
        raise InputError(f"cutoff must be positive, got {cutoff}")
    bounds = batch.atom_bounds()
    parts = []
    for s in range(batch.num_systems):
        a, b = int(bounds[s]), int(bounds[s + 1])
        pbc = batch.pbc[s] if use_pbc else torch.zeros_like(batch.pbc[s])
        src, dst, vec, shift = system_graph(
            batch.positions[a:b], batch.cell[s], pbc, cutoff, max_neighbors, strict
        )
        num_edges = torch.tensor([src.shape[0]], dtype=torch.long, device=src.device)
        parts.append(Graph(src=src, dst=dst, vec=vec, shifts=shift, num_edges=num_edges))
    return Graph.concat(parts, np.diff(bounds).tolist())
