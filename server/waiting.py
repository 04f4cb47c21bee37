"""The waiting room: sessions created with `wait: true` while this replica is full.

They wait in creation order, first come first served, as `Session`s in state `queued`:
not counted by admission, never planned by the scheduler, holding no device state (the
runner opens a session's state lazily, at its first chunk). When a slot frees the first one
starts. The session manager owns the queue's life; this module keeps its order and makes
its estimates. See docs/design/protocol.md §17.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sessions import this module
    from server.sessions import Session


class WaitingRoom:
    """Queued sessions in order, and how long their wait is likely to be."""

    def __init__(self) -> None:
        self.queue: deque[Session] = deque()
        # Moving average of how long admitted sessions lived (None until one ended).
        self.mean_session_s: float | None = None

    def __len__(self) -> int:
        return len(self.queue)

    def __iter__(self):
        return iter(self.queue)

    def add(self, s: Session) -> int:
        """Queue `s` last; returns its position (1 = next)."""
        self.queue.append(s)
        return len(self.queue)

    def remove(self, s: Session) -> None:
        if s in self.queue:
            self.queue.remove(s)

    def position(self, s: Session) -> int | None:
        for i, x in enumerate(self.queue):
            if x is s:
                return i + 1
        return None

    def observe_session(self, seconds: float) -> None:
        """An admitted session lived this long (an estimate's unit of wait)."""
        m = self.mean_session_s
        self.mean_session_s = seconds if m is None else 0.8 * m + 0.2 * seconds

    def estimate(
        self,
        position: int,
        live: Iterable[tuple[float, float]],
        capacity: int,
        session_max_s: float,
    ) -> float | None:
        """Seconds until the session at `position` likely starts. `live` gives each live
        session's (age, latest end): its age and the most it can still live (lifetime
        limit, or idle expiry). A live session is expected to end after the mean lifetime
        of ended ones (its latest end if sooner); each slot freed goes to the next in line,
        whose session then lasts the mean too. None when nothing bounds the wait."""
        mean = self.mean_session_s
        frees = []
        for age, latest in live:
            expected = latest if mean is None else min(latest, max(0.0, mean - age))
            frees.append(max(0.0, expected))
        frees += [0.0] * max(0, capacity - len(frees))  # free slots (capacity grew)
        if not frees:
            return None
        heapq.heapify(frees)
        lasts = mean if mean is not None else session_max_s
        at = 0.0
        for _ in range(position):
            at = heapq.heappop(frees)
            heapq.heappush(frees, at + lasts)
        return round(at, 1)
