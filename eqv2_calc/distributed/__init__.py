"""Scale-out on Ray: many relaxations over many workers, GPUs and nodes (optional extra ``[ray]``).

::

    from eqv2_calc.distributed import RayOptions, relax_on_ray
    results, stats = relax_on_ray(atoms_list, calc, RayOptions(address="auto", gpus_per_actor=1),
                                  fmax=0.02, steps=300)

Modules: :mod:`~eqv2_calc.distributed.options` (where Ray is, actor shape),
:mod:`~eqv2_calc.distributed.recipe` (how an actor rebuilds the calculator),
:mod:`~eqv2_calc.distributed.worker` (the actor), :mod:`~eqv2_calc.distributed.ledger` (the
driver's bookkeeping by key), :mod:`~eqv2_calc.distributed.driver` (the loop). AdsorbML uses it
through ``adsorbml run --ray``; ``eqv2 relax --ray`` for plain relaxations.
"""

from eqv2_calc.distributed.driver import REASON_WORKER_LOST, RayRunStats, relax_on_ray
from eqv2_calc.distributed.options import RAY_INSTALL_HINT, RayOptions, connect, require_ray

__all__ = ["RayOptions", "RayRunStats", "relax_on_ray", "connect", "require_ray", "RAY_INSTALL_HINT",
           "REASON_WORKER_LOST"]
