"""The one mapping from fairchem state_dict keys to this package's parameter names.

1. Strip every leading ``module.`` (DataParallel / DistributedDataParallel wrappers).
2. Hydra checkpoints: drop ``backbone.``; the keys of each output head
   ``output_heads.<head>.<attribute>.*`` map by the head's role (energy, forces or stress, from
   its module name in the config; by default the head names ``energy``, ``forces``, ``stress``):

   * energy: ``energy_block`` (EqV2ScalarHead, early DeNS heads) or ``scalar_block`` (DeNS in
     fairchem 1.x) → ``energy_block``;
   * forces: ``force_block`` (EqV2VectorHead, early DeNS heads) or ``vector_block`` (DeNS in
     fairchem 1.x) → ``force_block``; DeNS ``denoising_pos_block`` → ignored;
   * stress: ``sphharm_norm``, ``xedge_layer_norm``, ``block`` → ``stress_head.sphharm_norm`` ...

   (``...energy.energy_block.x`` → ``energy_block.x``). ``denoising_pos_block`` predicts the
   noise of corrupted positions during DeNS training; at inference fairchem multiplies it by
   zero, so it is not loaded (:func:`is_ignored`).
3. DeNS backbones: ``force_embedding.*`` and ``noise_schedule_sigma_embedding.*`` encode the
   forces / noise level of corrupted inputs during training; at inference their inputs are
   zero and only their biases act, adding a constant to the l = 0 embedding. The loader folds
   those biases into ``sphere_embedding.weight`` (:func:`is_folded`), which is exact.
4. Derived buffers that fairchem saves (many times over) are recomputed here and skipped:
   ``SO3_rotation.*``, ``mappingReduced.*``, ``*.mapping.*``, ``*.expand_index``,
   ``*.balance_degree_weight``, ``distance_expansion.offset``, and ``SO3_grid.*`` — except
   that the S2 grid matrices ``SO3_grid.{L}.{M}.*`` and ``SO3_grid.{L}.{L}.*`` are read by the
   loader and used in place of the recomputed ones (as fairchem does).
Every other key must equal a parameter name of :class:`eqv2_calc.model.EquiformerV2`.
"""

from __future__ import annotations

import re

HEAD_ATTRIBUTES: dict[str, dict[str, str]] = {
    "energy": {"energy_block": "energy_block", "scalar_block": "energy_block"},
    "forces": {"force_block": "force_block", "vector_block": "force_block",
               "denoising_pos_block": "denoising_pos_block"},
    "stress": {"sphharm_norm": "stress_head.sphharm_norm", "xedge_layer_norm": "stress_head.xedge_layer_norm",
               "block": "stress_head.block"},
}
"""Role → {fairchem head attribute: local prefix}."""
DEFAULT_HEAD_ROLES = {"energy": "energy", "forces": "forces", "stress": "stress"}
_IGNORED = ("denoising_pos_block.",)
_FOLDED = ("force_embedding.", "noise_schedule_sigma_embedding.")
_DERIVED = re.compile(
    r"(^|\.)(SO3_rotation|mappingReduced|SO3_grid|mapping)\.|(^|\.)(expand_index|balance_degree_weight)$"
    r"|^distance_expansion\.offset$"
)


def strip_prefixes(key: str, head_roles: dict[str, str] | None = None) -> str:
    """fairchem key → local key (steps 1–2 above). ``head_roles``: hydra head name → role
    (default :data:`DEFAULT_HEAD_ROLES`); a key of an unknown head or attribute is returned as
    ``output_heads.<head>.<rest>`` (which no local parameter has)."""
    while key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("backbone."):
        return key[len("backbone.") :]
    if key.startswith("output_heads."):
        parts = key.split(".", 3)
        if len(parts) == 4:
            _, head, attribute, rest = parts
            role = (head_roles or DEFAULT_HEAD_ROLES).get(head)
            local = HEAD_ATTRIBUTES.get(role or "", {}).get(attribute)
            if local is not None:
                return f"{local}.{rest}"
    return key


def is_derived(local_key: str) -> bool:
    """True for recomputed buffers (step 4)."""
    return bool(_DERIVED.search(local_key))


def is_ignored(local_key: str) -> bool:
    """True for DeNS training-only blocks that act as zero at inference (step 2)."""
    return local_key.startswith(_IGNORED)


def is_folded(local_key: str) -> bool:
    """True for DeNS encodings whose bias is folded into the atom embedding (step 3)."""
    return local_key.startswith(_FOLDED)
