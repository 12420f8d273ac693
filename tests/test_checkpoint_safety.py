"""Safe checkpoint loading: weights-only unpickling with a small allow-list, refusal of anything
else unless trusted, and sha256 verification of registry files."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA
from eqv2_calc import EquiformerV2Calculator, load_model
from eqv2_calc.checkpoint import registry
from eqv2_calc.checkpoint.load import TrustedCheckpointWarning, checkpoint_safe_globals
from eqv2_calc.checkpoint.save import save_fairchem_checkpoint
from eqv2_calc.errors import CheckpointError

TINY = DATA / "eqv2_tiny_l4m2.pt"
SMALLEST = DATA / "eqv2_tiny_l3m3_oc22.pt"  # quickest to build, for the registry tests
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "eqv2_parity"
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "eqv2-emt-small.pt"


def _touch(path: str) -> str:
    """Stands in for the code a malicious pickle runs: leaves a marker file."""
    Path(path).write_text("unpickling ran code from the checkpoint")
    return "payload"


class Payload:
    """An arbitrary object whose unpickling calls :func:`_touch`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


class ShellPayload:
    """The classic attack: ``os.system`` at unpickling time."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with(tmp_path: Path, name: str, **extra) -> Path:
    """The tiny fairchem fixture with extra top-level entries, saved as ``name``."""
    ckpt = torch.load(TINY, map_location="cpu", weights_only=True)
    ckpt.update(extra)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def test_arbitrary_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = _with(tmp_path, "evil.pt", val_metrics=Payload(marker))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "trust_checkpoint=True" in msg and "--trust-checkpoint" in msg
    assert f"{_touch.__module__}._touch" in msg  # the offending global, as torch names it
    assert "arbitrary code" in msg and str(path) in msg
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        EquiformerV2Calculator(path, device="cpu")
    assert not marker.exists()


def test_shell_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    for legacy in (False, True):  # zip format and the pre-1.6 format
        path = tmp_path / f"shell_{legacy}.pt"
        ckpt = torch.load(TINY, map_location="cpu", weights_only=True)
        ckpt["config"]["hook"] = ShellPayload(marker)
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert f"{os.system.__module__}.system" in str(err.value)  # posix.system / nt.system
        assert "trust_checkpoint=True" in str(err.value)
    assert not marker.exists()


def test_trusted_file_is_unpickled_in_full_with_a_warning(tmp_path):
    marker = tmp_path / "marker"
    path = _with(tmp_path, "trusted.pt", val_metrics=Payload(marker))
    with pytest.warns(TrustedCheckpointWarning, match=str(path)):
        model, meta = load_model(path, trust_checkpoint=True)
    assert marker.exists()  # the full unpickler really ran (that is what trusting means)
    safe, _ = load_model(TINY)
    for (k, a), (_, b) in zip(model.state_dict().items(), safe.state_dict().items()):
        assert torch.equal(a, b), k
    marker.unlink()
    with pytest.warns(TrustedCheckpointWarning):
        calc = EquiformerV2Calculator(path, device="cpu", trust_checkpoint=True)
    assert calc.metadata["path"] == str(path)


def test_trust_does_not_warn_for_a_safe_file(recwarn):
    load_model(TINY, trust_checkpoint=True)
    assert not [w for w in recwarn if issubclass(w.category, TrustedCheckpointWarning)]


def _numpy1_names(src: Path, dst: Path) -> None:
    """Rewrite a checkpoint's pickle so its numpy scalars carry the numpy 1.x global name
    (``numpy.core.multiarray.scalar``), as in files written before numpy 2."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            zout.writestr(info.filename, data)


def test_numpy_scalars_load_without_trust_and_torch_state_is_untouched(tmp_path):
    metrics = {"energy_mae": {"metric": np.float64(0.25), "total": np.float32(2.5), "numel": np.int64(10)},
               "converged": np.bool_(True), "count": np.uint8(3), "half": np.float16(0.5)}
    path = _with(tmp_path, "np.pt", val_metrics=metrics, best_val_metric=np.float64(0.25))
    old = tmp_path / "np1.pt"
    _numpy1_names(path, old)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(old))
    with pytest.raises(Exception):  # torch's own defaults refuse numpy scalars ...
        torch.load(path, weights_only=True)

    class UserEntry:  # ... and a user's global allow-list entry survives our scoped one
        pass

    torch.serialization.add_safe_globals([UserEntry, np.dtype])
    try:
        before = set(torch.serialization.get_safe_globals())
        for p in (path, old):
            load_model(p)  # no trust needed
        assert set(torch.serialization.get_safe_globals()) == before
    finally:
        torch.serialization._weights_only_unpickler._remove_safe_globals([UserEntry, np.dtype])


def test_allow_list_is_small_and_data_only():
    entries = checkpoint_safe_globals()
    names = sorted({e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in entries})
    assert {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype"} <= set(names)
    assert all(n.startswith("numpy.") for n in names), names
    assert len(names) <= 16, names
    assert not any("ndarray" in n or "_reconstruct" in n for n in names)


def _fixtures() -> list[Path]:
    return sorted(DATA.glob("*.pt")) + [SHIPPED]


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: p.name)
def test_project_files_load_without_trust_and_without_the_allow_list(path):
    """The fairchem-written fixtures (official 2023 layout) and the shipped model hold nothing
    beyond torch's weights-only defaults; load_model reads them without trust."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    torch.load(path, map_location="cpu", weights_only=True)
    _, meta = load_model(path)
    assert meta.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shared_fairchem_fixtures_load_without_trust():
    """The fairchem 1.10-written originals in the shared fixture folder, if this checkout has it."""
    files = sorted(SHARED_FIXTURES.glob("*.pt"))
    if not files:
        pytest.skip(f"no shared fixture folder at {SHARED_FIXTURES} (only present next to the dev checkout)")
    for path in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [], path
        load_model(path)


def test_written_checkpoints_are_weights_only(tmp_path):
    model, _ = load_model(TINY)
    ema = {k: v + 0.01 for k, v in model.named_parameters()}
    path = save_fairchem_checkpoint(model, tmp_path / "written.pt", extra_config={"note": "x"}, ema_state_dict=ema)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- sha256 of registry files


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A registry name whose "download" URL is a local file (urllib reads file:// URLs)."""
    src = tmp_path / "server" / "fake_eqv2.pt"
    src.parent.mkdir()
    src.write_bytes(SMALLEST.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("EQV2_CACHE", str(cache))
    monkeypatch.setitem(registry.OFFICIAL_CHECKPOINTS, "Fake-EqV2", src.as_uri())
    return "Fake-EqV2", src, cache / "fake_eqv2.pt"


def test_registry_file_with_matching_sha256_downloads_and_loads(fake_entry, monkeypatch):
    name, src, dest = fake_entry
    monkeypatch.setitem(registry.OFFICIAL_SHA256, name, hashlib.sha256(src.read_bytes()).hexdigest())
    _, meta = load_model(name)
    assert Path(meta.path) == dest and dest.read_bytes() == src.read_bytes()
    _, meta = load_model(name)  # the cached copy, verified again
    assert meta.sha256 == registry.OFFICIAL_SHA256[name]


def test_download_with_wrong_sha256_is_refused_and_not_kept(fake_entry, monkeypatch):
    name, src, dest = fake_entry
    monkeypatch.setitem(registry.OFFICIAL_SHA256, name, "0" * 64)
    with pytest.raises(CheckpointError) as err:
        load_model(name)
    msg = str(err.value)
    assert "corrupt" in msg and "tampered" in msg and src.as_uri() in msg and "0" * 64 in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_tampered_cached_file_is_refused(fake_entry, monkeypatch):
    name, src, dest = fake_entry
    monkeypatch.setitem(registry.OFFICIAL_SHA256, name, hashlib.sha256(src.read_bytes()).hexdigest())
    dest.parent.mkdir(parents=True)
    dest.write_bytes(src.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError) as err:
        load_model(name)
    assert str(dest) in str(err.value) and "tampered" in str(err.value)


def test_registry_name_without_sha256_is_used_unverified(fake_entry):
    name, src, dest = fake_entry
    assert name not in registry.OFFICIAL_SHA256
    _, meta = load_model(name)
    assert Path(meta.path) == dest


def test_no_official_hash_is_invented():
    """Hashes are only listed once checked against a real download (none could be here)."""
    assert set(registry.OFFICIAL_SHA256) <= set(registry.OFFICIAL_CHECKPOINTS)
    for h in registry.OFFICIAL_SHA256.values():
        assert len(h) == 64 and int(h, 16) >= 0


# --------------------------------------------------------------------------- command lines


def test_cli_refuses_untrusted_file_and_loads_it_with_the_flag(tmp_path, capsys):
    from eqv2_calc.cli import main

    marker = tmp_path / "marker"
    path = _with(tmp_path, "evil.pt", val_metrics=Payload(marker))
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--trust-checkpoint" in err and "_touch" in err and not marker.exists()
    with pytest.warns(TrustedCheckpointWarning):
        assert main(["info", "--trust-checkpoint", str(path)]) == 0
    assert marker.exists()
    out_file = tmp_path / "relaxed"
    assert main(["relax", str(DATA / "structures.extxyz"), "--checkpoint", str(path), "--out", str(out_file),
                 "--index", "0", "--steps", "0", "--no-progress"]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    args = __import__("eqv2_calc.cli", fromlist=["build_parser"]).build_parser().parse_args(
        ["predict", "x.xyz", "--out", "y.xyz", "--trust-checkpoint"])
    assert args.trust_checkpoint


def test_adsorbml_ml_calculator_needs_trust_for_unsafe_files(tmp_path):
    from adsorbml.cli import build_parser
    from adsorbml.errors import InputError
    from adsorbml.workflow import make_ml_calculator

    path = _with(tmp_path, "evil.pt", val_metrics=Payload(tmp_path / "marker"))
    with pytest.raises(InputError, match="trust"):
        make_ml_calculator(str(path))
    with pytest.warns(TrustedCheckpointWarning):
        calc = make_ml_calculator(str(path), trust_checkpoint=True)
    assert isinstance(calc, EquiformerV2Calculator)
    for cmd in (["demo", "--trust-checkpoint"], ["run", "--out", "x", "--trust-checkpoint"]):
        assert build_parser().parse_args(cmd).trust_checkpoint
