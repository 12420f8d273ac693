"""Deterministic random-weight EquiformerV2 checkpoints of the published architectures.

``make_random_checkpoint("31M", seed, path)`` writes a fairchem 2023-layout checkpoint (see
:mod:`eqv2_calc.checkpoint.save`) whose weights are a pure function of ``seed``: every
parameter tensor is drawn on the CPU from its own ``torch.Generator`` seeded with
``crc32(f"{seed}:{name}")``, so the values depend neither on module registration order nor on
the global RNG (which is left untouched). The reference numbers in
``tests/data/reference_31M_seed0.json`` were computed by fairchem-core 1.10 on such a file;
regenerating it reproduces the same bytes (same torch serialisation) or at least the same
tensors (``state_dict_sha256``).

Scales: weights N(0, 1/(3·fan_in)) (fan_in = last dimension; the std of PyTorch's default
uniform init), × 1/√2 in the SO(2) m > 0 convolutions, × 8 in the last map of the energy and
force heads; biases N(0, 0.05²); LayerNorm / equivariant-norm gains 1 + N(0, 0.05²); embeddings
N(0, 1); ``alpha_dot`` N(0, 1/(3 Cα)); OC22 ``energy_lin_ref`` N(0, 0.1²). Energies and forces
come out O(1) eV and eV/Å. Larger weights (e.g. N(0, 1/fan_in)) drive the 18×18 S2-grid
activations hard enough that fairchem's random per-call roll of the edge frames changes its
forces by ~1e-4 eV/Å, which would swamp any comparison; at these scales that noise is ~1e-6.

Only torch, numpy, e3nn and the model/so3 modules are needed (not vesin), so this also runs in
the fairchem reference environment (see tests/reference/make_reference.py).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import torch

from eqv2_calc.checkpoint.save import save_fairchem_checkpoint
from eqv2_calc.checkpoint.state_dict import fairchem_keys
from eqv2_calc.model import EquiformerV2, EquiformerV2Config

OC20_NORMALIZERS = {
    "energy_mean": -0.7554450631141663,
    "energy_std": 2.887317180633545,
    "force_mean": 0.0,
    "force_std": 2.887317180633545,
}
OC22_NORMALIZERS = {
    "energy_mean": 0.0,
    "energy_std": 25.119809935106424,
    "force_mean": 0.0,
    "force_std": 0.14759646356105804,
}

_PUBLISHED = dict(
    sphere_channels=128, attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64,
    attn_value_channels=16, ffn_hidden_channels=128, edge_channels=128, grid_resolution=18,
    max_radius=12.0, max_neighbors=20, enforce_max_neighbors_strictly=True, max_num_elements=90,
)
SIZES: dict[str, EquiformerV2Config] = {
    "31M": EquiformerV2Config(num_layers=8, lmax=4, mmax=2, **_PUBLISHED),
    "153M": EquiformerV2Config(num_layers=20, lmax=6, mmax=3, **_PUBLISHED),
}


def _tensor_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


_WEIGHT_GAIN = 3**-0.5  # N(0, 1/(3 fan_in)): the std of PyTorch's default U(±1/sqrt(fan_in))
_M_CONV_GAIN = 2**-0.5  # the SO(2) m > 0 convolutions mix two blocks (as fairchem scales them)
_HEAD_GAIN = 8.0  # the last linear map of the energy and force heads: outputs O(1) eV, eV/Å
_HEADS = ("energy_block.so3_linear_2.weight", "force_block.proj.weight")


def _draw(name: str, shape: torch.Size, cfg: EquiformerV2Config, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    is_layer_norm = ".rad_func.net.1." in name or ".rad_func.net.4." in name or "alpha_norm." in name \
        or "norm_l0." in name
    if leaf == "bias":
        return 0.05 * z
    if leaf == "affine_weight" or (is_layer_norm and leaf == "weight"):
        return 1.0 + 0.05 * z
    if name.endswith("_embedding.weight"):  # sphere / source / target embeddings
        return z
    if leaf == "alpha_dot":
        return z * (_WEIGHT_GAIN / cfg.attn_alpha_channels**0.5)
    if name == "energy_lin_ref":
        return 0.1 * z
    if z.dim() >= 2:
        scale = _WEIGHT_GAIN / shape[-1] ** 0.5
        if ".so2_m_conv." in name:
            scale *= _M_CONV_GAIN
        if name in _HEADS:
            scale *= _HEAD_GAIN
        return z * scale
    raise ValueError(f"no initialisation rule for parameter {name!r} of shape {tuple(shape)}")


@torch.no_grad()
def randomize_parameters(model: EquiformerV2, seed: int) -> EquiformerV2:
    """Overwrite every parameter (and ``energy_lin_ref``) of ``model`` in place; returns it."""
    cfg = model.cfg
    state = model.state_dict()
    names = [k for k in fairchem_keys(cfg) if k in state]
    for name in names:
        target = state[name]
        target.copy_(_draw(name, target.shape, cfg, _tensor_generator(seed, name)).to(target.dtype))
    return model


def make_random_model(
    size: str | EquiformerV2Config, seed: int, normalizers: dict[str, float] | None = None
) -> EquiformerV2:
    """A float32 CPU model of ``size`` ("31M", "153M" or a config) with seeded random weights.

    ``normalizers`` ({energy_mean, energy_std, force_mean, force_std}); default OC20's
    (OC22's for a config with ``use_energy_lin_ref``).
    """
    cfg = SIZES[size] if isinstance(size, str) else size
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        model = EquiformerV2(cfg)
    randomize_parameters(model, seed)
    norms = normalizers or (OC22_NORMALIZERS if cfg.use_energy_lin_ref else OC20_NORMALIZERS)
    with torch.no_grad():
        for key, value in norms.items():
            getattr(model, key).fill_(value)
    return model.eval().requires_grad_(False)


def make_random_checkpoint(size: str, seed: int, path: str | os.PathLike) -> Path:
    """Write the seeded random ``size`` ("31M" or "153M") model to ``path`` (fairchem 2023 layout)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    model = make_random_model(size, seed)
    return save_fairchem_checkpoint(
        model, path, extra_config={"random_init": {"generator": "eqv2_calc.checkpoint.random_init",
                                                   "size": size, "seed": seed}}
    )


def state_dict_sha256(path_or_state: str | os.PathLike | dict) -> str:
    """sha256 over (key, dtype, shape, raw bytes) of every state_dict tensor in file order.

    Independent of the serialisation format, so it identifies the weights across torch versions.
    """
    if isinstance(path_or_state, dict):
        sd = path_or_state
    else:
        sd = torch.load(path_or_state, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for key, value in sd.items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
