"""The `eqv2 info` / `eqv2 predict` commands."""

from __future__ import annotations

import json
import sys

import numpy as np
from ase.io import read

from conftest import DATA, reference
from eqv2_calc.cli import main


def test_info_prints_metadata(capsys):
    assert main(["info", str(DATA / "eqv2_tiny_l4m2.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cutoff"] == 12.0 and info["config"]["lmax"] == 4


def test_predict_writes_reference_energies(tmp_path):
    out = tmp_path / "pred.extxyz"
    main(["predict", str(DATA / "structures.extxyz"), "--checkpoint", str(DATA / "eqv2_tiny_l4m2.pt"),
          "--out", str(out), "--max-atoms", "30"])
    names = json.loads((DATA / "structure_names.json").read_text())
    ref = reference("eqv2_tiny_l4m2")
    for name, atoms in zip(names, read(out, ":")):
        assert abs(atoms.get_potential_energy() - ref[name]["energy"]) < 1e-4
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), ref[name]["forces"], atol=1e-4)


def test_bad_checkpoint_is_a_clean_exit(capsys):
    assert main(["info", "missing.pt"]) == 2
    assert "checkpoint file not found: missing.pt" in capsys.readouterr().err


def test_calculator_leaves_malloc_alone_and_tuning_keeps_results():
    """In a fresh process: constructing and using EquiformerV2Calculator() does not change glibc's
    malloc policy; tune_allocator() does (and is idempotent); results are bit-identical.

    Observable: with glibc's defaults a freed 64 MiB block (above the 32 MiB mmap ceiling) goes
    back to the OS (RSS drops); after tune_allocator() it stays in the heap (RSS stays).
    """
    import platform
    import subprocess
    import textwrap

    import pytest

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting exists on glibc only")
    script = textwrap.dedent(f"""
        import ctypes, json, os
        import numpy as np
        from ase.io import read

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        def freed_block_returned():
            n = 64 << 20
            ptr = libc.malloc(n)
            ctypes.memset(ptr, 1, n)
            before = rss()
            libc.free(ptr)
            return before - rss() > n // 2

        names = json.load(open({str(DATA / "structure_names.json")!r}))
        atoms = read({str(DATA / "structures.extxyz")!r}, index=names.index("Pt100_OH"))
        out = {{"fresh": freed_block_returned()}}
        from eqv2_calc import EquiformerV2Calculator
        from eqv2_calc.runtime import tune_allocator

        calc = EquiformerV2Calculator({str(DATA / "eqv2_tiny_l4m2.pt")!r}, device="cpu")
        before = calc.predict_batch([atoms])[0]
        atoms.calc = calc
        atoms.get_potential_energy()
        out["after_calculator"] = freed_block_returned()
        out["applied"] = tune_allocator()
        out["again"] = tune_allocator()
        out["after_tune"] = freed_block_returned()
        after = calc.predict_batch([atoms])[0]
        out["same_energy"] = after["energy"] == before["energy"]
        out["same_forces"] = bool(np.array_equal(after["forces"], before["forces"]))
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fresh"], "probe: glibc returns a freed 64 MiB block to the OS by default"
    assert out["after_calculator"], "EquiformerV2Calculator() changed the process's malloc settings"
    assert out["applied"] is True and out["again"] is True
    assert not out["after_tune"], "tune_allocator() did not keep the freed block in the heap"
    assert out["same_energy"] and out["same_forces"]
