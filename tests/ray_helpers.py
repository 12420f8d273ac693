"""Test doubles importable by Ray workers (the ray tests put this folder on PYTHONPATH)."""

from __future__ import annotations

import os

from ase.calculators.emt import EMT


class FaultyEMT(EMT):
    """EMT whose worker process dies (``os._exit``) at its ``die_after``-th calculation, once per
    ``flag`` file: the first process to get there creates the file and exits; all later calls,
    in any process, are plain EMT (so results equal EMT's bit for bit)."""

    def __init__(self, die_after: int, flag: str, **kwargs):
        super().__init__(**kwargs)
        self.die_after, self.flag, self.calls = die_after, flag, 0

    def calculate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.die_after:
            try:
                fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        super().calculate(*args, **kwargs)


class PoisonEMT(EMT):
    """EMT that kills its worker process whenever it meets gold (Z = 79): a structure that
    brings down every actor it is sent to."""

    def calculate(self, atoms=None, *args, **kwargs):
        if atoms is not None and 79 in atoms.numbers:
            os._exit(1)
        super().calculate(atoms, *args, **kwargs)


class SlowEMT(EMT):
    """EMT that sleeps ``delay`` seconds per calculation (same numbers): keeps a run going long
    enough for a test to kill something mid-run."""

    def __init__(self, delay: float, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def calculate(self, *args, **kwargs):
        import time

        time.sleep(self.delay)
        super().calculate(*args, **kwargs)
