"""The driver's bookkeeping and the relax actor, without Ray: results matched by key survive
scrambled order, duplicates and dead actors; the actor relaxes exactly like relax_batch."""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.emt import EMT

from eqv2_calc.distributed.ledger import Ledger
from eqv2_calc.distributed.options import RAY_INSTALL_HINT, RayOptions, add_ray_arguments, options_from_args
from eqv2_calc.distributed.recipe import CalculatorRecipe
from eqv2_calc.distributed.worker import RelaxWorker
from eqv2_calc.errors import InputError
from eqv2_calc.relax import relax_batch


def _simulate(n: int, seed: int, kills: int, max_attempts: int = 5, prefetch: int = 3) -> tuple[dict, Ledger]:
    """Two fake actors that return their structures in a random order, sometimes twice, and die
    ``kills`` times; the driver's rule is the ledger's. Returns key → delivering actor, ledger."""
    rng = random.Random(seed)
    ledger = Ledger(n, max_attempts)
    queues: dict[int, list[int]] = {0: [], 1: []}
    delivered: dict[int, int] = {}
    next_slot = 2
    while not ledger.complete:
        for slot in list(queues):
            queues[slot] += ledger.assign(slot, prefetch - ledger.outstanding(slot))
        slot = rng.choice(list(queues))
        if kills and rng.random() < 0.15 and queues[slot]:
            kills -= 1
            requeued, exhausted = ledger.lose(slot)
            assert not exhausted
            # the dead actor's already-sent results may still arrive later: replay one of them
            late = rng.choice(queues.pop(slot))
            queues[next_slot] = []
            next_slot += 1
            if ledger.finish(slot, late):
                delivered[late] = slot
            continue
        if not queues[slot]:
            continue
        key = queues[slot].pop(rng.randrange(len(queues[slot])))  # any order
        if ledger.finish(slot, key):
            assert key not in delivered
            delivered[key] = slot
        if rng.random() < 0.2:  # the same result again (a replayed stream)
            assert not ledger.finish(slot, key)
    return delivered, ledger


@pytest.mark.parametrize("seed", range(20))
def test_scrambled_duplicated_and_lost_results_each_counted_once(seed):
    delivered, ledger = _simulate(40, seed, kills=3)
    assert sorted(delivered) == list(range(40))
    assert ledger.complete and not ledger.pending
    assert all(1 <= a <= 4 for a in ledger.attempts)


def test_lost_structures_are_resubmitted_first_and_given_up_after_max_attempts():
    ledger = Ledger(5, max_attempts=2)
    assert ledger.assign(0, 2) == [0, 1]
    assert ledger.assign(1, 2) == [2, 3]
    assert ledger.finish(0, 1)
    assert ledger.lose(0) == ([0], [])
    assert list(ledger.pending) == [0, 4]  # resubmitted at the front, in key order
    assert ledger.assign(1, 1) == [0]
    assert ledger.lose(1) == ([2, 3], [0])  # 0 has had its 2 attempts
    assert ledger.resubmitted == 3


def test_worker_in_process_relaxes_like_relax_batch():
    structures = []
    for i in range(5):
        s = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        s.rattle(0.05, seed=i)
        structures.append(s)
    expected = relax_batch(structures, EMT(), fmax=0.05, steps=40, progress=False)
    w = RelaxWorker(CalculatorRecipe(calculator=EMT()), {"fmax": 0.05, "steps": 40})
    assert w.submit([(f"k{i}", a) for i, a in enumerate(structures[:3])]) == 3
    stream = w.results()
    got = dict([next(stream)])
    w.submit([(f"k{i}", a) for i, a in enumerate(structures) if i >= 3])  # while the stream runs
    w.close()
    got.update(stream)
    assert sorted(got) == [f"k{i}" for i in range(5)]
    for i, e in enumerate(expected):
        r = got[f"k{i}"]
        assert (r.energy, r.nsteps) == (e.energy, e.nsteps)
        np.testing.assert_array_equal(r.atoms.positions, e.atoms.positions)


def test_worker_stream_raises_the_relaxers_error():
    w = RelaxWorker(CalculatorRecipe(calculator=EMT()), {"fmax": -1.0})
    w.submit([("a", fcc111("Cu", (1, 1, 3), vacuum=5.0))])
    w.close()
    with pytest.raises(InputError, match="fmax"):
        list(w.results())


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_ray_arguments(p)
    return p.parse_args(list(argv))


def test_ray_flags_and_the_install_hint(monkeypatch):
    assert options_from_args(_args()) is None
    with pytest.raises(InputError, match="--actors needs --ray"):
        options_from_args(_args("--actors", "2"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(InputError) as e:
        options_from_args(_args("--ray", "auto"))
    assert str(e.value) == RAY_INSTALL_HINT and "eqv2-calc[ray]" in RAY_INSTALL_HINT


@pytest.mark.parametrize("kwargs, match", [
    ({"actors": 0}, "actors"), ({"cpus_per_actor": 0}, "cpus_per_actor"), ({"gpus_per_actor": -1}, "gpus"),
    ({"prefetch": 0}, "prefetch"), ({"max_attempts": 0}, "max_attempts"), ({"address": " "}, "address"),
])
def test_bad_ray_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        RayOptions(**kwargs)


def test_actor_count_from_resources():
    assert RayOptions(cpus_per_actor=2).num_actors({"CPU": 8.0}) == 4
    assert RayOptions(gpus_per_actor=1).num_actors({"CPU": 64.0, "GPU": 4.0}) == 4
    assert RayOptions(gpus_per_actor=0.5).num_actors({"GPU": 2.0}) == 4
    assert RayOptions(actors=3).num_actors({"CPU": 1.0}) == 3


def test_open_feed_tops_up_the_running_batch():
    """run_feed admits structures while others are mid-relaxation (the batch never drains
    between arrivals) and relaxes each exactly as relax_batch does."""
    from eqv2_calc.relax import make_relaxer

    structures = []
    for i in range(6):
        s = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        s.rattle(0.08, seed=10 + i)
        structures.append(s)
    expected = relax_batch(structures, EMT(), fmax=0.05, steps=60, progress=False)
    chunks = [structures[:3], [], [], structures[3:]]  # the second half arrives at the 4th poll
    waits = []

    def feed(wait: bool):
        waits.append(wait)
        return chunks.pop(0) if chunks else None  # then closed

    got = {}
    relaxer = make_relaxer(EMT(), 0.05, 60, progress=False, on_result=lambda r: got.setdefault(r.index, r))
    stats = relaxer.run_feed(feed)
    assert waits[:4] == [True, False, False, False]  # it blocked only while it had nothing to run
    assert sorted(got) == list(range(6))
    for i, e in enumerate(expected):
        assert (got[i].energy, got[i].nsteps) == (e.energy, e.nsteps)
        np.testing.assert_array_equal(got[i].atoms.positions, e.atoms.positions)
    sequential = max(e.nsteps for e in expected[:3]) + 1 + max(e.nsteps for e in expected[3:]) + 1
    assert stats.potential_calls < sequential  # the late half joined the running batch
    assert stats.useful_evaluations == sum(e.nsteps + 1 for e in expected)


@pytest.mark.parametrize("key", ["trajectory_dir", "names", "stats"])
def test_relax_on_ray_refuses_what_cannot_run_on_actors(key):
    from eqv2_calc.distributed import relax_on_ray

    with pytest.raises(InputError, match=f"does not take {key}="):
        relax_on_ray([fcc111("Cu", (1, 1, 3), vacuum=5.0)], EMT(), **{key: None})
