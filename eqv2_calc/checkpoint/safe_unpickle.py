"""Safe unpickling of checkpoint files.

Files are unpickled with ``torch.load(weights_only=True)`` plus the small allow-list
:func:`checkpoint_safe_globals`, scoped to the call (torch's global allow-list is left as it
was). Anything else in a file's pickle (a class, a function) could run arbitrary code when
unpickled, so such a file is refused with a :class:`~eqv2_calc.errors.CheckpointError` unless
the caller passes ``trust_checkpoint=True`` (``--trust-checkpoint`` on the command line), which
loads it with the full unpickler and warns (:class:`TrustedCheckpointWarning`).

Used by :func:`eqv2_calc.checkpoint.load.load_model`; the names are also importable from
:mod:`eqv2_calc.checkpoint.load`.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from pathlib import Path

import torch

from eqv2_calc.errors import CheckpointError


class TrustedCheckpointWarning(UserWarning):
    """A checkpoint was unpickled with the full pickle unpickler because the caller trusted it."""


def checkpoint_safe_globals() -> list:
    """The globals a checkpoint's pickle may name beyond torch's weights-only defaults.

    torch's defaults already cover what the fairchem layouts hold: tensors and parameters,
    ``collections.OrderedDict`` (every ``state_dict``), dicts, lists, tuples, sets, str, int,
    float, bool and None (``config``, ``normalizers``, ``elementrefs``, ``ema``, ``optimizer``,
    ``scheduler``, ``amp``, ``epoch``/``step``, ``val_metrics``, ``best_val_metric``). The
    fairchem-written parity fixtures, the shipped model and the files written by
    :mod:`eqv2_calc.checkpoint.save` load with the defaults alone.

    The one addition is **numpy scalars** (``np.float64(0.2)``, ``np.int64(7)``, ``np.bool_``):
    fairchem's trainers store ``val_metrics`` and ``best_val_metric`` as returned by its
    evaluator, and the metrics computed with numpy (e.g. IS2RS ``average_distance_within_threshold``
    in a single-process run) are numpy scalars; torch names them as one of the most common
    reasons a checkpoint fails to load with ``weights_only=True``. Unpickling a numpy scalar
    needs three things, all pure data constructors that call no user code:

    * ``numpy.core.multiarray.scalar`` (numpy 1.x name) / ``numpy._core.multiarray.scalar``
      (numpy 2.x name; both are listed, the pickle records the writer's name);
    * ``numpy.dtype`` (the scalar's dtype is pickled as ``numpy.dtype('f8', ...)``);
    * the dtype classes of bool, signed/unsigned integer and float dtypes
      (``numpy.dtypes.Float64DType``, ...): the dtype's state is set with BUILD, which torch
      only allows for allow-listed types.

    Not listed, because no official layout stores them: numpy arrays (``_reconstruct``,
    ``ndarray``), ``argparse.Namespace``, ``torch.torch_version.TorchVersion``, datetime,
    pathlib paths or any fairchem class. Such a file needs ``trust_checkpoint=True``.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core.multiarray import scalar

    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dict.fromkeys(type(np.dtype(k)) for k in kinds),
    ]


@contextlib.contextmanager
def _allow(extra: list):
    """Add ``extra`` to torch's weights-only allow-list for the duration of the block.

    Only the entries not already allowed are added (and later removed), so an allow-list the
    user set up with ``torch.serialization.add_safe_globals`` is left exactly as it was.
    """
    present = set(torch.serialization.get_safe_globals())
    missing = [g for g in extra if g not in present]
    with torch.serialization.safe_globals(missing):
        yield


_TORCH_REASON = re.compile(
    r"(Unsupported global: GLOBAL \S+|Trying to load unsupported GLOBAL \S+ whose module \S+ is blocked"
    r"|Trying to call reduce for unrecognized function [^\n]+|Can only [^\n]+|Unsupported operand [^\n]+)"
)


def _unsafe_globals(path: Path, allowed: list) -> list[str]:
    """The globals in the file's pickle outside the allow-list (static scan, nothing executed)."""
    try:
        with _allow(allowed):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format, unreadable file
        return []


def _refusal(path: Path, exc: Exception, unsafe: list[str]) -> str:
    m = _TORCH_REASON.search(str(exc))
    reason = m.group(1).rstrip(".") if m else str(exc).strip().splitlines()[-1]
    if not unsafe and m and "GLOBAL " in reason:  # legacy (non-zip) files: the static scan needs a zip
        unsafe = [reason.split("GLOBAL ", 1)[1].split()[0]]
    how = ("If you trust the source of this file, load it with trust_checkpoint=True "
           "(command line: --trust-checkpoint); that unpickles it in full.")
    if unsafe:
        return (
            f"refused to load {path}: its pickle holds {', '.join(unsafe)}, which a safe "
            "(weights-only) load does not allow; only tensors, containers, numbers, strings and "
            "numpy scalars are. Unpickling other objects can run arbitrary code on this machine. "
            f"{how} (torch: {reason})"
        )
    return (
        f"refused to load {path}: torch's safe (weights-only) unpickler cannot read it ({reason}). "
        "Either the file is corrupt, or its pickle holds objects beyond tensors, containers, numbers "
        f"and strings, whose unpickling can run arbitrary code. {how}"
    )


def _read(path: Path, trust_checkpoint: bool = False) -> dict:
    allowed = checkpoint_safe_globals()
    try:
        with _allow(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_checkpoint:
            raise CheckpointError(_refusal(path, exc, _unsafe_globals(path, allowed))) from exc
        warnings.warn(
            f"trust_checkpoint=True: unpickling {path} with the full pickle unpickler (it holds objects a "
            "safe load refuses; this can run code from the file)",
            TrustedCheckpointWarning, stacklevel=3,
        )
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise CheckpointError(f"cannot read checkpoint {path} ({type(exc2).__name__}: {exc2})") from exc2
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file is corrupt, "
            "truncated or not a torch checkpoint"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a fairchem checkpoint (expected a dict with 'config' and 'state_dict', got {keys})"
        )
    return ckpt
