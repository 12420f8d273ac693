"""Official EquiformerV2 checkpoints by name, with download into a cache directory.

The cache directory is ``$EQV2_CACHE`` if set, else ``~/.cache/eqv2-calc``. A file already
in the cache (or placed there by hand on an offline machine) is used as is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from eqv2_calc.errors import CheckpointError

_OC20 = "https://dl.fbaipublicfiles.com/opencatalystproject/models"
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "EquiformerV2-83M-S2EF-OC20-2M": f"{_OC20}/2023_06/oc20/s2ef/eq2_83M_2M.pt",
    "EquiformerV2-31M-S2EF-OC20-All+MD": f"{_OC20}/2023_06/oc20/s2ef/eq2_31M_ec4_allmd.pt",
    "EquiformerV2-153M-S2EF-OC20-All+MD": f"{_OC20}/2023_06/oc20/s2ef/eq2_153M_ec4_allmd.pt",
    "EquiformerV2-lE4-lF100-S2EFS-OC22": f"{_OC20}/2023_10/oc22/s2ef/eq2_121M_e4_f100_oc22_s2ef.pt",
    "EquiformerV2-S2EF-ODAC": "https://dl.fbaipublicfiles.com/dac/checkpoints_20240709/eqv2_31M.pt",
    "EquiformerV2-Large-S2EF-ODAC": "https://dl.fbaipublicfiles.com/dac/checkpoints_20240709/Equiformer_V2_Large.pt",
}
"""Registry name (as in fairchem 1.x ``pretrained_models.json``) → download URL."""


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept."""
    return Path(os.environ.get("EQV2_CACHE", Path.home() / ".cache" / "eqv2-calc"))


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint path for a file path or an official registry name (downloading if needed)."""
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
        return dest
    try:
        _download(url, dest)
    except Exception as exc:  # no network, HTTP error, disk full ...
        raise CheckpointError(
            f"could not download {name} from {url} ({type(exc).__name__}: {exc}). "
            f"On an offline machine download it elsewhere and put it at {dest} "
            "(or set EQV2_CACHE to the folder holding it), or pass the file path instead."
        ) from exc
    return dest
