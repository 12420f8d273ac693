"""Deepen a trained model without changing what it predicts: the start of a larger fine-tune.

A block computes ``x + attention(norm_1(x))`` then ``+ ffn(norm_2(x))``. A block whose attention
output projection (``ga.proj``) and feed-forward output (``ffn.so3_linear_2``) are zero adds
nothing, so appending such blocks after the trained ones (before the final norm and the heads)
gives a deeper model with exactly the trained model's energies and forces. The other weights of
a new block are seeded random. The zeroed projections get gradients from the first step; the
weights before them do once the projections are off zero (as in zero-initialised residual
branches).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from eqv2_calc.checkpoint import load_model
from eqv2_calc.checkpoint.random_init import make_random_model
from eqv2_calc.checkpoint.registry import file_sha256
from eqv2_calc.checkpoint.save import save_fairchem_checkpoint
from eqv2_calc.errors import InputError

ZEROED: tuple[str, ...] = ("ga.proj.", "ffn.so3_linear_2.")
"""The parameters of a new block that are set to zero (key prefixes inside ``blocks.<i>.``)."""


def grow_layers(src: str | os.PathLike, num_layers: int, dest: str | os.PathLike, seed: int = 0) -> Path:
    """Write the model of checkpoint ``src`` (its ``state_dict`` weights) with ``num_layers``
    blocks to ``dest``: the trained blocks first, then identity blocks (see the module docstring);
    graph, normalisation and element references unchanged. Returns ``dest``."""
    model, meta = load_model(src)
    old = model.cfg.num_layers
    if num_layers <= old:
        raise InputError(f"{src} already has {old} blocks; grow_layers needs num_layers > {old}, got {num_layers}")
    grown = make_random_model(dataclasses.replace(model.cfg, num_layers=num_layers), seed)
    state = grown.state_dict()
    trained = model.state_dict()
    for key in state:
        if key in trained:
            state[key] = trained[key]
        elif key.startswith("blocks.") and key.split(".", 2)[2].startswith(ZEROED):
            state[key] = torch.zeros_like(state[key])
    grown.load_state_dict(state)
    norms = {k: float(getattr(model, k)) for k in ("energy_mean", "energy_std", "force_mean", "force_std")}
    return save_fairchem_checkpoint(grown, dest, normalizers=norms, extra_config={"grown_from": {
        "sha256": file_sha256(meta.path), "num_layers": old, "seed": seed, "zeroed": list(ZEROED)}})


__all__ = ["grow_layers", "ZEROED"]
