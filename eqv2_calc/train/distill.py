"""Regenerate the teacher data and retrain the distilled shipped model ``checkpoints/eqv2-7net-small.pt``.

One command, seeded end to end, resumable at every stage::

    python -m eqv2_calc.train.distill --threads 2                 # the shipped file: data → runs/distill-data, model → runs/distill-small{,-stage2,-stage3,-stage4}
    python -m eqv2_calc.train.distill --limit 105 --threads 2     # a smaller run on the first 105 labelling jobs

Steps:

1. :func:`eqv2_calc.train.distill_data.generate_distill_dataset` (needs the ``[teacher]``
   extra). Finished jobs are kept, so a killed run continues; ``--limit N`` labels only the
   first N jobs in their fixed, interleaved order. The jobs labelled so far are committed in
   ``data/`` (:data:`~eqv2_calc.train.distill_data.LABELS_ARCHIVE`) and restored first, unless
   ``--relabel``;
2. stage 1, :func:`eqv2_calc.train.loop.train` with :data:`DISTILL_SMALL`: a fine-tune of the
   EMT-trained shipped model (same architecture and graph; element references and energy/force
   scales refitted to the teacher) into ``OUT`` (``runs/distill-small``);
3. stage 2, :data:`DISTILL_STAGE2`: the stage-1 model fine-tuned on the same data with the
   smooth graph :data:`SMOOTH_GRAPH` into ``OUT-stage2``;
4. the active-learning rounds :data:`ACTIVE_ROUNDS`, each followed by a fine-tuning stage:
   round k (in ``<OUT's folder>/<round name>``: the committed archive unless ``--relabel``, else
   the previous stage's model relaxes anew) gives teacher frames along the latest model's own
   relaxations, and stage k + 2 fine-tunes that model on the base data plus rounds 1..k into
   ``OUT-stage<k+2>``; a round can bring more training systems (:class:`MoreSystems`, labelled
   like the base data), which that stage and the later ones train on too, and can relax the
   systems of such a set instead of the base data's (:attr:`ActiveRound.base`). ``--stages N``
   stops after stage N (default :data:`SHIPPED_STAGES`): 2 gives v3, 3 gives v4, 4 (round 2,
   :data:`COMPLEMENT` and stage 4) gives v5, 5 (round 3 on the complement, stage 5 with the
   energy weight raised) gives v6;
5. ``--stages 6``: stage 6, :data:`DISTILL_STAGE6` (the stage-5 model deepened to
   :data:`GROWN_LAYERS` blocks, then fine-tuned on the stage-5 data) into ``OUT-stage6``;
6. the last stage's ``final.pt`` (EMA weights) is copied to ``--dest``.

Every stage resumes from its ``resume.pt``. Evaluate with ``python benchmarks/distill_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eqv2_calc.checkpoint.registry import SHIPPED_MODELS
from eqv2_calc.train.distill_data import LABELS_ARCHIVE, generate_distill_dataset, generation_options, restore_labels
from eqv2_calc.train.grow import grow_layers
from eqv2_calc.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = ROOT / "checkpoints" / SHIPPED_MODELS["7net"]
INIT = ROOT / "checkpoints" / SHIPPED_MODELS["emt"]

DISTILL_SMALL: dict = dict(
    seed=0, epochs=12, batch_size=8, lr=1e-3, min_lr_ratio=0.02, warmup_steps=50, warmup_factor=0.1,
    weight_decay=1e-3, clip_grad_norm=10.0, ema_decay=0.998, energy_coef=4.0, force_coef=10.0,
    refit_normalizers=True, checkpoint_every=100, eval_every=500, log_every=10,
)
"""Stage 1 of the distilled model: training options (TrainConfig fields, without paths)."""

SMOOTH_GRAPH: dict = dict(max_radius=4.5, max_neighbors=500)
"""The radius graph of stage 2: 4.5 Å and no neighbour cap in practice (a metal atom has at most
~50 neighbours within 4.5 Å). Stage 1 inherits the EMT model's graph: 5 Å with the 20 nearest
neighbours kept strictly (the OC20 convention). On the symmetric slabs that AdsorbML starts from,
neighbour shells are exactly degenerate, so that cap cuts through a shell by tie-breaking. On 40
held-out initial placements, 1e-6 Å displacements moved the stage-1 model's energy by 114 meV
(median) and the stage-2 model's by 0.03 meV (``benchmarks/tie_sensitivity.py``)."""

DISTILL_STAGE2: dict = {
    **DISTILL_SMALL, "epochs": 6, "lr": 5e-4, "refit_normalizers": False, "model": SMOOTH_GRAPH,
}
"""Stage 2: the stage-1 model fine-tuned on the same data with :data:`SMOOTH_GRAPH`."""

DISTILL_STAGE3: dict = {**DISTILL_STAGE2, "epochs": 4, "lr": 3e-4}
"""Stage 3: the stage-2 model fine-tuned on the base data plus active-learning round 1
(:mod:`eqv2_calc.train.active_data`: teacher labels along the stage-2 model's own relaxations)."""

DISTILL_STAGE4: dict = {**DISTILL_STAGE3, "epochs": 3}
"""Stage 4: the stage-3 model fine-tuned on the base data plus rounds 1 and 2 (round 2: the
stage-3 model's relaxations from two new starts per system) and :data:`COMPLEMENT` (150 more
training systems), 3 epochs."""

DISTILL_STAGE5: dict = {**DISTILL_STAGE4, "energy_coef": 40.0}
"""Stage 5: the stage-4 model fine-tuned with 10× the energy weight on everything before plus
round 3, with the gas molecules repeated (:attr:`ActiveRound.gas_repeats`). The energy term was
~6 % of the loss; AdsorbML ranks placements and reports adsorption energies by total energy,
where the stage-4 model was 0.45 eV off per held-out system at the teacher's geometries although
its per-atom energy MAE (0.007 eV/atom) looked fine."""


@dataclass(frozen=True)
class MoreSystems:
    """Teacher labels of more training systems: :mod:`~eqv2_calc.train.distill_data` with
    ``complement=True`` (the adsorbates the base data's choice left out on every surface)."""

    name: str
    """Its directory, next to the stage-1 output directory (``runs/<name>``)."""
    archive: Path
    """The committed labels (``jobs/``)."""
    options: dict
    """Arguments of :func:`~eqv2_calc.train.distill_data.generation_options` (the rest: defaults,
    i.e. the base data's seed and choice of adsorbates)."""


COMPLEMENT = MoreSystems("distill-complement", ROOT / "data" / "distill-complement-7net-l3i5-seed0.tar.xz",
                         dict(complement=True, n_initial=10, n_rattle=4, path_frames=0))
"""The other 5 adsorbates of each of the 30 surfaces (150 systems, none of them a validation or
test combination): 10 AdsorbML starts and 4 rattled copies each, no teacher relaxation."""


@dataclass(frozen=True)
class ActiveRound:
    """An active-learning round and the fine-tuning stage that follows it."""

    name: str
    """Its directory, next to the stage-1 output directory (``runs/<name>``)."""
    archive: Path
    """The committed round (``jobs/``, ``ml/``, ``manifest.json``, ``train.extxyz``)."""
    options: dict
    """Options of :func:`~eqv2_calc.train.active_data.generate_active_dataset` (the rest:
    ``ACTIVE_DEFAULTS``). Rounds use disjoint starts (``first_start``, ``n_starts``)."""
    stage: dict
    """TrainConfig fields of the stage trained after it."""
    systems: tuple[MoreSystems, ...] = ()
    """More training systems that this stage (and every later one) also trains on."""
    base: MoreSystems | None = None
    """The data whose training systems the round relaxes (None: the base data)."""
    gas_repeats: int = 0
    """The base data's gas-molecule frames (41 of several thousand) are listed that many more
    times in this stage's training files: every adsorption energy takes its gas references
    (ε_N = ½ E(N2), …) from them."""


ACTIVE_ROUNDS: tuple[ActiveRound, ...] = (
    ActiveRound("distill-al1-v3", ROOT / "data" / "active-round1-v3-b4a7c9b8.tar.xz", dict(n_starts=1),
                DISTILL_STAGE3),
    ActiveRound("distill-al2-v4", ROOT / "data" / "active-round2-v4-0bfa6536.tar.xz",
                dict(n_starts=2, first_start=1), DISTILL_STAGE4, systems=(COMPLEMENT,)),
    ActiveRound("distill-al3-v5", ROOT / "data" / "active-round3-v5-eca1a53a.tar.xz", dict(n_starts=1),
                DISTILL_STAGE5, base=COMPLEMENT, gas_repeats=10),
)
"""The rounds, in order. Round 1 was made by the stage-2 model (v3, sha256 ``b4a7c9b8…``):
113 relaxations, 671 teacher frames (~30 min on 2 cores); round 2 by the stage-3 model (v4,
sha256 ``0bfa6536…``): 226 relaxations, 1,325 teacher frames (~51 min); round 3 by the
stage-4 model (v5, sha256 ``eca1a53a…``) on the :data:`COMPLEMENT` systems (which had no
near-minimum frames): 150 relaxations (145 converged, 5 at 300 steps; end-point error
0.42 eV mean, 3.1 max), 881 teacher frames (540 s on 2 cores)."""

GROWN_LAYERS = 4
"""Blocks of the stage-6 model: the stage-5 model (2 blocks) deepened by
:func:`eqv2_calc.train.grow.grow_layers` (new blocks start as identities)."""

DISTILL_STAGE6: dict = {**DISTILL_STAGE5}
"""Stage 6: the stage-5 model grown to :data:`GROWN_LAYERS` blocks, fine-tuned on the stage-5
data with the stage-5 options. The 2-block model underfits: on its own training data its force
MAE (0.072 eV/Å) is close to the held-out one (0.088). Measured (model card): validation
0.0853 eV/Å / 0.0084 eV/atom (v6 0.0877 / 0.0095), held-out energies 5–10 % better, adsorbate
forces on initial placements worse (0.220 vs 0.208 eV/Å), relaxations unchanged, forward +37 %:
not shipped."""

SHIPPED_STAGES = 5
"""The stage whose model is shipped (``checkpoints/eqv2-7net-small.pt``, v6: stage 5)."""


def active_round(out_dir: Path, spec: ActiveRound, data_dir: Path, model: Path, workers: int, relabel: bool) -> Path:
    """The training file (extxyz) of round ``spec`` in ``out_dir``: its committed archive as is,
    unless ``relabel`` or ``out_dir`` already holds a round; else a new round with ``model``
    relaxing (an existing round of other options is refused)."""
    from eqv2_calc.train.active_data import generate_active_dataset

    manifest = out_dir / "manifest.json"
    if spec.archive.is_file() and not relabel and not manifest.exists():
        restore_labels(out_dir, spec.archive, folders=("jobs", "ml", "."))
    if not (manifest.is_file() and json.loads(manifest.read_text())["complete"]):
        generate_active_dataset(out_dir, data_dir, model, workers=workers, **spec.options)
    return out_dir / "train.extxyz"


def more_systems(out_dir: Path, spec: MoreSystems, workers: int, relabel: bool) -> Path:
    """The training file (extxyz) of ``spec`` in ``out_dir``: its committed labels restored
    (unless ``relabel``), the missing ones labelled by the teacher."""
    if spec.archive.is_file() and not relabel:
        restore_labels(out_dir, spec.archive)
    generate_distill_dataset(out_dir, workers=workers, **generation_options(**spec.options))
    return out_dir / "train.extxyz"


def distill_config(data_dir: Path, out_dir: Path, stage: dict = DISTILL_SMALL, init: Path = INIT,
                   extra_train: Sequence[Path] = (), **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of a stage (:data:`DISTILL_SMALL`, :data:`DISTILL_STAGE2`, or an
    :class:`ActiveRound`'s) for data in ``data_dir`` plus training files ``extra_train``,
    fine-tuning ``init``."""
    return TrainConfig.from_dict({
        **stage, "train": [str(p) for p in (data_dir / "train.extxyz", *extra_train)],
        "val": [str(data_dir / "val.extxyz")],
        "out_dir": str(out_dir), "init_checkpoint": str(init), **overrides,
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqv2_calc.train.distill", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "runs" / "distill-data"))
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "distill-small"))
    p.add_argument("--dest", default=str(DEFAULT_DEST), help="where to copy the final checkpoint")
    p.add_argument("--limit", type=int, help="label only the first N jobs (see distill_data)")
    p.add_argument("--workers", type=int, default=2, help="teacher processes for the data")
    p.add_argument("--threads", type=int, default=0, help="torch threads for training (0 = default)")
    p.add_argument("--epochs", type=int, default=DISTILL_SMALL["epochs"], help="epochs of stage 1")
    p.add_argument("--stages", type=int, choices=range(2, 4 + len(ACTIVE_ROUNDS)), default=SHIPPED_STAGES,
                   help=f"the last stage (default {SHIPPED_STAGES}, the shipped file): 2 gives v3, 3 gives v4 "
                        "(round 1 + stage 3), 4 gives v5 (round 2 + 150 more systems + stage 4), 5 gives v6 "
                        "(round 3 on those systems + stage 5, energy weight x10), 6: stage 5 grown to "
                        f"{GROWN_LAYERS} blocks and fine-tuned")
    p.add_argument("--relabel", action="store_true",
                   help="do not restore the committed labels (data/*.tar.xz): the teacher labels everything anew")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    if LABELS_ARCHIVE.is_file() and not args.relabel:
        print(f"restored {restore_labels(data_dir)} labelled files from {LABELS_ARCHIVE.name} (--relabel: label everything anew)")
    manifest = generate_distill_dataset(data_dir, workers=args.workers, limit=args.limit, **generation_options())
    out = Path(args.out_dir)
    first = train(distill_config(data_dir, out, threads=args.threads, epochs=args.epochs))
    result = train(distill_config(data_dir, out.with_name(out.name + "-stage2"), DISTILL_STAGE2, first.final,
                                  threads=args.threads))
    extra: list[Path] = []
    for k, spec in enumerate(ACTIVE_ROUNDS[:args.stages - 2], start=3):
        base_dir = data_dir if spec.base is None else \
            more_systems(out.parent / spec.base.name, spec.base, args.workers, args.relabel).parent
        extra.append(active_round(out.parent / spec.name, spec, base_dir, result.final, args.workers, args.relabel))
        extra += [more_systems(out.parent / m.name, m, args.workers, args.relabel) for m in spec.systems]
        gas = [data_dir / "jobs" / "gas.extxyz"] * spec.gas_repeats
        result = train(distill_config(data_dir, out.with_name(f"{out.name}-stage{k}"), spec.stage, result.final,
                                      threads=args.threads, extra_train=extra + gas))
    if args.stages == 3 + len(ACTIVE_ROUNDS):
        stage6 = out.with_name(f"{out.name}-stage6")
        grown = stage6 / "grown.pt"
        if not grown.is_file():
            grow_layers(result.final, GROWN_LAYERS, grown)
        gas = [data_dir / "jobs" / "gas.extxyz"] * ACTIVE_ROUNDS[-1].gas_repeats  # as in stage 5
        result = train(distill_config(data_dir, stage6, DISTILL_STAGE6, grown, threads=args.threads,
                                      extra_train=extra + gas))
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.final, dest)
    print(json.dumps({"checkpoint": str(dest), "data": manifest["frames"], "steps": result.step,
                      "seconds": round(result.seconds, 1), "val": result.val_metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
