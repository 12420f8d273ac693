#!/usr/bin/env bash
# Acceptance check of the packaging (issue #9): a wheel built from a clean clone, installed
# into a fresh venv and used from another directory, runs EquiformerV2Calculator() and
# `adsorbml demo --placements 1` on the shipped distilled model with the SevenNet teacher.
#
#   .ci/wheel_smoke.sh            # or: make wheel-smoke
#
# Clones the repository's committed HEAD (uncommitted edits are not tested), so commit first.
# Needs network access to PyPI (torch==2.13.0, the dependencies, setuptools for the build).
# Env: PY (python for the venv, default python3), KEEP=1 keeps the work directory.
# Measured on 19fa153 (2-core machine, warm pip cache): 4 min 36 s in all; the demo (39 ML
# relaxations with the distilled model, 31 SevenNet single points, teacher gas references)
# took about 3.3 min of it.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/eqv2-wheel-smoke.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then
  echo "work directory (kept): $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
T0=$SECONDS
step() { echo "[wheel-smoke +$((SECONDS - T0))s] $*"; }

step "clean clone of $REPO"
git clone -q --no-hardlinks "$REPO" "$WORK/src"

step "fresh venv, torch==2.13.0 first"
"$PY" -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
"$BIN/python" -m pip install -q --upgrade pip
"$BIN/python" -m pip install -q torch==2.13.0

step "build the wheel from the clone"
"$BIN/python" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/eqv2_calc-*.whl)"
"$BIN/python" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = {"eqv2_calc/shipped/eqv2-emt-small.pt", "eqv2_calc/shipped/README.md",
           "eqv2_calc/shipped/eqv2-7net-small.pt", "eqv2_calc/shipped/eqv2-7net-small.md"} - names
assert not missing, f"wheel lacks {missing}"
print(f"  {sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, both shipped models and their cards included")
EOF

step "install the wheel (+ adsorbml, ray and teacher extras; dependencies from PyPI)"
"$BIN/python" -m pip install -q "$WHEEL[adsorbml,ray,teacher]"
rm -rf "$WORK/src"  # nothing may come from the source tree

RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"  # another directory, not the repository

step "EquiformerV2Calculator() on the shipped model, from $RUN"
"$BIN/python" - <<'EOF'
import hashlib, math, os
import numpy as np
from ase.build import add_adsorbate, fcc111
import eqv2_calc
from eqv2_calc import EquiformerV2Calculator

assert "site-packages" in eqv2_calc.__file__, eqv2_calc.__file__
calc = EquiformerV2Calculator(device="cpu")
path = calc.metadata["path"]
assert path.endswith(os.path.join("site-packages", "eqv2_calc", "shipped", "eqv2-emt-small.pt")), path
card = open(os.path.join(os.path.dirname(path), "README.md")).read()
sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
assert calc.metadata["sha256"] == sha and sha in card, "installed model differs from the model card's sha256"
slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
add_adsorbate(slab, "O", 1.5, "fcc")
slab.calc = calc
e, f = slab.get_potential_energy(), slab.get_forces()
assert math.isfinite(e) and np.isfinite(f).all() and f.shape == (len(slab), 3)
print(f"  Cu(111)+O, {len(slab)} atoms: E = {e:.4f} eV, max |F| = {np.abs(f).max():.3f} eV/Å ({path})")
EOF

step "the shipped model on a Ray actor (checkpoint bytes through the object store), from $RUN"
RAY_USAGE_STATS_ENABLED=0 "$BIN/python" - <<'EOF'
import numpy as np
from ase.build import add_adsorbate, fcc111
from eqv2_calc import EquiformerV2Calculator
from eqv2_calc.distributed import RayOptions, relax_on_ray
from eqv2_calc.relax import relax_batch

slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
add_adsorbate(slab, "O", 1.5, "fcc")
calc = EquiformerV2Calculator(device="cpu")
(one,) = relax_batch([slab], calc, fmax=0.05, steps=5, progress=False)
(ray_result,), stats = relax_on_ray([slab], calc, RayOptions(address="local", actors=1), fmax=0.05, steps=5,
                                    progress=False)
assert stats.actors_started == 1 and stats.actor_deaths == 0
assert ray_result.nsteps == one.nsteps and abs(ray_result.energy - one.energy) < 1e-5, (ray_result.energy, one.energy)
print(f"  Ray actor: E = {ray_result.energy:.5f} eV after {ray_result.nsteps} steps (one process {one.energy:.5f} eV)")
EOF

step "adsorbml demo --placements 1 (distilled model, SevenNet single points)"
"$BIN/adsorbml" demo --placements 1 --out "$RUN/demo" --quiet | tee "$RUN/demo.log"
grep -q "ML model: the shipped EquiformerV2 checkpoint (.*site-packages/eqv2_calc/shipped/eqv2-7net-small.pt)" "$RUN/demo.log"
grep -q "lowest adsorption energy per system" "$RUN/demo.log"
test -s "$RUN/demo/results.json"
"$BIN/python" - "$RUN/demo" <<'EOF'
import json, sys
results = json.load(open(f"{sys.argv[1]}/results.json"))
assert len(results) == 6, sorted(results)  # 3 adsorbates x 2 surfaces
print(f"  results.json: {len(results)} systems")
EOF

step "OK: the wheel carries the shipped model; calculator, a Ray actor and adsorbml demo ran from outside the repo"
