"""eqv2_calc.calcspec: the one calculator-spec parser of `eqv2 relax --calculator` and
`adsorbml --ml-calculator/--dft-calculator`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.io import read, write

from eqv2_calc.calcspec import CalculatorSpecError, make_calculator, parse_calculator_spec
from eqv2_calc.errors import InputError

DATA = Path(__file__).parent / "data"
ML = ("ase", "eqv2")
DFT = ("ase", "none")


def test_parse_accepted_forms():
    emt = parse_calculator_spec("  EMT ")
    assert (emt.kind, emt.target, emt.name, emt.kwargs, emt.canonical) == (
        "ase", "ase.calculators.emt:EMT", "emt", {}, "emt")
    lj = parse_calculator_spec('lj{"sigma": 2.3, "epsilon": 0.01}')
    assert lj.target == "ase.calculators.lj:LennardJones" and lj.kwargs == {"sigma": 2.3, "epsilon": 0.01}
    assert lj.canonical == 'lj{"epsilon":0.01,"sigma":2.3}'
    imp = parse_calculator_spec('ase.calculators.morse:MorsePotential {"rho0": 5}')
    assert (imp.kind, imp.target, imp.name, imp.kwargs) == ("ase", "ase.calculators.morse:MorsePotential", "", {"rho0": 5})
    assert parse_calculator_spec("none", allow=DFT).kind == "none"
    for shipped in ("shipped", "Default"):
        spec = parse_calculator_spec(shipped, allow=ML)
        assert (spec.kind, spec.target) == ("eqv2", "shipped")
    ckpt = parse_calculator_spec(str(DATA / "eqv2_tiny_l4m2.pt"), allow=ML)
    assert (ckpt.kind, ckpt.target) == ("eqv2", str(DATA / "eqv2_tiny_l4m2.pt"))
    official = parse_calculator_spec("EquiformerV2-31M-S2EF-OC20-All+MD", allow=ML)
    assert (official.kind, official.target) == ("eqv2", "EquiformerV2-31M-S2EF-OC20-All+MD")


@pytest.mark.parametrize("spec, allow, match", [
    ("vasp", DFT, r"unknown calculator 'vasp'; use one of emt, lj, morse, sevennet, none, module:Class"),
    ("nosuchmodel", ML, r"official checkpoint name.*Official checkpoint names: EquiformerV2-153M"),
    ("runs/missing.pt", ML, "checkpoint file not found"),
    ("", DFT, "empty calculator"),
    ("a:b:c", DFT, "expected module:Class"),
    ("emt{sigma: 1}", DFT, "not valid JSON"),
    ("emt[1]", DFT, "unknown calculator"),
    ('lj["a"]', DFT, "unknown calculator"),
    ('shipped{"x": 1}', ML, "keyword arguments are only for ASE calculators"),
    ("shipped", DFT, "EquiformerV2 checkpoints are not accepted here"),
    ("none", ML, "'none' are not accepted here"),
    ("emt", ("eqv2",), "ASE calculators are not accepted here"),
])
def test_parse_errors_list_the_options(spec, allow, match):
    with pytest.raises(CalculatorSpecError, match=match) as info:
        parse_calculator_spec(spec, allow=allow)
    assert isinstance(info.value, InputError)


def test_build_and_import_errors():
    calc = make_calculator('lj{"sigma": 2.0, "epsilon": 0.5, "rc": 5.0}')
    assert isinstance(calc, LennardJones)
    dimer = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 2.3]])
    dimer.calc = calc
    ref = dimer.copy()
    ref.calc = LennardJones(sigma=2.0, epsilon=0.5, rc=5.0)
    assert dimer.get_potential_energy() == ref.get_potential_energy()
    assert isinstance(make_calculator("ase.calculators.emt:EMT"), EMT)
    assert make_calculator("none", allow=DFT) is None
    with pytest.raises(CalculatorSpecError, match=r"cannot import module 'nosuchmodule'"):
        make_calculator("nosuchmodule:Calc")
    with pytest.raises(CalculatorSpecError, match=r"has no attribute 'EMTX'; its classes include .*EMT"):
        make_calculator("ase.calculators.emt:EMTX")
    with pytest.raises(CalculatorSpecError, match="missing 1 required positional argument"):
        make_calculator("ase.calculators.singlepoint:SinglePointCalculator")  # constructor errors too
    from eqv2_calc import EquiformerV2Calculator

    calc = make_calculator(str(DATA / "eqv2_tiny_l4m2.pt"), allow=ML, device="cpu", dtype="float64")
    assert isinstance(calc, EquiformerV2Calculator) and calc.metadata["dtype"] == "float64"


def test_adsorbml_uses_the_same_parser():
    from adsorbml.errors import InputError as AdsorbInputError
    from adsorbml.workflow import RunConfig, make_dft_calculator, make_ml_calculator

    assert isinstance(make_ml_calculator("EMT"), EMT)
    assert isinstance(make_ml_calculator('lj{"sigma": 2.0}'), LennardJones)
    assert isinstance(make_dft_calculator("ase.calculators.emt:EMT"), EMT)
    assert make_dft_calculator(" none ") is None
    for bad, match in (("shipped", "not accepted"), ("vasp", "use one of"), ("nosuch:Calc", "cannot import")):
        with pytest.raises(AdsorbInputError, match=match):
            make_dft_calculator(bad)
    with pytest.raises(AdsorbInputError, match="Official checkpoint names"):
        make_ml_calculator("nosuchmodel")
    with pytest.raises(AdsorbInputError, match="DFT calculator 'vasp'"):
        RunConfig.from_dict({"slabs": ["Pt:111"], "adsorbates": ["*O"], "dft_calculator": "vasp"})
    with pytest.raises(AdsorbInputError, match="ground_truth needs"):
        RunConfig.from_dict({"slabs": ["Pt:111"], "adsorbates": ["*O"], "dft_calculator": "None", "ground_truth": True})


def test_relax_cli_calculator_specs(tmp_path, capsys):
    from eqv2_calc.cli import main
    from eqv2_calc.relax import read_is2re
    from eqv2_calc.relax.testing import slab_systems

    inp = tmp_path / "in.extxyz"
    write(inp, slab_systems(2, rattle=0.05), format="extxyz")
    base = [str(inp), "--no-progress", "--steps", "30"]
    # a module:Class spelling of EMT relaxes exactly like the short name
    assert main(["relax", *base, "--calculator", "emt", "--out", str(tmp_path / "a")]) == 0
    assert main(["relax", *base, "--calculator", "ase.calculators.emt:EMT", "--out", str(tmp_path / "b")]) == 0
    a, b = read_is2re(tmp_path / "a" / "is2re.csv"), read_is2re(tmp_path / "b" / "is2re.csv")
    assert [r["energy"] for r in a] == [r["energy"] for r in b] and [r["nsteps"] for r in a] == [r["nsteps"] for r in b]
    # keyword arguments reach the calculator: EMT's asap_cutoff changes the energies
    assert main(["relax", *base, "--calculator", 'emt{"asap_cutoff": true}', "--out", str(tmp_path / "c")]) == 0
    c = read_is2re(tmp_path / "c" / "is2re.csv")
    final = read(tmp_path / "c" / "structures" / f"{c[0]['name']}.traj")
    final.calc = EMT(asap_cutoff=True)
    assert c[0]["energy"] == pytest.approx(final.get_potential_energy(), abs=1e-10)
    assert abs(c[0]["energy"] - a[0]["energy"]) > 1e-3
    assert json.loads((tmp_path / "c" / "run.json").read_text())["settings"]["potential"] == \
        'calculator:emt{"asap_cutoff":true}'
    # bad specs: exit status 2, a message with the options, and nothing written
    capsys.readouterr()
    for spec, match in (("shipped", "use --checkpoint"), ("nosuch:Calc", "cannot import module 'nosuch'"),
                        ("vasp", "use one of emt, lj, morse")):
        out = tmp_path / f"bad_{spec.replace(':', '_')}"
        assert main(["relax", *base, "--calculator", spec, "--out", str(out)]) == 2
        assert match in capsys.readouterr().err, spec
        assert not (out / "run.json").exists()


def test_named_shipped_models(monkeypatch):
    """shipped-emt / shipped-7net name the files of registry.SHIPPED_MODELS; a missing one is a
    CheckpointError naming the file, an unknown variant lists the known ones."""
    from eqv2_calc.checkpoint import registry
    from eqv2_calc.errors import CheckpointError

    for name, variant in (("shipped-emt", "emt"), ("Shipped-7net", "7net")):
        spec = parse_calculator_spec(name, allow=ML)
        assert spec.kind == "eqv2" and spec.target == name.lower()
    with pytest.raises(CalculatorSpecError, match="not accepted here"):
        parse_calculator_spec("shipped-7net", allow=DFT)
    calc = parse_calculator_spec("shipped-emt", allow=ML).build(device="cpu")
    assert calc.potential.meta.path == str(registry.shipped_checkpoint("emt"))
    with pytest.raises(CheckpointError, match=r"unknown shipped model 'x'.*\['7net', 'emt'\]"):
        registry.shipped_checkpoint("x")
    monkeypatch.setitem(registry.SHIPPED_MODELS, "7net", "not-there.pt")
    with pytest.raises(CheckpointError, match="not-there.pt is not part of this installation"):
        parse_calculator_spec("shipped-7net", allow=ML).build(device="cpu")
