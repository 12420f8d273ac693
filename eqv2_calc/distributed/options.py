"""How to reach Ray and how many actors to run: :class:`RayOptions`, :func:`require_ray`, :func:`connect`.

Ray is an optional dependency (``pip install "eqv2-calc[ray]"``); nothing in this module imports it
at import time. Execution settings are deliberately *not* part of any resume fingerprint: a run
started on Ray can be resumed in one process and vice versa.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from eqv2_calc.errors import InputError

__all__ = ["RayOptions", "require_ray", "connect", "add_ray_arguments", "options_from_args", "RAY_INSTALL_HINT"]

RAY_INSTALL_HINT = 'Ray is not installed: pip install "eqv2-calc[ray]" (or pip install "ray>=2.50")'


def require_ray():
    """The ``ray`` module, or an :class:`InputError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where Ray runs and how the relaxations are spread over it.

    Attributes
    ----------
    address:
        ``"local"``: start a private Ray instance on this machine (``actors × cpus_per_actor``
        CPUs); ``"auto"``: join the cluster this node belongs to (``ray start`` here, or
        ``RAY_ADDRESS``); ``"HOST:PORT"``: the head node's GCS address; ``"ray://HOST:PORT"``:
        Ray Client (see :func:`connect` for its limits).
    actors:
        Number of relaxation actors; None = one per GPU when ``gpus_per_actor > 0``, else one
        per ``cpus_per_actor`` CPUs of the cluster.
    cpus_per_actor:
        CPU cores reserved by each actor; it also sets the actor's torch thread count.
    gpus_per_actor:
        GPUs per actor (0 = CPU actors; the model then runs on the CPU).
    prefetch:
        Structures outstanding per actor (submitted, not yet returned): enough to keep its batch
        full while results stream back; bounds memory on the actors and the driver.
    max_attempts:
        Attempts per structure: a structure that was in flight on an actor that died is resubmitted
        until it has been tried this many times, then recorded as failed (reason
        ``worker_lost``), so a structure that kills its worker cannot loop forever.
    start_timeout:
        Seconds to wait for the first actor to come up before giving up (the cluster lacks the
        resources asked for).
    """

    address: str = "local"
    actors: int | None = None
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    prefetch: int = 16
    max_attempts: int = 3
    start_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip():
            raise InputError("ray address must be 'local', 'auto', HOST:PORT or ray://HOST:PORT")
        if self.actors is not None and (not isinstance(self.actors, int) or self.actors < 1):
            raise InputError(f"actors={self.actors!r} must be an integer >= 1 (or None: one per GPU / CPU group)")
        if not isinstance(self.cpus_per_actor, int) or self.cpus_per_actor < 1:
            raise InputError(f"cpus_per_actor={self.cpus_per_actor!r} must be an integer >= 1")
        if not self.gpus_per_actor >= 0:
            raise InputError(f"gpus_per_actor={self.gpus_per_actor!r} must be >= 0")
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise InputError(f"prefetch={self.prefetch!r} must be an integer >= 1")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InputError(f"max_attempts={self.max_attempts!r} must be an integer >= 1")

    @property
    def device(self) -> str:
        """Device of the model inside an actor: ``"cuda"`` with GPUs, else ``"cpu"``."""
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def num_actors(self, resources: dict[str, float]) -> int:
        """``actors``, or how many actors of this shape the cluster's ``resources`` hold (≥ 1)."""
        if self.actors is not None:
            return self.actors
        if self.gpus_per_actor > 0:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_actor))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_actor))


def connect(options: RayOptions, *, log=print) -> bool:
    """Initialise Ray for ``options`` unless it already is. Returns whether this call did (the
    caller then shuts it down).

    ``ray://`` (Ray Client) works for small runs but streams every result through the client
    server and has Ray Client's known limits (no large objects, a connection drop ends the run);
    on a cluster, run the driver on the head node and use ``auto`` or ``HOST:PORT`` instead.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = dict(logging_level="ERROR", log_to_driver=True)
    address = options.address.strip()
    if address == "local":
        n = options.actors or max(1, (os.cpu_count() or 1) // options.cpus_per_actor)
        kwargs.update(num_cpus=n * options.cpus_per_actor, include_dashboard=False)
        ray.init(**kwargs)
    else:
        if address.startswith("ray://"):
            log(f"Ray Client {address}: every result passes through the client connection; for large runs start "
                "the driver on the head node with --ray auto")
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            auth = "" if os.environ.get("RAY_AUTH_MODE") else (
                " If the cluster uses token authentication (the default of `ray start` in recent Ray), export "
                "RAY_AUTH_MODE=token with the head's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
                "(`ray get-auth-token` on the head prints it).")
            raise InputError(f"cannot connect to Ray at {address!r}: {e}. Start the cluster first "
                             "(ray start --head on the head node, ray start --address HEAD:PORT on the others) "
                             f"or use --ray local.{auth}") from None
    return True


def add_ray_arguments(parser) -> None:
    """The ``--ray`` flags shared by ``adsorbml run`` and ``eqv2 relax`` (argparse)."""
    g = parser.add_argument_group("Ray (optional extra eqv2-calc[ray]; settings do not affect resuming)")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="run the relaxations on Ray actors: local (a private instance on this machine), auto (the "
                        "cluster of this node / RAY_ADDRESS), HOST:PORT (the head's address) or ray://HOST:PORT "
                        "(Ray Client, small runs only)")
    g.add_argument("--actors", type=int, help="relaxation actors (default: one per GPU, or per --cpus-per-actor CPUs)")
    g.add_argument("--cpus-per-actor", type=int, default=1, help="CPU cores (torch threads) per actor (default 1)")
    g.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0: CPU actors)")
    g.add_argument("--prefetch", type=int, default=16, help="structures outstanding per actor (default 16)")


def options_from_args(args) -> RayOptions | None:
    """:class:`RayOptions` from :func:`add_ray_arguments`' flags (None without ``--ray``); says
    how to install Ray if it is missing."""
    if not getattr(args, "ray", None):
        for flag in ("actors",):
            if getattr(args, flag, None) is not None:
                raise InputError(f"--{flag} needs --ray")
        return None
    require_ray()
    return RayOptions(address=args.ray, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                      gpus_per_actor=args.gpus_per_actor, prefetch=args.prefetch)
