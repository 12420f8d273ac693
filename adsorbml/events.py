"""``events.jsonl``: the append-only audit log of a run directory (started/finished work).

One JSON object per line, each write flushed and fsync'ed. The store is the source of truth
for results; this log says which invocation started and finished what. Lines can be *held*
while the store has uncommitted rows and written once those rows are committed, so the log
never reports a finished result the store lost (see :class:`adsorbml.store.RunStore`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["EventLog"]


class EventLog:
    """The event log at ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._held: list[str] = []

    def add(self, event: dict[str, Any], hold: bool = False) -> None:
        """Append ``event`` (a ``time`` is added if missing); with ``hold``, only at the next
        :meth:`write_held` (after it, in order)."""
        event.setdefault("time", time.time())
        self._held.append(json.dumps(event) + "\n")
        if not hold:
            self.write_held()

    def write_held(self) -> None:
        """Write the held lines."""
        lines, self._held = self._held, []
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())

    def drop_held(self) -> None:
        """Forget the held lines (their rows were rolled back)."""
        self._held = []

    def read(self) -> list[dict]:
        """Every event on disk (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
