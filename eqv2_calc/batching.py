"""How many structures go into one potential call: the atom/edge budget, and out-of-memory detection.

Used by the calculator's ``predict_batch`` and by the relaxer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eqv2_calc.errors import InputError

DEFAULT_MAX_ATOMS = 4096
"""Default atom budget of one potential call (calculator batches and relaxer). It bounds the
optimizer memory (the L-BFGS history costs about 4.8 kB per atom with ``memory=100``) and,
for GPU models, the activation memory; an out-of-memory error shrinks it at run time."""

DEFAULT_MAX_EDGES = 100_000
"""Default edge budget of ``predict_batch``, which builds every graph anyway. The relaxer
applies an edge budget only when asked (``max_edges=...``): counting edges costs it one
neighbour list per structure."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (incl. the CUDA one), ``MemoryError`` and a
    ``RuntimeError`` whose message contains 'out of memory'."""
    oom_types: tuple[type, ...] = (MemoryError,)
    for name in ("OutOfMemoryError",):
        for mod in (torch, getattr(torch, "cuda", None)):
            t = getattr(mod, name, None) if mod is not None else None
            if isinstance(t, type):
                oom_types += (t,)
    if isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class Budget:
    """Capacity of one potential call: at most ``max_atoms`` atoms and (if the potential
    can count edges) at most ``max_edges`` edges. ``None`` means unlimited. A single
    structure larger than the budget still runs, alone."""

    max_atoms: int | None = DEFAULT_MAX_ATOMS
    max_edges: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_atoms", "max_edges"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{name}={v!r} must be a positive integer or None")

    def fits(self, atoms: int, edges: int) -> bool:
        """Would a batch of ``atoms`` atoms and ``edges`` edges fit?"""
        if self.max_atoms is not None and atoms > self.max_atoms:
            return False
        if self.max_edges is not None and edges > self.max_edges:
            return False
        return True

    def shrink(self, atoms: int, edges: int, floor_atoms: int, floor_edges: int) -> None:
        """Halve the budget relative to a batch (``atoms``/``edges``) that ran out of memory,
        but never below the largest single system (``floor_*``)."""
        self.max_atoms = max(floor_atoms, atoms // 2)
        if edges > 0:
            self.max_edges = max(floor_edges, edges // 2)
