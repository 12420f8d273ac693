"""The one mapping from fairchem state_dict keys to this package's parameter names.

1. Strip every leading ``module.`` (DataParallel / DistributedDataParallel wrappers).
2. Hydra checkpoints: drop ``backbone.``; ``output_heads.energy.`` and ``output_heads.forces.``
   are dropped too (``...energy.energy_block.x`` → ``energy_block.x``).
3. Derived buffers that fairchem saves (many times over) are recomputed here and skipped:
   ``SO3_rotation.*``, ``mappingReduced.*``, ``*.mapping.*``, ``*.expand_index``,
   ``*.balance_degree_weight``, ``distance_expansion.offset``, and ``SO3_grid.*`` — except
   that the S2 grid matrices ``SO3_grid.{L}.{M}.*`` and ``SO3_grid.{L}.{L}.*`` are read by the
   loader and used in place of the recomputed ones (as fairchem does).
Every other key must equal a parameter name of :class:`eqv2_calc.model.EquiformerV2`.
"""

from __future__ import annotations

import re

_HYDRA_PREFIXES = ("backbone.", "output_heads.energy.", "output_heads.forces.")
_DERIVED = re.compile(
    r"(^|\.)(SO3_rotation|mappingReduced|SO3_grid|mapping)\.|(^|\.)(expand_index|balance_degree_weight)$"
    r"|^distance_expansion\.offset$"
)


def strip_prefixes(key: str) -> str:
    """fairchem key → local key (steps 1–2 above)."""
    while key.startswith("module."):
        key = key[len("module.") :]
    for prefix in _HYDRA_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def is_derived(local_key: str) -> bool:
    """True for recomputed buffers (step 3)."""
    return bool(_DERIVED.search(local_key))
