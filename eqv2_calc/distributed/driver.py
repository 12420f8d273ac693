"""Relax many structures on a pool of Ray actors: :func:`relax_on_ray`.

Data flow (the driver is this process)::

    structures ──assign(prefetch per actor)──► actor.submit ──► actor inbox ──► batched relaxer
        ▲                                                                            │
        └── requeue what a dead actor had in flight          on_result ◄── stream ◄──┘
                                                            (driver thread per actor)

- One streaming call per actor returns results one by one; ``on_result`` runs here, in the
  driver's main thread, as each arrives (the AdsorbML store is written only from there).
- No Ray-level retries (actors: ``max_restarts=0``, calls: ``max_task_retries=0``). Ray
  replays a failed stream by *position*, which loses and duplicates items when a retry produces
  them in another order; here a dead actor is replaced and its unfinished structures are
  resubmitted by key (:class:`~eqv2_calc.distributed.ledger.Ledger`), at most
  ``max_attempts`` times each, after which the structure is reported failed
  (``reason="worker_lost"``).
- An error raised *inside* the relaxer (a bad structure, a calculator exception) is not retried:
  it is raised here, and the results already delivered stay delivered.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ase import Atoms

from eqv2_calc.distributed.ledger import Ledger
from eqv2_calc.distributed.options import RayOptions, connect, require_ray
from eqv2_calc.distributed.recipe import recipe_for
from eqv2_calc.distributed.worker import actor_class
from eqv2_calc.errors import InputError

__all__ = ["RayRunStats", "relax_on_ray", "REASON_WORKER_LOST"]

REASON_WORKER_LOST = "worker_lost"
"""``RelaxResult.reason`` of a structure given up after ``max_attempts`` actor deaths."""

_NOT_ON_ACTORS = {
    "trajectory_dir": "the actors' files would stay on their nodes: write RelaxResult.trajectory from on_result",
    "names": "results are matched by position in atoms_list (RelaxResult.index)",
    "stats": "the relaxer's counters stay on the actors; relax_on_ray returns RayRunStats",
}
_NEVER_STARTED = (". No actor ever started: see the worker logs (<ray temp dir>/session_latest/logs); common causes "
                  "are eqv2-calc missing or of another version on the worker nodes, or a RAY_AUTH_MODE that differs "
                  "from the cluster's")


@dataclass
class RayRunStats:
    """What a :func:`relax_on_ray` call did."""

    actors_started: int = 0
    actor_deaths: int = 0
    resubmitted: int = 0
    duplicates_ignored: int = 0
    given_up: int = 0
    wall_time: float = 0.0
    startup_time: float = math.nan  # s until the first actor had its calculator loaded
    actor_info: list[dict] = field(default_factory=list)


@dataclass
class _Slot:
    handle: Any
    ready_ref: Any
    state: str = "starting"  # starting | ready | dead


def _lost_result(index: int, atoms: Atoms, attempts: int) -> Any:
    from eqv2_calc.relax import RelaxResult

    return RelaxResult(index=index, name=str(index), atoms=atoms.copy(), energy=math.nan, fmax=math.nan, nsteps=0,
                       converged=False, failed=True, reason=f"{REASON_WORKER_LOST}: its actor died {attempts} times",
                       initial_energy=math.nan)


def _consume(ray: Any, slot_id: int, handle: Any, events: queue.Queue) -> None:
    """Driver thread: read one actor's result stream into ``events``."""
    try:
        for ref in handle.results.options(num_returns="streaming").remote():
            events.put(("result", slot_id, ray.get(ref)))
        events.put(("end", slot_id, None))
    except ray.exceptions.RayTaskError as exc:  # raised by our code inside the actor
        events.put(("error", slot_id, exc))
    except ray.exceptions.RayError as exc:  # the actor, its process or its node is gone
        events.put(("died", slot_id, exc))


def relax_on_ray(
    atoms_list: Iterable[Atoms],
    calc: Any,
    options: RayOptions | None = None,
    *,
    on_result: Callable[[Any], None] | None = None,
    progress: bool = True,
    keep_results: bool = True,
    log: Callable[[str], None] = print,
    **relax_options: Any,
) -> tuple[list[Any], RayRunStats]:
    """Relax ``atoms_list`` with ``calc`` on Ray actors; returns (results in input order, stats).

    ``keep_results=False``: results are only handed to ``on_result`` (the returned list is
    empty), so a long study does not accumulate them on the driver.

    ``atoms_list`` may be any iterable, also a lazy one (a generator): structures are taken from
    it only as the actors have room (``prefetch``), so producing them overlaps with relaxing.
    ``relax_options`` are those of :func:`eqv2_calc.relax.relax_batch` (``fmax`` eV/Å,
    ``steps``, ``max_atoms``, ``cell_filter``, ...), applied on every actor. ``on_result(r)``
    gets each :class:`~eqv2_calc.relax.RelaxResult` (``r.index`` = position in ``atoms_list``)
    in the driver as soon as it arrives. With an ASE calculator (EMT, ...) the results are
    bit-identical to :func:`relax_batch`'s; with EquiformerV2 in float32 they differ by the
    rounding of other batch compositions.
    """
    from tqdm.auto import tqdm

    options = options or RayOptions()
    for key in sorted(set(relax_options) & set(_NOT_ON_ACTORS)):
        raise InputError(f"relax_on_ray does not take {key}=: {_NOT_ON_ACTORS[key]}")
    total = len(atoms_list) if hasattr(atoms_list, "__len__") else None
    source = iter(atoms_list)
    waiting: dict[int, Atoms] = {}  # key -> structure, until its result is in
    ledger = Ledger(0, options.max_attempts)

    def draw(n: int) -> bool:
        """Move up to ``n`` structures from the source into the ledger; False once it is empty."""
        for _ in range(n):
            try:
                atoms = next(source)
            except StopIteration:
                return False
            waiting[ledger.add()] = atoms
        return True

    more = draw(1)
    if not ledger.n:
        return [], RayRunStats()
    ray = require_ray()
    owned = connect(options, log=log)
    t0 = time.perf_counter()
    stats = RayRunStats()
    results: dict[int, Any] = {}
    events: queue.Queue = queue.Queue()
    slots: list[_Slot] = []
    try:
        recipe = recipe_for(calc, put=ray.put)
        actor = actor_class(options)
        n_actors = options.num_actors(ray.cluster_resources())
        if total is not None:
            n_actors = min(n_actors, total)
        spares = n_actors * options.max_attempts  # replacements allowed over the call

        def spawn() -> None:
            handle = actor.remote(recipe, relax_options, options.device, options.cpus_per_actor)
            slots.append(_Slot(handle, handle.ready.remote()))
            stats.actors_started += 1

        for _ in range(n_actors):
            spawn()
        last_alive = time.monotonic()
        last_error = ""

        def deliver(key: int, r: Any) -> None:
            r.index = key
            waiting.pop(key, None)
            if keep_results:
                results[key] = r
            if on_result is not None:
                on_result(r)
            bar.update(1)

        with tqdm(total=total, desc="relax (ray)", unit="sys", disable=not progress, dynamic_ncols=True) as bar:
            while more or not ledger.complete:
                for sid, s in enumerate(slots):
                    if s.state == "starting" and ray.wait([s.ready_ref], timeout=0)[0]:
                        try:
                            stats.actor_info.append(ray.get(s.ready_ref))
                        except ray.exceptions.RayTaskError as exc:  # the calculator did not build
                            raise exc.as_instanceof_cause() from None
                        except ray.exceptions.RayError as exc:  # died while starting
                            events.put(("died", sid, exc))
                            continue
                        s.state = "ready"
                        if math.isnan(stats.startup_time):
                            stats.startup_time = time.perf_counter() - t0
                        threading.Thread(target=_consume, args=(ray, sid, s.handle, events), daemon=True).start()
                    if s.state == "ready":
                        room = options.prefetch - ledger.outstanding(sid)
                        if more and room > len(ledger.pending):
                            more = draw(room - len(ledger.pending))
                        keys = ledger.assign(sid, room) if room > 0 else []
                        if keys:
                            s.handle.submit.remote([(k, waiting[k]) for k in keys])
                if any(s.state == "ready" for s in slots):
                    last_alive = time.monotonic()
                elif not any(s.state == "starting" for s in slots) and events.empty():
                    raise RuntimeError(f"every Ray actor died and no replacement is left ({stats.actor_deaths} deaths; "
                                       f"last: {last_error}); {len(ledger.done)} of {ledger.n} structures so far "
                                       "finished" + ("" if stats.actor_info else _NEVER_STARTED))
                elif time.monotonic() - last_alive > options.start_timeout:
                    raise RuntimeError(
                        f"no Ray actor came up within {options.start_timeout:.0f} s; each asks for "
                        f"{options.cpus_per_actor} CPU and {options.gpus_per_actor} GPU, the cluster has "
                        f"{ray.available_resources()} free")
                try:
                    kind, sid, payload = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if kind == "result":
                    key, r = payload
                    if ledger.finish(sid, key):
                        deliver(key, r)
                elif kind == "died" and slots[sid].state != "dead":
                    slots[sid].state = "dead"
                    stats.actor_deaths += 1
                    last_error = f"{type(payload).__name__}: {str(payload).splitlines()[0] if str(payload) else ''}"
                    requeued, exhausted = ledger.lose(sid)
                    log(f"Ray actor {sid} died ({type(payload).__name__}); resubmitting {len(requeued)} structures"
                        + (f", giving up {len(exhausted)}" if exhausted else ""))
                    for key in exhausted:
                        ledger.finish(-1, key)
                        stats.given_up += 1
                        deliver(key, _lost_result(key, waiting[key], ledger.attempts[key]))
                    if spares > 0:
                        spares -= 1
                        spawn()
                elif kind == "error":
                    raise payload.as_instanceof_cause() from None
    finally:
        for s in slots:
            ray.kill(s.handle, no_restart=True)
        if owned:
            ray.shutdown()
    stats.resubmitted, stats.duplicates_ignored = ledger.resubmitted, ledger.duplicates
    stats.wall_time = time.perf_counter() - t0
    if not keep_results:
        return [], stats
    assert sorted(results) == list(range(ledger.n))  # every structure exactly once
    return [results[k] for k in range(ledger.n)], stats
