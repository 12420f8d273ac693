"""The relaxation actor: one per GPU (or per group of CPU cores), holding one calculator.

The driver ``submit``\\ s jobs ``(key, Atoms)`` into the actor's inbox at any time; one streaming
call of ``results`` runs the batched in-flight relaxer of :mod:`eqv2_calc.relax` on that open
inbox and yields ``(key, RelaxResult)`` the moment each structure finishes. ``close`` lets the
stream end once the inbox is drained. The actor is threaded (``max_concurrency``), so ``submit``
lands while ``results`` is running; nothing here retries anything — the driver does.

:class:`RelaxWorker` is a plain class: :func:`actor_class` wraps it with ``ray.remote`` (so this
module imports without Ray, and tests can drive it in-process).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

from ase import Atoms

__all__ = ["RelaxWorker", "actor_class"]

_CLOSE = object()


class RelaxWorker:
    """Relaxes what it is sent with ``relax_options`` (keyword arguments of ``BatchRelaxer``).

    ``num_threads`` sets torch's intra-op threads in this process: a reused Ray worker keeps its
    previous thread pool otherwise.
    """

    def __init__(self, recipe: Any, relax_options: dict[str, Any], device: str = "cpu",
                 num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.calc = recipe.build(device)
        self.options = dict(relax_options, progress=False)
        self._inbox: queue.Queue = queue.Queue()

    def ready(self) -> dict[str, Any]:
        """Where the actor runs (answers once the calculator is loaded): pid, node id, threads."""
        import torch

        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - not inside Ray (in-process use)
            node = ""
        return {"pid": os.getpid(), "node": node, "threads": torch.get_num_threads()}

    def submit(self, jobs: list[tuple[Any, Atoms]]) -> int:
        """Queue ``jobs`` [(key, atoms)]; returns how many."""
        for job in jobs:
            self._inbox.put(job)
        return len(jobs)

    def close(self) -> None:
        """No more jobs: ``results`` ends when the queued ones are done."""
        self._inbox.put(_CLOSE)

    def _feed(self, wait: bool) -> list[Atoms] | None:
        """The relaxer's open queue: what arrived (waiting for one job if ``wait``); None once
        closed and drained. Keys are remembered in arrival order (the relaxer's numbering)."""
        arrived: list[Atoms] = []
        while True:
            try:
                job = self._inbox.get(block=wait and not arrived)
            except queue.Empty:
                return arrived
            if job is _CLOSE:
                self._inbox.put(_CLOSE)  # seen again by the next call
                return arrived if arrived else None
            key, atoms = job
            self._keys.append(key)
            arrived.append(atoms)

    def _serve(self, out: queue.Queue) -> None:
        from eqv2_calc.relax import make_relaxer

        self._keys: list[Any] = []
        try:
            relaxer = make_relaxer(self.calc, on_result=lambda r: out.put((self._keys[r.index], r)), **self.options)
            relaxer.run_feed(self._feed)
        except BaseException as exc:  # noqa: BLE001 - handed to the stream, which raises it
            out.put(exc)
        out.put(_CLOSE)

    def results(self) -> Iterator[tuple[Any, Any]]:
        """Stream ``(key, RelaxResult)`` as structures finish, until closed and drained."""
        out: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, args=(out,), daemon=True, name="relax").start()
        while (item := out.get()) is not _CLOSE:
            if isinstance(item, BaseException):
                raise item
            yield item


def actor_class(options: Any):
    """``RelaxWorker`` as a Ray actor class with the resources of ``options`` (:class:`RayOptions`).

    No Ray-level retries: ``max_restarts=0`` and ``max_task_retries=0`` (the driver replaces dead
    actors and resubmits what they lost, by key)."""
    import ray

    return ray.remote(RelaxWorker).options(
        num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor, max_concurrency=4,
        max_restarts=0, max_task_retries=0,
    )
