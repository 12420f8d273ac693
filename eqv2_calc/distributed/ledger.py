"""The driver's book of a distributed relaxation: where each structure is, by key (no Ray here).

Keys are positions in the input list. A structure is *pending* (not sent), *in flight* on one
actor, or *done* (its first result arrived). Results are matched by key, never by position in a
stream, so results that arrive in any order, twice, or after their actor was declared dead change
nothing: only the first result of a key counts. When an actor dies, what it had in flight goes
back to the front of the queue, unless a structure has used up its attempts (then it is given up
and reported failed by the driver).
"""

from __future__ import annotations

from collections import deque

__all__ = ["Ledger"]


class Ledger:
    """Bookkeeping of ``n`` structures (more can be :meth:`add`\ ed) with at most
    ``max_attempts`` submissions each."""

    def __init__(self, n: int, max_attempts: int):
        self.pending: deque[int] = deque(range(n))
        self.inflight: dict[int, set[int]] = {}
        self.attempts = [0] * n
        self.done: set[int] = set()
        self.max_attempts = max_attempts
        self.n = n
        self.duplicates = 0
        self.resubmitted = 0
        self._requeued: set[int] = set()  # pending again after an actor died

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n

    def add(self) -> int:
        """A new pending structure (a lazy source produced it); returns its key."""
        key = self.n
        self.n += 1
        self.attempts.append(0)
        self.pending.append(key)
        return key

    def outstanding(self, slot: int) -> int:
        return len(self.inflight.get(slot, ()))

    def assign(self, slot: int, room: int) -> list[int]:
        """Move up to ``room`` pending keys onto ``slot`` (one more attempt each)."""
        keys = []
        while self.pending and len(keys) < room:
            key = self.pending.popleft()
            self._requeued.discard(key)
            self.attempts[key] += 1
            keys.append(key)
        self.inflight.setdefault(slot, set()).update(keys)
        return keys

    def finish(self, slot: int, key: int) -> bool:
        """A result for ``key`` came from ``slot``: True if it is the first one (keep it)."""
        self.inflight.get(slot, set()).discard(key)
        if key in self.done:
            self.duplicates += 1
            return False
        self.done.add(key)
        if key in self._requeued:  # a late result of the dead actor: no need to run it again
            self._requeued.discard(key)
            self.pending.remove(key)
        return True

    def lose(self, slot: int) -> tuple[list[int], list[int]]:
        """``slot`` died: (keys requeued at the front, keys out of attempts). Both in key order."""
        lost = sorted(k for k in self.inflight.pop(slot, set()) if k not in self.done)
        requeue = [k for k in lost if self.attempts[k] < self.max_attempts]
        exhausted = [k for k in lost if self.attempts[k] >= self.max_attempts]
        self.pending.extendleft(reversed(requeue))
        self._requeued.update(requeue)
        self.resubmitted += len(requeue)
        return requeue, exhausted
