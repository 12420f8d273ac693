"""Training loop: AdamW, linear warm-up + cosine learning rate, gradient clipping, EMA,
fairchem-layout checkpoints and exact resume.

The EquiformerV2 forward is differentiable end to end (it has no dropout, drop-path or other
randomness, so train and eval mode compute the same function); energies and direct forces
come out in eV and eV/Å. Training runs on the model's de-normalised outputs; the
normalisation lives in the model buffers:

* ``element_refs`` [Z] (eV): per-element linear references fitted by least squares on the
  training energies (:func:`~eqv2_calc.train.dataset.fit_element_references`);
* ``energy_std`` (eV): std of the training energies after subtracting the references,
  ``energy_mean`` = 0 (a per-system constant would break size extensivity);
* ``force_std`` (eV/Å): RMS of the free-atom force components, ``force_mean`` = 0;
* ``avg_num_nodes`` / ``avg_degree`` (config): mean atoms per frame and mean in-degree.

So the network's raw outputs (Σ e_i / avg_num_nodes and f_i) are O(1). Losses are divided by
energy_std / avg_num_nodes (eV/atom) and force_std, see :mod:`eqv2_calc.train.loss`.

Files in ``out_dir``:

* ``checkpoint.pt``: fairchem 2023 layout (:func:`eqv2_calc.checkpoint.save.save_fairchem_checkpoint`):
  config + raw weights in ``state_dict`` + normalizers + ``elementrefs`` + EMA shadow weights
  in ``ema``; :func:`eqv2_calc.checkpoint.load_model` reads it (``use_ema=True`` for EMA);
* ``best_ema.pt`` / ``final.pt`` (end of training): the same layout with the **EMA weights
  as state_dict**, which is what fairchem's OCPCalculator and ``load_model`` use by default;
* ``resume.pt``: optimizer, scheduler, EMA, step and raw weights, written together with
  ``checkpoint.pt``; ``train(..., resume=True)`` continues from it bit-for-bit (the data order
  of every epoch is a pure function of (seed, epoch));
* ``log.jsonl``: one JSON line per logged step / evaluation; ``train_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eqv2_calc.errors import InputError
from eqv2_calc.io import atomic_write, atomic_write_text
from eqv2_calc.model import EquiformerV2, EquiformerV2Config
from eqv2_calc.resume import check_settings, select_settings, settings_sha256
from eqv2_calc.train.dataset import GraphDataset, epoch_order, collate, fit_element_references, read_frames
from eqv2_calc.train.loss import MetricSums, energy_force_loss

RESUME_FILE = "resume.pt"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.pt"


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON-serialisable).

    model: :class:`EquiformerV2Config` fields (``avg_num_nodes``/``avg_degree`` are set from
    the training data unless given). Paths: extxyz or ASE db files. ``epochs`` sets the
    length; ``max_steps`` (if > 0) caps it. ``lr`` peak learning rate, ``warmup_steps`` linear
    warm-up from ``lr * warmup_factor``, then cosine decay to ``lr * min_lr_ratio``.
    ``clip_grad_norm``: max global gradient norm. ``ema_decay``: EMA of the weights (0 = off).
    ``checkpoint_every``/``eval_every``/``log_every`` in optimizer steps (0 = only at the end).
    ``init_checkpoint``: fine-tune from a checkpoint (its architecture and normalisation are
    kept unless ``refit_normalizers``; ``model`` may then change only the graph,
    :data:`GRAPH_FIELDS`, e.g. cutoff in Å; ``trust_checkpoint`` allows a file beyond the safe
    unpickling allow-list, see :func:`~eqv2_calc.checkpoint.load_model`). ``threads``: torch
    intra-op threads (0 = leave).
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    out_dir: str = "runs/train"
    model: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    trust_checkpoint: bool = False
    refit_normalizers: bool = False
    seed: int = 0
    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 100
    warmup_factor: float = 0.1
    weight_decay: float = 1e-3
    clip_grad_norm: float = 10.0
    ema_decay: float = 0.999
    energy_coef: float = 1.0
    force_coef: float = 5.0
    checkpoint_every: int = 200
    eval_every: int = 0
    log_every: int = 10
    eval_batch_size: int = 16
    threads: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown training options {unknown}; known: {sorted(known)}")
        d = dict(d)
        for k in ("train", "val"):
            if isinstance(d.get(k), str):
                d[k] = [d[k]]
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- schedule / EMA
def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up from
    ``warmup_factor`` to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of the trainable parameters (decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates, like fairchem's ExponentialMovingAverage)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def swap_into(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Copy the EMA weights into ``model``; returns the previous weights (for :meth:`restore`)."""
        saved = {}
        for k, p in model.named_parameters():
            if k in self.shadow:
                saved[k] = p.detach().clone()
                p.copy_(self.shadow[k])
        return saved

    @staticmethod
    @torch.no_grad()
    def restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
        for k, p in model.named_parameters():
            if k in saved:
                p.copy_(saved[k])


# --------------------------------------------------------------------------- model setup
def build_model(cfg: TrainConfig, train_ds_frames, progress: bool) -> tuple[EquiformerV2, GraphDataset]:
    """Model (seeded init or ``init_checkpoint``) and the training GraphDataset; sets the
    normalisation buffers from the training data (see module docstring)."""
    if cfg.init_checkpoint:
        from eqv2_calc.checkpoint import load_model

        model, _ = load_model(cfg.init_checkpoint, trust_checkpoint=cfg.trust_checkpoint)
        if cfg.model:
            model = with_graph(model, cfg.model)
        mcfg = model.cfg
    else:
        mcfg = EquiformerV2Config(**cfg.model)
        model = None
    ds = GraphDataset(train_ds_frames, mcfg.max_radius, mcfg.max_neighbors, mcfg.enforce_max_neighbors_strictly,
                      mcfg.use_pbc, mcfg.max_num_elements, progress=progress)
    if model is None:
        fields = dict(cfg.model)
        fields.setdefault("avg_num_nodes", ds.mean_atoms)
        fields.setdefault("avg_degree", ds.mean_degree)
        mcfg = EquiformerV2Config(**fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = EquiformerV2(mcfg)
    if model is not None and (not cfg.init_checkpoint or cfg.refit_normalizers):
        set_normalizers(model, train_ds_frames)
    model = model.float().requires_grad_(True).train()
    return model, ds


GRAPH_FIELDS: tuple[str, ...] = ("max_radius", "max_neighbors", "enforce_max_neighbors_strictly")
"""The :class:`EquiformerV2Config` fields a fine-tune may change (``TrainConfig.model`` with
``init_checkpoint``): they define the radius graph, not the weights."""


def with_graph(model: EquiformerV2, graph: dict[str, Any]) -> EquiformerV2:
    """A copy of ``model`` (same weights) with the graph fields :data:`GRAPH_FIELDS` of ``graph``."""
    bad = sorted(set(graph) - set(GRAPH_FIELDS))
    if bad:
        raise InputError(f"a fine-tune (init_checkpoint) keeps the architecture: 'model' may only set {list(GRAPH_FIELDS)}, "
                         f"got {bad}")
    new = EquiformerV2(dataclasses.replace(model.cfg, **graph))
    new.load_state_dict(model.state_dict())
    return new


@torch.no_grad()
def set_normalizers(model: EquiformerV2, frames) -> dict[str, float]:
    """Fit element_refs and energy/force scales on ``frames`` into the model buffers."""
    refs = fit_element_references(frames, model.cfg.max_num_elements)
    resid = np.array([fr.energy - refs[fr.atoms.numbers].sum() for fr in frames])
    e_std = float(max(resid.std(), 1e-3))
    fvals = np.concatenate([fr.forces[~fr.fixed].ravel() for fr in frames])
    f_std = float(max(np.sqrt(np.mean(fvals**2)) if fvals.size else 1.0, 1e-3))
    model.element_refs.copy_(torch.as_tensor(refs, dtype=model.element_refs.dtype))
    model.energy_mean.fill_(0.0)
    model.energy_std.fill_(e_std)
    model.force_mean.fill_(0.0)
    model.force_std.fill_(f_std)
    return {"energy_std": e_std, "force_std": f_std}


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: EquiformerV2, ds: GraphDataset, batch_size: int = 16) -> dict[str, float]:
    """Error metrics of ``model`` on ``ds`` (see :class:`~eqv2_calc.train.loss.MetricSums`)."""
    was_training = model.training
    model.eval()
    sums = MetricSums()
    for b in ds.batches(batch_size, dtype=model.dtype, device=model.device):
        e, f = model(*b.model_inputs())
        sums.add(e, f, b.energy, b.forces, b.natoms, b.free)
    model.train(was_training)
    return sums.result()


def _save(model, ema, path: Path, cfg: TrainConfig, step: int, ema_as_state_dict: bool, metrics=None) -> None:
    from eqv2_calc.checkpoint.save import save_fairchem_checkpoint

    extra = {"eqv2_train": {"train_config": cfg.to_dict(), "step": step,
                            "weights": "ema" if ema_as_state_dict else "raw", "metrics": metrics or {}},
             "optim": {"batch_size": cfg.batch_size, "lr_initial": cfg.lr, "clip_grad_norm": cfg.clip_grad_norm,
                       "ema_decay": cfg.ema_decay, "energy_coefficient": cfg.energy_coef,
                       "force_coefficient": cfg.force_coef, "loss_energy": "mae", "loss_force": "l2mae",
                       "optimizer_params": {"weight_decay": cfg.weight_decay}},
             "cmd": {"seed": cfg.seed}}
    ema_sd = ema.shadow if ema is not None else None
    if ema_as_state_dict and ema is not None:
        saved = ema.swap_into(model)
        try:
            save_fairchem_checkpoint(model, path, extra_config=extra, ema_state_dict=ema_sd)
        finally:
            EMA.restore(model, saved)
    else:
        save_fairchem_checkpoint(model, path, extra_config=extra, ema_state_dict=ema_sd)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    atomic_write(path, _write)


@dataclass
class TrainResult:
    """Outcome of :func:`train`: final step, paths, last metrics, wall seconds."""

    step: int
    out_dir: Path
    checkpoint: Path
    final: Path
    train_metrics: dict[str, float]
    val_metrics: dict[str, float]
    seconds: float
    losses: list[float]


def train(
    cfg: TrainConfig, resume: bool = True, progress: bool = True,
    stop_after: int | None = None, time_limit: float | None = None,
) -> TrainResult:
    """Train (or fine-tune) an EquiformerV2 on energies and forces; see module docstring.

    With ``resume`` and an existing ``out_dir/resume.pt`` the run continues from there
    (the stored config must match in :data:`RESUME_KEYS`; length, evaluation, logging and
    thread options may change, see :data:`RESUME_FREE`).
    Returns a :class:`TrainResult`; the final EMA weights are in ``out_dir/final.pt``.

    ``stop_after`` (optimizer steps) / ``time_limit`` (seconds): stop early as if killed
    right after a checkpoint (``checkpoint.pt`` + ``resume.pt`` written, no ``final.pt``, no
    final evaluation); a later call continues the same schedule.
    """

    if not cfg.train:
        raise InputError("no training data given (TrainConfig.train)")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume, progress, stop_after, time_limit)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: bool, progress: bool, stop_after: int | None,
           time_limit: float | None) -> TrainResult:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = read_frames(cfg.train)
    model, ds = build_model(cfg, frames, progress)
    mc = model.cfg
    val_ds = None
    if cfg.val:
        val_ds = GraphDataset(read_frames(cfg.val), mc.max_radius, mc.max_neighbors,
                              mc.enforce_max_neighbors_strictly, mc.use_pbc, mc.max_num_elements)
    steps_per_epoch = math.ceil(len(ds) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.warmup_factor, cfg.min_lr_ratio))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    e_scale = float(model.energy_std) / mc.avg_num_nodes
    f_scale = float(model.force_std)
    step = 0
    resume_path = out / RESUME_FILE
    if resume and resume_path.is_file():
        # our own file, but it holds only tensors, dicts, lists and numbers (model, AdamW, LambdaLR
        # and EMA state dicts, TrainConfig as a dict): no full unpickling needed
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        _check_resume(state["train_config"], cfg)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
    atomic_write_text(out / "train_config.json", json.dumps(
        {**cfg.to_dict(), "resolved_model": mc.to_dict(), "steps": total,
         "energy_std": float(model.energy_std), "force_std": float(model.force_std)}, indent=1))
    log = open(out / "log.jsonl", "a")
    losses: list[float] = []
    val_metrics: dict[str, float] = {}

    def checkpoint() -> None:
        _save(model, ema, out / CHECKPOINT_FILE, cfg, step, ema_as_state_dict=False)
        settings = resume_settings(cfg)
        _atomic_torch_save({
            "train_config": cfg.to_dict(), "settings": settings, "settings_sha256": settings_sha256(settings),
            "step": step, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
        }, resume_path)

    bar = tqdm(total=total, initial=step, desc="train", disable=not progress)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        order = epoch_order(len(ds), cfg.batch_size, True, cfg.seed, epoch)
        for idx in order[pos:]:
            if step >= total:
                break
            b = collate([ds.items[i] for i in idx], model.dtype, model.device)
            e, f = model(*b.model_inputs())
            parts = energy_force_loss(e, f, b.energy, b.forces, b.natoms, b.free,
                                      cfg.energy_coef, cfg.force_coef, e_scale, f_scale)
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm) if cfg.clip_grad_norm > 0 else None
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            loss = float(parts.total.detach())
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.log_every and step % cfg.log_every == 0:
                log.write(json.dumps({"step": step, "epoch": epoch, "loss": loss, "loss_e": float(parts.energy.detach()),
                                      "loss_f": float(parts.force.detach()), "lr": sched.get_last_lr()[0],
                                      "grad_norm": None if gnorm is None else float(gnorm),
                                      "time": round(time.perf_counter() - t0, 1)}) + "\n")
                log.flush()
            if val_ds is not None and cfg.eval_every and step % cfg.eval_every == 0:
                val_metrics = _eval_ema(model, ema, val_ds, cfg.eval_batch_size)
                log.write(json.dumps({"step": step, "val": val_metrics}) + "\n")
                log.flush()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
            if (stop_after is not None and step >= stop_after) or (
                time_limit is not None and time.perf_counter() - t0 > time_limit
            ):
                break
        else:
            continue
        break  # stopped early
    bar.close()
    checkpoint()
    if step < total:
        log.write(json.dumps({"step": step, "stopped_early": True}) + "\n")
        log.close()
        return TrainResult(step=step, out_dir=out, checkpoint=out / CHECKPOINT_FILE, final=out / FINAL_FILE,
                           train_metrics={}, val_metrics={}, seconds=time.perf_counter() - t0, losses=losses)
    train_metrics = _eval_ema(model, ema, ds, cfg.eval_batch_size)
    if val_ds is not None:
        val_metrics = _eval_ema(model, ema, val_ds, cfg.eval_batch_size)
    seconds = time.perf_counter() - t0
    _save(model, ema, out / FINAL_FILE, cfg, step, ema_as_state_dict=True,
          metrics={"train": train_metrics, "val": val_metrics, "seconds": round(seconds, 1)})
    log.write(json.dumps({"step": step, "final": True, "train": train_metrics, "val": val_metrics,
                          "seconds": round(seconds, 1)}) + "\n")
    log.close()
    return TrainResult(step=step, out_dir=out, checkpoint=out / CHECKPOINT_FILE, final=out / FINAL_FILE,
                       train_metrics=train_metrics, val_metrics=val_metrics, seconds=seconds, losses=losses)


def _eval_ema(model, ema, ds, batch_size) -> dict[str, float]:
    saved = ema.swap_into(model) if ema is not None else None
    try:
        return evaluate(model, ds, batch_size)
    finally:
        if saved is not None:
            EMA.restore(model, saved)


RESUME_KEYS: tuple[str, ...] = (
    "train", "model", "init_checkpoint", "refit_normalizers", "seed", "batch_size", "lr", "min_lr_ratio",
    "warmup_steps", "warmup_factor", "weight_decay", "clip_grad_norm", "ema_decay", "energy_coef", "force_coef",
)
"""TrainConfig fields that determine the trained weights step by step (allow-list, see
:mod:`eqv2_calc.resume`); a resumed run must use the same values."""

RESUME_FREE: tuple[str, ...] = (
    "epochs", "max_steps",  # length of the run: a resumed run may be extended or shortened
    "val", "eval_every", "eval_batch_size", "log_every", "checkpoint_every", "threads", "out_dir",  # execution
    "trust_checkpoint",  # whether the init file may be fully unpickled: no effect on the weights
)
"""TrainConfig fields a resumed run may change. The learning-rate schedule follows the new
length (``epochs``/``max_steps``) from the resumed step on."""


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The :data:`RESUME_KEYS` of ``cfg`` (recorded in ``resume.pt``)."""
    return select_settings(cfg.to_dict(), RESUME_KEYS)


def _check_resume(stored: dict, cfg: TrainConfig) -> None:
    """``stored``: the ``train_config`` of ``resume.pt`` (all fields; files of every version)."""
    check_settings(
        {k: stored[k] for k in RESUME_KEYS if k in stored}, resume_settings(cfg),
        where=f"the training run in {cfg.out_dir}",
        hint="use another out_dir (--out), or start over (resume=False, --no-resume)",
        error=InputError,
    )


__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "EMA", "lr_factor", "set_normalizers", "build_model"]
