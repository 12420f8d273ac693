"""adsorbml.metrics on hand-computed cases (every expected number is worked out in comments)."""

from __future__ import annotations

import math

import pytest

from adsorbml.errors import FormatError
from conftest import markdown_table
from adsorbml.formats import read_compute, read_results, read_targets, write_compute, write_results, write_targets
from adsorbml.metrics import format_table, metrics_table, ml_only_success, speedup, success_at_k, system_differences

# Ground truth minima: A −1.30, B −2.00, C −1.00, D −0.50.
TARGETS = {
    "A": [("heur0", -1.00), ("rand0", -1.30), ("rand1", -0.50)],
    "B": [("rand1", -1.95), ("rand0", -2.00)],
    "C": [("rand0", -1.00)],  # every placement anomalous: no results at all
    "D": [("rand0", -0.50)],
}


def r(ml, dft, scf, ionic=1):
    return {"ml_energy": ml, "ml+dft_energy": dft, "scf_steps": scf, "ionic_steps": ionic}


# Inserted deliberately NOT in ascending ML energy. By ML energy, A is c2 (−1.5), c1 (−1.2), c3 (−0.9).
RESULTS = {
    "A": {"c3": r(-0.90, -1.35, 40), "c1": r(-1.20, -1.25, 20), "c2": r(-1.50, -1.00, 30)},
    "B": {"x": r(-2.10, -1.85, 25)},
    "C": {},
    "D": {"b": r(-0.60, -0.40, 15), "a": r(-0.70, -0.80, 10)},
}

COMPUTE = {
    "A": {"heur0": {"scf": 100, "ionic": 10}, "rand0": {"scf": 200, "ionic": 20},
          "rand1": {"scf": 300, "ionic": 30}, "surface": {"scf": 1000, "ionic": 100}},
    "B": {"rand0": {"scf": 50, "ionic": 5}, "rand1": {"scf": 50, "ionic": 5}},
    "C": {"rand0": {"scf": 400, "ionic": 40}},
    "D": {"rand0": {"scf": 100, "ionic": 10}},
}


def test_differences_sort_by_ml_energy_not_insertion_order():
    d1 = system_differences(TARGETS, RESULTS, 1)
    # A: top-1 by ML is c2 → −1.00 − (−1.30) = 0.30 (insertion order would pick c3 → −0.05)
    assert d1["A"] == pytest.approx(0.30)
    assert d1["B"] == pytest.approx(0.15)  # −1.85 − (−2.00)
    assert d1["C"] == math.inf  # nothing valid
    assert d1["D"] == pytest.approx(-0.30)  # −0.80 − (−0.50): lower than ground truth
    d2 = system_differences(TARGETS, RESULTS, 2)
    assert d2["A"] == pytest.approx(0.05)  # min(−1.00, −1.25) + 1.30
    d3 = system_differences(TARGETS, RESULTS, 3)
    assert d3["A"] == pytest.approx(-0.05)  # −1.35 + 1.30


def test_success_rates():
    # k=1: only D (lower than GT counts) → 1/4; D is also "much better" (−0.30 < −0.1)
    assert success_at_k(TARGETS, RESULTS, 1) == pytest.approx((0.25, 0.25))
    # k=2: A (0.05) and D → 2/4; B (0.15) and C (all anomalous) fail at every k
    assert success_at_k(TARGETS, RESULTS, 2) == pytest.approx((0.5, 0.25))
    assert success_at_k(TARGETS, RESULTS, 5) == pytest.approx((0.5, 0.25))


def test_all_anomalous_system_fails_even_if_missing_from_results():
    results = {k: v for k, v in RESULTS.items() if k != "C"}
    assert system_differences(TARGETS, results, 5)["C"] == math.inf
    assert success_at_k({"C": TARGETS["C"]}, results, 5) == (0.0, 0.0)


def test_threshold_is_inclusive_despite_rounding():
    # −1.0 − (−1.1) is 0.10000000000000009 in floating point; on paper it is exactly 0.1 → success
    assert success_at_k({"s": [("a", -1.1)]}, {"s": {"c": r(-5.0, -1.0, 1)}}, 1) == (1.0, 0.0)
    assert success_at_k({"s": [("a", -1.1)]}, {"s": {"c": r(-5.0, -0.99, 1)}}, 1) == (0.0, 0.0)


def test_missing_dft_energy_in_top_k_contributes_nothing():
    res = {"s": {"a": r(-3.0, None, None), "b": r(-2.0, -1.0, 5)}}
    tg = {"s": [("x", -1.0)]}
    assert success_at_k(tg, res, 1) == (0.0, 0.0)
    assert success_at_k(tg, res, 2) == (1.0, 0.0)


def test_ml_only_success():
    # A: c* = c2, |−1.00 − (−1.50)| = 0.5 > 0.1 → not validated.
    # B: |−1.85 − (−2.10)| = 0.25 → not validated. C: nothing.
    # D: c* = a, |−0.80 − (−0.70)| = 0.1 → validated; −0.70 − (−0.50) = −0.2 ≤ 0.1 → success.
    assert ml_only_success(TARGETS, RESULTS) == pytest.approx(0.25)


def test_speedup():
    # Ground truth, surface excluded: SCF 600 + 100 + 400 + 100 = 1200, ionic 60 + 10 + 40 + 10 = 120.
    # k=1: A c2 (30) + B x (25) + D a (10) = 65 SCF, 3 ionic
    sp = speedup(COMPUTE, TARGETS, RESULTS, 1)
    assert sp["scf"] == pytest.approx(1200 / 65)
    assert sp["ionic"] == pytest.approx(40.0)
    # k=2: A 30+20, B 25, D 10+15 = 100 SCF; ionic 2+1+2 = 5
    sp = speedup(COMPUTE, TARGETS, RESULTS, 2)
    assert sp == pytest.approx({"scf": 12.0, "ionic": 24.0})
    # k=3: A 90, B 25, D 25 = 140 SCF; ionic 6
    assert speedup(COMPUTE, TARGETS, RESULTS, 3) == pytest.approx({"scf": 1200 / 140, "ionic": 20.0})


def test_speedup_with_force_calls_only():
    compute = {"s": {"a": {"scf": None, "ionic": 90}, "b": {"scf": None, "ionic": 30}}}
    res = {"s": {"c": {"ml_energy": -1.0, "ml+dft_energy": -1.0, "scf_steps": None, "ionic_steps": 1}}}
    assert speedup(compute, {"s": [("a", -1.0)]}, res, 1) == {"scf": None, "ionic": 120.0}


def test_table():
    rows = metrics_table(TARGETS, RESULTS, COMPUTE, k_max=5, ml_seconds_per_relaxation=1.5)
    assert [row.k for row in rows] == [1, 2, 3, 4, 5]
    assert rows[0].success == pytest.approx(0.25) and rows[1].success == pytest.approx(0.5)
    assert rows[1].speedup_scf == pytest.approx(12.0)
    text = format_table(rows)
    assert text.count("\n") == 6  # header, rule, 5 rows
    table = markdown_table(text)
    assert [row["k"] for row in table] == ["1", "2", "3", "4", "5"]
    assert table[1] == {
        "k": "2", "success": "50.0 %", "much better": "25.0 %", "speedup (SCF)": "12.0×",
        "speedup (ionic / force calls)": "24.0×", "ML-only success": "25.0 %", "systems": "4",
        "ML s/relaxation": "1.50",
    }
    assert table[0]["success"] == "25.0 %" and table[0]["speedup (SCF)"] == f"{1200 / 65:.1f}×"


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".pkl"])
def test_round_trip(tmp_path, suffix):
    write_targets(tmp_path / f"t{suffix}", TARGETS)
    write_compute(tmp_path / f"c{suffix}", COMPUTE)
    write_results(tmp_path / f"r{suffix}", RESULTS)
    t = read_targets(tmp_path / f"t{suffix}")
    c = read_compute(tmp_path / f"c{suffix}")
    res = read_results(tmp_path / f"r{suffix}")
    assert {s: sorted(v) for s, v in t.items()} == {s: sorted(v) for s, v in TARGETS.items()}
    assert t["B"] == [("rand0", -2.00), ("rand1", -1.95)]  # written ascending, like OC20-Dense
    assert c == COMPUTE
    assert res == RESULTS
    assert list(res["A"]) == ["c2", "c1", "c3"]  # written in ascending ML energy for dense_eval.py
    # metrics are unchanged by the round trip
    assert metrics_table(t, res, c) == metrics_table(TARGETS, RESULTS, COMPUTE)


def test_oc20_dense_pickle_layout(tmp_path):
    import pickle

    import numpy as np

    # as in oc20dense_targets.pkl: list of tuples with numpy float64 energies
    with open(tmp_path / "targets.pkl", "wb") as f:
        pickle.dump({"6_1134_23": [("rand11", np.float64(-0.7)), ("heur3", np.float64(-0.6))]}, f)
    t = read_targets(tmp_path / "targets.pkl")
    assert t == {"6_1134_23": [("rand11", -0.7), ("heur3", -0.6)]}
    assert type(t["6_1134_23"][0][1]) is float


def test_bad_input():
    with pytest.raises(FormatError, match="non-empty list"):
        metrics_table({"s": []}, {})
    with pytest.raises(FormatError, match="ml_energy"):
        metrics_table(TARGETS, {"A": {"c": {"energy": 1.0}}})
    with pytest.raises(FormatError, match="unknown keys"):
        metrics_table(TARGETS, {"A": {"c": {"ml_energy": 1.0, "dft": 2}}})
    with pytest.raises(FormatError, match="compute has no entry"):
        speedup({}, TARGETS, RESULTS, 1)
    with pytest.raises(FormatError, match="unknown file type"):
        write_targets("x.csv", TARGETS)
    with pytest.raises(ValueError, match="k must be"):
        success_at_k(TARGETS, RESULTS, 0)
