"""Checkpoint files by name: the model shipped with the package, and the official EquiformerV2
checkpoints with download into a cache directory.

The cache directory is ``$EQV2_CACHE`` if set, else ``~/.cache/eqv2-calc``. A file already
in the cache (or placed there by hand on an offline machine) is used as is, after checking its
sha256 when :data:`OFFICIAL_SHA256` knows it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

from eqv2_calc.errors import CheckpointError

SHIPPED_PACKAGE = "eqv2_calc.shipped"
"""The package holding the shipped model: the repository's ``checkpoints/`` folder, installed as
``eqv2_calc/shipped/`` (``[tool.setuptools.package-dir]`` in pyproject.toml)."""
SHIPPED_MODEL = "eqv2-emt-small.pt"
"""File name of the default shipped model (model card: ``checkpoints/README.md``, installed next to it)."""
SHIPPED_MODELS: dict[str, str] = {"emt": SHIPPED_MODEL, "7net": "eqv2-7net-small.pt"}
"""Shipped models by variant: ``emt`` (trained on EMT: toy chemistry, the default and the model of
the tests) and ``7net`` (distilled from the SevenNet universal potential; model card
``checkpoints/eqv2-7net-small.md``)."""

_OC20 = "https://dl.fbaipublicfiles.com/opencatalystproject/models"
_OMAT24 = "https://huggingface.co/facebook/OMAT24/resolve/main"  # hub repo facebook/OMAT24 (gated)
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "EquiformerV2-83M-S2EF-OC20-2M": f"{_OC20}/2023_06/oc20/s2ef/eq2_83M_2M.pt",
    "EquiformerV2-31M-S2EF-OC20-All+MD": f"{_OC20}/2023_06/oc20/s2ef/eq2_31M_ec4_allmd.pt",
    "EquiformerV2-153M-S2EF-OC20-All+MD": f"{_OC20}/2023_06/oc20/s2ef/eq2_153M_ec4_allmd.pt",
    "EquiformerV2-lE4-lF100-S2EFS-OC22": f"{_OC20}/2023_10/oc22/s2ef/eq2_121M_e4_f100_oc22_s2ef.pt",
    "EquiformerV2-S2EF-ODAC": "https://dl.fbaipublicfiles.com/dac/checkpoints_20240709/eqv2_31M.pt",
    "EquiformerV2-Large-S2EF-ODAC": "https://dl.fbaipublicfiles.com/dac/checkpoints_20240709/Equiformer_V2_Large.pt",
    # energy only (direct IS2RE, no force head); its config names the constants norm_scale_nodes/norm_scale_degree
    "EquiformerV2-IS2RE-ODAC": "https://dl.fbaipublicfiles.com/dac/checkpoints_20231018/Equiformer_V2_Direct.pt",
    # materials models (energy, forces, stress); fairchem 1.10 lists them as huggingface_hub files
    "EquiformerV2-31M-OMAT24": f"{_OMAT24}/eqV2_31M_omat.pt",
    "EquiformerV2-86M-OMAT24": f"{_OMAT24}/eqV2_86M_omat.pt",
    "EquiformerV2-153M-OMAT24": f"{_OMAT24}/eqV2_153M_omat.pt",
    "EquiformerV2-31M-OMAT24-MP-sAlex": f"{_OMAT24}/eqV2_31M_omat_mp_salex.pt",
    "EquiformerV2-86M-OMAT24-MP-sAlex": f"{_OMAT24}/eqV2_86M_omat_mp_salex.pt",
    "EquiformerV2-153M-OMAT24-MP-sAlex": f"{_OMAT24}/eqV2_153M_omat_mp_salex.pt",
    "EquiformerV2-31M-MP": f"{_OMAT24}/eqV2_31M_mp.pt",
    "EquiformerV2-DeNS-31M-MP": f"{_OMAT24}/eqV2_dens_31M_mp.pt",
    "EquiformerV2-DeNS-86M-MP": f"{_OMAT24}/eqV2_dens_86M_mp.pt",
    "EquiformerV2-DeNS-153M-MP": f"{_OMAT24}/eqV2_dens_153M_mp.pt",
}
"""Registry name (as in fairchem 1.x ``pretrained_models.json``) → download URL. The materials
files (``huggingface_hub`` entries of fairchem 1.10: repo ``facebook/OMAT24``, file name) are
gated on the Hugging Face hub: accept the license on https://huggingface.co/facebook/OMAT24 and
set ``HF_TOKEN`` for the download, or put the file into the cache yourself."""

_OC20_INFO = {"training_data": "OC20 S2EF", "domain": "catalysis (adsorbates on surfaces)"}
_OMAT_ONLY = {
    "training_data": "OMat24", "domain": "inorganic materials (bulk)", "materials_project_compatible": False,
    "note": "trained on OMat24 only: OMat24's DFT settings differ from the Materials Project's, so its "
            "energies are not Materials-Project-compatible (no MP2020 corrections, phase diagrams or hull "
            "energies against MP data); use an -MP-sAlex or -MP model for those",
}
_MP = {"domain": "inorganic materials (bulk)", "materials_project_compatible": True,
       "note": "Materials-Project-compatible energies (PBE/PBE+U with MP settings)"}
MODEL_INFO: dict[str, dict] = {
    "EquiformerV2-83M-S2EF-OC20-2M": {**_OC20_INFO, "training_data": "OC20 S2EF 2M"},
    "EquiformerV2-31M-S2EF-OC20-All+MD": {**_OC20_INFO, "training_data": "OC20 S2EF All+MD"},
    "EquiformerV2-153M-S2EF-OC20-All+MD": {**_OC20_INFO, "training_data": "OC20 S2EF All+MD"},
    "EquiformerV2-lE4-lF100-S2EFS-OC22": {"training_data": "OC22 S2EF", "domain": "oxide catalysis"},
    "EquiformerV2-S2EF-ODAC": {"training_data": "ODAC23", "domain": "metal-organic frameworks (direct air capture)"},
    "EquiformerV2-Large-S2EF-ODAC": {"training_data": "ODAC23", "domain": "metal-organic frameworks (direct air capture)"},
    "EquiformerV2-IS2RE-ODAC": {
        "training_data": "ODAC23 IS2RE", "domain": "metal-organic frameworks (direct air capture)",
        "energy_only": True,
        "note": "direct IS2RE model: predicts the relaxed adsorption energy (eV) from the initial structure; it "
                "has no force head, so it gives no forces and cannot relax structures (use EquiformerV2-S2EF-ODAC "
                "or EquiformerV2-Large-S2EF-ODAC for that)",
    },
    **{f"EquiformerV2-{n}-OMAT24": dict(_OMAT_ONLY) for n in ("31M", "86M", "153M")},
    **{f"EquiformerV2-{n}-OMAT24-MP-sAlex": {**_MP, "training_data": "OMat24, fine-tuned on MPtrj + sAlex"}
       for n in ("31M", "86M", "153M")},
    "EquiformerV2-31M-MP": {**_MP, "training_data": "MPtrj"},
    **{f"EquiformerV2-DeNS-{n}-MP": {**_MP, "training_data": "MPtrj, with DeNS (denoising non-equilibrium "
                                                                "structures)"} for n in ("31M", "86M", "153M")},
}
"""Registry name → what the model was trained on; ``materials_project_compatible`` for the
materials models, ``energy_only`` for the direct IS2RE model. Reported in
``CheckpointMeta.model_info`` / ``calc.metadata["model_info"]``."""

OFFICIAL_SHA256: dict[str, str] = {}
"""Registry name → sha256 (hex) of the file, for the names whose hash is known.

A downloaded or cached file whose sha256 differs is refused (:class:`CheckpointError`). fairchem
publishes no hashes for these files and they could not be downloaded where this package was
written, so none is filled in yet: add ``name: "<64 hex digits>"`` once a file has been checked.
Names without an entry are used unverified (their sha256 is still recorded in ``CheckpointMeta``).
"""


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept."""
    return Path(os.environ.get("EQV2_CACHE", Path.home() / ".cache" / "eqv2-calc"))


def shipped_checkpoint(variant: str = "emt") -> Path:
    """A model shipped with the package: ``variant`` of :data:`SHIPPED_MODELS` (default
    ``eqv2-emt-small.pt``, see its model card README.md).

    Found with :mod:`importlib.resources` in the installed package (wheel, ``pip install .`` or
    an editable install, which maps the package to the repository's ``checkpoints/``). Raises
    :class:`CheckpointError` if this installation does not contain it.
    """
    from importlib.resources import files

    if variant not in SHIPPED_MODELS:
        raise CheckpointError(f"unknown shipped model {variant!r}; the shipped models are {sorted(SHIPPED_MODELS)}")
    name = SHIPPED_MODELS[variant]
    try:
        res = files(SHIPPED_PACKAGE) / name
        found = res.is_file()
    except (ModuleNotFoundError, TypeError):  # package not installed / not on a file system
        found = False
    if not found:
        raise CheckpointError(
            f"the shipped model {name} is not part of this installation of eqv2-calc "
            f"(looked for it as package data of {SHIPPED_PACKAGE}). Reinstall the package "
            "(`pip install eqv2-calc-*.whl`, `pip install .`, or `pip install -e .` in a checkout), "
            "or pass checkpoint_path=... or model_name=... (e.g. 'EquiformerV2-31M-S2EF-OC20-All+MD')"
        )
    try:
        return Path(os.fspath(res))
    except TypeError:  # e.g. a zipped installation
        raise CheckpointError(
            f"the shipped model is installed inside an archive ({res}); torch needs a file: "
            "install eqv2-calc unzipped (pip does)"
        ) from None


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file; remembered per (path, size, mtime) so a file is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _verify(name: str, path: Path, what: str) -> None:
    """Raise CheckpointError if ``path`` does not have the registry's sha256 for ``name``."""
    expected = OFFICIAL_SHA256.get(name)
    if not expected:
        return
    actual = file_sha256(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"{what} for {name} at {path} has sha256 {actual}, but the registry expects {expected}: "
            "the file is corrupt, incomplete or has been tampered with. Delete it to download it again "
            f"from {OFFICIAL_CHECKPOINTS[name]}, or get a good copy."
        )


def model_info(path_or_name: str | os.PathLike, path: Path) -> dict:
    """:data:`MODEL_INFO` of a registry name, or of the registry file a path is named like
    (e.g. a hand-downloaded ``eqV2_31M_omat.pt``; then ``"identified_by": "file name"``)."""
    name = str(path_or_name)
    if name in MODEL_INFO:
        return {"registry_name": name, **MODEL_INFO[name]}
    for reg, url in OFFICIAL_CHECKPOINTS.items():
        if os.path.basename(url) == path.name and reg in MODEL_INFO:
            return {"registry_name": reg, "identified_by": "file name", **MODEL_INFO[reg]}
    return {}


def _hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def _download(url: str, dest: Path, timeout: float = 60.0, name: str | None = None) -> None:
    """Download ``url`` to ``dest`` atomically (a partial download never becomes ``dest``);
    with ``name``, check its sha256 before it is kept. Hugging Face hub URLs send ``HF_TOKEN``
    (or ``HUGGING_FACE_HUB_TOKEN``) from the environment when set (gated repositories)."""
    from eqv2_calc.io import atomic_write

    request = urllib.request.Request(url)
    if url.startswith("https://huggingface.co/") and _hub_token():
        request.add_header("Authorization", f"Bearer {_hub_token()}")

    def fetch(tmp: str) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if name is not None:
            _verify(name, Path(tmp), f"the file downloaded from {url} (not kept)")

    atomic_write(dest, fetch, suffix=".part")


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint path for a file path or an official registry name (downloading if needed).

    For a registry name with a known sha256 (:data:`OFFICIAL_SHA256`) the cached or downloaded
    file is verified; a mismatch raises :class:`CheckpointError`.
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    name = str(path_or_name)
    if name not in OFFICIAL_CHECKPOINTS:
        if path.suffix or os.sep in name:
            raise CheckpointError(f"checkpoint file not found: {path}")
        known = ", ".join(sorted(OFFICIAL_CHECKPOINTS))
        raise CheckpointError(f"unknown checkpoint name {name!r}; official names: {known}")
    url = OFFICIAL_CHECKPOINTS[name]
    dest = cache_dir() / os.path.basename(url)
    if dest.is_file():
        _verify(name, dest, "the cached file")
        return dest
    try:
        _download(url, dest, name=name)
    except CheckpointError:
        raise
    except Exception as exc:  # no network, HTTP error, disk full ...
        gated = ""
        if url.startswith("https://huggingface.co/"):
            gated = (" The file is gated on the Hugging Face hub: accept the license on "
                     "https://huggingface.co/facebook/OMAT24 and set HF_TOKEN to an access token"
                     f"{' (none is set)' if not _hub_token() else ''}, or download it there by hand.")
        raise CheckpointError(
            f"could not download {name} from {url} ({type(exc).__name__}: {exc}).{gated} "
            f"On an offline machine download it elsewhere and put it at {dest} "
            "(or set EQV2_CACHE to the folder holding it), or pass the file path instead."
        ) from exc
    return dest
