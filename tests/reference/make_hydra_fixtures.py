"""Reference fixtures for fairchem's EquiformerV2 *materials* models (hydra: backbone + heads).

Runs inside the fairchem reference venv (../shared/reference/setup_refvenv.sh), never in the
project venv's tests:

    /tmp/eqv2-refvenv/bin/python tests/reference/make_hydra_fixtures.py
        → tests/data/materials_structures.extxyz and, for every tiny size,
          tests/data/hydra_<size>.pt + tests/data/hydra_<size>.reference.json
    /tmp/eqv2-refvenv/bin/python tests/reference/make_hydra_fixtures.py --sizes omat_31M --seed 0 --out DIR
        → the published 31M OMat24 architecture (used live by the `reference` tests; never committed)

Each model is built with fairchem-core 1.10's own classes (``HydraModel`` with the backbone and
head configuration of the official OMat24 / MPtrj / DeNS configs), its weights perturbed at
random (seeded; every parameter gets Gaussian noise of a fraction ``perturb`` of its own spread,
so no weight keeps its initial value; the DeNS ``force_embedding`` / ``noise_schedule_sigma_embedding``
biases, which are zero-initialised and the only parts of the DeNS encodings that act at inference,
are set to O(1) values; the last map of every head is scaled by :data:`HEAD_GAINS`), and saved in
the official checkpoint layout:

* ``config["model"] = {"name": "hydra", "backbone": {"model": ..., ...}, "heads": {energy,
  forces, stress}, "pass_through_head_outputs": True, "otf_graph": True}`` and the trainer
  sections of the official configs (``outputs`` with the stress decomposition into
  ``stress_isotropic`` (irrep 0) and ``stress_anisotropic`` (irrep 2), ``loss_functions``,
  ``optim``, ``dataset`` with its ``transforms``);
* ``state_dict`` keys ``backbone.*`` / ``output_heads.<head>.*`` (prefixed ``module.`` for some
  sizes, as DDP-trained files are);
* ``normalizers = {forces, stress_isotropic, stress_anisotropic: {mean, rmsd}}`` (no energy
  normalizer, as in the OMat24 files) and ``elementrefs = {"energy": {"element_references":
  [119]}}`` (per-element energies indexed by Z).

Sizes:

* ``tiny_l4m2``: OMat24-style (L=4, M=2), registry names (``equiformer_v2_backbone``,
  ``equiformer_v2_energy_head``, ``equiformer_v2_force_head``, ``rank2_symmetric_head``);
* ``tiny_l6m4``: the 86M-style L=6, M=4, with module paths instead of registry names
  (``...equiformer_v2.EquiformerV2Backbone``, ``...heads.EqV2ScalarHead``, ``...heads.EqV2VectorHead``,
  and the omat24-branch path ``...equiformer_v2.prediction_heads.rank2.Rank2SymmetricTensorHead``);
* ``tiny_dens``: DeNS with the 1.10 names (``...equiformer_v2_dens.EqV2DeNSBackbone``,
  ``DeNSScalarHead`` / ``DeNSVectorHead`` / ``DeNSRank2Head``; keys ``scalar_block``,
  ``vector_block``, ``denoising_pos_block``);
* ``tiny_dens_old``: DeNS with the early names (``fairchem.experimental...equiformer_v2_denoising``
  module path, ``DeNSEnergyHead`` / ``DeNSForceHead`` / ``DeNSRank2Head``, keys ``energy_block``,
  ``force_block``, ``denoising_pos_block``, backbone options ``use_denoising_energy`` /
  ``use_denoising_stress``) and the noise-schedule sigma embedding switched on;
* ``omat_31M``: the published eqV2-S OMat24 architecture (8 layers, L=4, M=2, C=128).

fairchem 1.10 cannot import the omat24-branch and early DeNS module paths (that is the loading
failure users report). To get fairchem's own numbers for those files anyway, this script
registers, for this process only, modules under those paths whose classes are fairchem 1.10's
classes, adapted only where the early release named things differently (a head attribute
``force_block`` instead of ``vector_block``, the two ``use_denoising_*`` backbone options). The
computation is fairchem's; the file keeps the early names.

Then each file is loaded back through fairchem's ``OCPCalculator(checkpoint_path=..., cpu=True)``
(strict state_dict load) and its energy (eV), raw forces (eV/Å) and 3×3 stress (eV/Å³,
``calc.results["stress"]``) recorded for every structure: rattled bulk crystals of several
lattices (some strained or sheared) and one slab with an adsorbate, all periodic in 3-D. Every
structure is evaluated twice; fairchem draws a new random roll of the edge frames per call, and
the difference between the two calls is recorded as ``fairchem_repeat_diff``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
STRUCTURES_FILE = "materials_structures.extxyz"

OMAT_BACKBONE = dict(  # configs/omat24/all/eqV2_31M.yml (fairchem repository)
    use_pbc=True, use_pbc_single=True, otf_graph=True, enforce_max_neighbors_strictly=False,
    max_neighbors=20, max_radius=12.0, max_num_elements=96, avg_num_nodes=31.17, avg_degree=61.95,
    num_layers=8, sphere_channels=128, attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64,
    attn_value_channels=16, ffn_hidden_channels=128, norm_type="layer_norm_sh", lmax_list=[4], mmax_list=[2],
    grid_resolution=18, num_sphere_samples=128, edge_channels=128, use_atom_edge_embedding=True,
    share_atom_edge_embedding=False, use_m_share_rad=False, distance_function="gaussian", num_distance_basis=512,
    attn_activation="silu", use_s2_act_attn=False, use_attn_renorm=True, ffn_activation="silu", use_gate_act=False,
    use_grid_mlp=True, use_sep_s2_act=True, alpha_drop=0.1, drop_path_rate=0.1, proj_drop=0.0, weight_init="uniform",
)
_TINY = dict(num_layers=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
             attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8)
STRESS_HEAD = dict(output_name="stress", use_source_target_embedding=True, decompose=True)

_EQ = "fairchem.core.models.equiformer_v2"
_DENS = f"{_EQ}.equiformer_v2_dens"
OMAT24_BRANCH_RANK2 = f"{_EQ}.prediction_heads.rank2"  # module path of the omat24-branch files
EARLY_DENS = "fairchem.experimental.xiangfu.equiformer_v2_denoising"  # early DeNS files (issue #886)

SIZES = {
    "tiny_l4m2": dict(
        backbone=dict(OMAT_BACKBONE, **_TINY, lmax_list=[4], mmax_list=[2]),
        backbone_model="equiformer_v2_backbone",
        heads={"energy": {"module": "equiformer_v2_energy_head"},
               "forces": {"module": "equiformer_v2_force_head"},
               "stress": {"module": "rank2_symmetric_head", **STRESS_HEAD}},
        prefix="module.", perturb=0.25,
    ),
    "tiny_l6m4": dict(
        backbone=dict(OMAT_BACKBONE, **dict(_TINY, num_layers=1), lmax_list=[6], mmax_list=[4],
                      avg_num_nodes=24.4, avg_degree=58.3),
        backbone_model=f"{_EQ}.equiformer_v2.EquiformerV2Backbone",
        heads={"energy": {"module": f"{_EQ}.heads.EqV2ScalarHead"},
               "forces": {"module": f"{_EQ}.heads.EqV2VectorHead"},
               "stress": {"module": f"{OMAT24_BRANCH_RANK2}.Rank2SymmetricTensorHead", **STRESS_HEAD}},
        prefix="", perturb=0.1,  # L=6 on the 18×18 grid: larger weights make fairchem's roll noise ~1e-4 eV/Å
    ),
    "tiny_dens": dict(  # configs/omat24/mptrj/eqV2_31M_dens_mptrj.yml
        backbone=dict(OMAT_BACKBONE, **_TINY, avg_num_nodes=31.16592360068011, avg_degree=61.94676351484548,
                      use_force_encoding=True, use_noise_schedule_sigma_encoding=False),
        backbone_model=f"{_DENS}.EqV2DeNSBackbone",
        heads={"energy": {"module": f"{_DENS}.DeNSScalarHead", "use_denoising": True},
               "forces": {"module": f"{_DENS}.DeNSVectorHead"},
               "stress": {"module": f"{_DENS}.DeNSRank2Head", **STRESS_HEAD, "use_denoising": False}},
        prefix="module.", perturb=0.25,
    ),
    "tiny_dens_old": dict(
        backbone=dict(OMAT_BACKBONE, **_TINY, avg_num_nodes=31.16592360068011, avg_degree=61.94676351484548,
                      use_force_encoding=True, use_noise_schedule_sigma_encoding=True,
                      use_denoising_energy=True, use_denoising_stress=False),
        backbone_model=f"{EARLY_DENS}.EqV2DeNSBackbone",
        heads={"energy": {"module": f"{EARLY_DENS}.DeNSEnergyHead"},
               "forces": {"module": f"{EARLY_DENS}.DeNSForceHead"},
               "stress": {"module": f"{EARLY_DENS}.DeNSRank2Head", **STRESS_HEAD}},
        prefix="module.", perturb=0.25,
    ),
    "omat_31M": dict(
        backbone=dict(OMAT_BACKBONE),
        backbone_model="equiformer_v2_backbone",
        heads={"energy": {"module": "equiformer_v2_energy_head"},
               "forces": {"module": "equiformer_v2_force_head"},
               "stress": {"module": "rank2_symmetric_head", **STRESS_HEAD}},
        prefix="module.", perturb=0.1,
    ),
}
TINY_SIZES = [s for s in SIZES if s.startswith("tiny_")]
# Gains on the last linear map of each head, so that the model's own contributions (beyond the
# element references and normalizer means) are O(1) eV, O(1) eV/Å and vary by O(0.01) eV/Å³
# between structures; the tolerances of the parity tests are then far below the signal.
HEAD_GAINS = {
    r"output_heads\.energy\.(energy|scalar)_block\.so3_linear_2\.weight": 8.0,
    r"output_heads\.forces\.(force|vector)_block\.proj\.weight": 30.0,
    r"output_heads\.stress\.block\.(scalar|irrep2)_MLP\.2\.weight": 10.0,
}

# O(OMat24) output scales: forces ~1 eV/Å, stress ~0.05 eV/Å³ (8 GPa); non-zero means so that
# the per-part de-normalisation is visible in the numbers.
NORMALIZERS = {
    "forces": {"mean": 0.0, "rmsd": 0.83},
    "stress_isotropic": {"mean": -0.0127, "rmsd": 0.0541},
    "stress_anisotropic": {"mean": 0.0031, "rmsd": 0.0236},
}


# ----------------------------------------------------------------------------- structures
def make_structures(seed: int = 5) -> list:
    """Rattled bulk crystals (several lattices, some strained or sheared) and one slab, all 3-D periodic."""
    from ase.build import add_adsorbate, bulk, fcc111

    rng = np.random.default_rng(seed)
    out = []

    def add(name, atoms, strain=None, rattle=0.03):
        atoms = atoms.copy()
        atoms.pbc = True
        if strain is not None:
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + np.asarray(strain)), scale_atoms=True)
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        atoms.info = {"name": name}
        out.append(atoms)

    add("Cu_fcc_conv", bulk("Cu", "fcc", a=3.61, cubic=True), strain=np.diag([0.03, -0.01, 0.0]))
    add("Fe_bcc_conv", bulk("Fe", "bcc", a=2.87, cubic=True), strain=-0.03 * np.eye(3))
    add("NaCl_prim", bulk("NaCl", "rocksalt", a=5.64))
    add("Si_diamond", bulk("Si", "diamond", a=5.43, cubic=True), strain=[[0, 0.02, 0], [0.02, 0, 0], [0, 0, 0.01]])
    add("ZnO_wurtzite", bulk("ZnO", "wurtzite", a=3.25, c=5.21))
    add("SrTiO3_sheared", _perovskite(), strain=[[0.0, 0.04, -0.02], [0.0, 0.01, 0.03], [0.0, 0.0, -0.02]])
    ni3al = bulk("Ni", "fcc", a=3.57, cubic=True)
    ni3al.numbers[0] = 13
    add("Ni3Al_L12", ni3al, strain=np.diag([0.02, 0.02, -0.03]))
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=6.0, a=3.92)
    add_adsorbate(slab, "O", 1.3, "fcc")
    add("Pt111_O_slab", slab, rattle=0.02)
    return out


def _perovskite():
    from ase import Atoms

    a = 3.905
    return Atoms("SrTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                 cell=[a, a, a], pbc=True)


# ----------------------------------------------------------------------------- early module paths
def register_legacy_modules() -> None:
    """Modules under the omat24-branch and early DeNS paths, holding fairchem 1.10's classes."""
    from fairchem.core.models.equiformer_v2 import equiformer_v2_dens as dens
    from fairchem.core.models.equiformer_v2.heads import EqV2ScalarHead
    from fairchem.core.models.equiformer_v2.heads.rank2 import Rank2SymmetricTensorHead

    def module(path: str, **attrs) -> None:
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                mod = types.ModuleType(name)  # no __path__: fairchem looks for a git checkout there
                sys.modules[name] = mod
                if i > 1:
                    setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
        for k, v in attrs.items():
            setattr(sys.modules[path], k, v)

    module(OMAT24_BRANCH_RANK2, Rank2SymmetricTensorHead=Rank2SymmetricTensorHead)

    class EqV2DeNSBackbone(dens.EqV2DeNSBackbone):  # early: two more options, used by the heads
        def __init__(self, *args, use_denoising_energy=True, use_denoising_stress=True, **kwargs):
            super().__init__(*args, **kwargs)
            self.use_denoising_energy = use_denoising_energy
            self.use_denoising_stress = use_denoising_stress

    class DeNSEnergyHead(EqV2ScalarHead):  # early: attribute energy_block (as EqV2ScalarHead)
        def __init__(self, backbone, reduce: str = "sum"):
            super().__init__(backbone, reduce=reduce)

    class DeNSForceHead(dens.DeNSVectorHead):  # early: attribute force_block instead of vector_block
        def __init__(self, backbone):
            super().__init__(backbone)
            self._modules = {("force_block" if k == "vector_block" else k): v for k, v in self._modules.items()}

        @property
        def vector_block(self):
            return self._modules["force_block"]

    class DeNSRank2Head(dens.DeNSRank2Head):  # early: the denoising switch came from the backbone
        def __init__(self, backbone, *args, **kwargs):
            super().__init__(backbone, *args, use_denoising=backbone.use_denoising_stress, **kwargs)

    module(EARLY_DENS, EqV2DeNSBackbone=EqV2DeNSBackbone, DeNSEnergyHead=DeNSEnergyHead,
           DeNSForceHead=DeNSForceHead, DeNSRank2Head=DeNSRank2Head)


# ----------------------------------------------------------------------------- models and files
def build_model(size: str, seed: int):
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    spec = SIZES[size]
    backbone = {"model": spec["backbone_model"], **spec["backbone"]}
    torch.manual_seed(seed)
    model = HydraModel(backbone=copy.deepcopy(backbone), heads=copy.deepcopy(spec["heads"]),
                       otf_graph=True, pass_through_head_outputs=True).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = p.std().item() if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=gen) * spec["perturb"] * (s if s > 0 else 0.1))
        for name, p in model.named_parameters():
            if name.endswith("force_embedding.bias") or name.endswith("noise_schedule_sigma_embedding.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            for pattern, gain in HEAD_GAINS.items():
                if re.fullmatch(pattern, name):
                    p.mul_(gain)
    return model, backbone


def checkpoint_dict(size: str, model, backbone: dict, seed: int) -> dict:
    spec = SIZES[size]
    prefix = spec["prefix"]
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 2)
    refs = torch.zeros(119)
    refs[1:] = -3.0 + 2.0 * torch.randn(118, generator=gen)
    outputs = {
        "energy": {"level": "system", "property": "energy"},
        "forces": {"level": "atom", "property": "forces", "train_on_free_atoms": True, "eval_on_free_atoms": True},
        "stress": {"level": "system", "property": "stress",
                   "decomposition": {"stress_isotropic": {"irrep_dim": 0}, "stress_anisotropic": {"irrep_dim": 2}}},
    }
    config = {
        "trainer": "equiformerv2_forces",
        "model": {"name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
                  "backbone": copy.deepcopy(backbone), "heads": copy.deepcopy(spec["heads"])},
        "outputs": outputs,
        "loss_functions": [
            {"energy": {"fn": "per_atom_mae", "coefficient": 2.5}},
            {"forces": {"fn": "l2mae", "coefficient": 20}},
            {"stress_isotropic": {"fn": "mae", "coefficient": 5}},
            {"stress_anisotropic": {"fn": "mae", "reduction": "mean", "coefficient": 5}},
        ],
        "evaluation_metrics": {"primary_metric": "energy_mae",
                               "metrics": {"energy": ["mae", "per_atom_mae"], "forces": ["mae"],
                                           "stress": ["mae"]}},
        "optim": {"batch_size": 8, "eval_batch_size": 12, "load_balancing": "atoms", "num_workers": 0,
                  "lr_initial": 0.0006, "optimizer": "AdamW", "optimizer_params": {"weight_decay": 0.001},
                  "scheduler": "LambdaLR", "scheduler_params": {"lambda_type": "cosine", "warmup_factor": 0.2,
                                                                "warmup_epochs": 0.01, "lr_min_factor": 0.01},
                  "max_epochs": 2, "clip_grad_norm": 100, "ema_decay": 0.999, "eval_every": 5000},
        "dataset": {
            "format": "ase_db", "src": ["/dataset/omat24/train/rattled-relax"],
            "a2g_args": {"r_energy": True, "r_forces": True, "r_stress": True},
            "transforms": {
                "decompose_tensor": {"tensor": "stress", "rank": 2, "decomposition": outputs["stress"]["decomposition"]},
                "normalizer": {"fit": {"targets": {"forces": {"mean": 0.0}, "stress_isotropic": {},
                                                   "stress_anisotropic": {}},
                                       "batch_size": 64, "num_batches": 10000}},
                "element_references": {"fit": {"targets": ["energy"], "batch_size": 64, "num_batches": 10000}},
            },
        },
        "cmd": {"seed": 0},
        "eqv2_fixture": {"generator": "tests/reference/make_hydra_fixtures.py", "size": size, "seed": seed},
    }
    normalizers = {k: {"mean": torch.tensor(v["mean"]), "rmsd": torch.tensor(v["rmsd"])} for k, v in NORMALIZERS.items()}
    return {"epoch": 1, "step": 1000, "state_dict": sd, "normalizers": normalizers,
            "elementrefs": {"energy": {"element_references": refs}}, "config": config, "val_metrics": {}, "amp": None}


def evaluate(path: str, structures: list, repeat: bool = True) -> dict:
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    calc = OCPCalculator(checkpoint_path=str(path), cpu=True, seed=0)  # strict load
    calc.trainer.model.eval()
    assert set(calc.implemented_properties) >= {"energy", "forces", "stress"}, calc.implemented_properties
    results, repeat_diff = {}, {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for atoms in structures:
        name = atoms.info["name"]
        runs = []
        for _ in range(2 if repeat else 1):
            calc.reset()  # a new evaluation (ASE would return the cached results)
            a = atoms.copy()
            a.calc = calc
            t0 = time.perf_counter()
            energy = float(a.get_potential_energy())
            dt = time.perf_counter() - t0
            forces = np.asarray(calc.results["forces"], dtype=float).copy()  # unconstrained
            stress = np.asarray(calc.results["stress"], dtype=float).reshape(3, 3).copy()
            runs.append((energy, forces, stress, dt))
        energy, forces, stress, dt = runs[0]
        if repeat:
            e2, f2, s2, _ = runs[1]
            repeat_diff["energy"] = max(repeat_diff["energy"], abs(e2 - energy))
            repeat_diff["forces"] = max(repeat_diff["forces"], float(np.abs(f2 - forces).max()))
            repeat_diff["stress"] = max(repeat_diff["stress"], float(np.abs(s2 - stress).max()))
        results[name] = {"natoms": len(atoms), "energy": energy, "forces": forces.tolist(),
                         "stress": stress.tolist(), "seconds": round(dt, 3)}
        print(f"  {name}: {len(atoms)} atoms, E = {energy:.6f} eV, max|F| = {np.abs(forces).max():.4f} eV/Å, "
              f"stress diag = {np.round(np.diag(stress), 5).tolist()} eV/Å³, {dt:.2f} s", flush=True)
    out = {"structures": results}
    if repeat:
        out["fairchem_repeat_diff"] = repeat_diff
    return out


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dump(record: dict, path: Path) -> None:
    text = json.dumps(record, indent=1)
    text = re.sub(r"\[\s+([-+0-9.eE]+),\s+([-+0-9.eE]+),\s+([-+0-9.eE]+)\s+\]", r"[\1, \2, \3]", text)
    path.write_text(text + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DATA), help="output folder (default tests/data)")
    ap.add_argument("--sizes", default=",".join(TINY_SIZES), help=f"comma-separated, from {list(SIZES)}")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--structures", default="", help="comma-separated structure names (default: all)")
    ap.add_argument("--checkpoint", help="evaluate this existing checkpoint (with --reference-out) instead")
    ap.add_argument("--reference-out", help="output JSON for --checkpoint")
    ap.add_argument("--no-repeat", action="store_true", help="evaluate every structure once only")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    import ase
    import fairchem.core

    register_legacy_modules()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    structures = make_structures()
    if args.structures:
        keep = args.structures.split(",")
        structures = [a for a in structures if a.info["name"] in keep]
    versions = {"fairchem_version": fairchem.core.__version__, "torch_version": torch.__version__,
                "ase_version": ase.__version__}
    if args.checkpoint:
        record = {**versions, "checkpoint_sha256": _sha256(args.checkpoint),
                  **evaluate(args.checkpoint, structures, repeat=not args.no_repeat)}
        _dump(record, Path(args.reference_out))
        return 0
    from ase.io import write

    structures_path = out / STRUCTURES_FILE
    write(structures_path, structures, format="extxyz")
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        model, backbone = build_model(size, args.seed)
        ckpt = checkpoint_dict(size, model, backbone, args.seed)
        path = out / f"hydra_{size}.pt"
        torch.save(ckpt, path)
        print(f"{size}: {path} ({path.stat().st_size / 1e6:.2f} MB, "
              f"{sum(p.numel() for p in model.parameters())} parameters, {time.perf_counter() - t0:.1f} s)", flush=True)
        record = {
            **versions, "size": size, "seed": args.seed, "generator": "tests/reference/make_hydra_fixtures.py",
            "checkpoint": path.name, "checkpoint_sha256": _sha256(path), "structures_file": STRUCTURES_FILE,
            "normalizers": NORMALIZERS, "backbone_model": SIZES[size]["backbone_model"],
            "heads": {k: v["module"] for k, v in SIZES[size]["heads"].items()},
            **evaluate(path, structures, repeat=not args.no_repeat),
        }
        _dump(record, out / f"hydra_{size}.reference.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
