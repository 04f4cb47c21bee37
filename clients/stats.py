"""What a viewer experiences, measured on the client: a playout model, rates, percentiles."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence


class Playout:
    """A player that starts at the first chunk and plays at real time; a chunk that arrives
    after the player ran dry is a deadline miss, and the player stalls until it arrives."""

    def __init__(self, tolerance_s: float = 0.0) -> None:
        self.tolerance_s = tolerance_s
        self.start: float | None = None  # when playback started, shifted by every stall
        self.received_s = 0.0  # seconds of video received
        self.misses = 0
        self.stalled_s = 0.0

    def on_chunk(self, now: float, duration_s: float) -> bool:
        """Account one chunk that arrived at `now`; True if it missed its deadline."""
        missed = False
        if self.start is None:
            self.start = now
        else:
            dry = self.start + self.received_s  # when the buffer ran out
            if now > dry + self.tolerance_s:
                missed = True
                self.misses += 1
                self.stalled_s += now - dry
                self.start += now - dry
        self.received_s += duration_s
        return missed

    def played_s(self, now: float) -> float:
        """Seconds of the received video played by `now` (the playhead, from the start)."""
        if self.start is None:
            return 0.0
        return min(self.received_s, max(0.0, now - self.start))

    def withdraw(self, seconds: float) -> None:
        """Received video the player will not play after all (a cut withdrew it)."""
        self.received_s = max(0.0, self.received_s - seconds)

    def visible_at(self, offset_s: float) -> float | None:
        """When the player shows the video `offset_s` seconds after its first frame (after
        the stalls so far); None before it started."""
        return None if self.start is None else self.start + offset_s

    def buffer_s(self, now: float) -> float:
        """Seconds of received video not yet played at `now`."""
        if self.start is None:
            return 0.0
        return max(0.0, self.start + self.received_s - now)


class RateMeter:
    """Events per second over a sliding window (e.g. frames received per second)."""

    def __init__(self, window_s: float = 4.0) -> None:
        self.window_s = window_s
        self._marks: deque[tuple[float, float]] = deque()
        self._first: float | None = None

    def add(self, now: float, amount: float) -> None:
        self._first = now if self._first is None else self._first
        self._marks.append((now, amount))

    def rate(self, now: float) -> float:
        while self._marks and self._marks[0][0] < now - self.window_s:
            self._marks.popleft()
        if self._first is None:
            return 0.0
        span = min(self.window_s, now - self._first)
        return sum(a for _, a in self._marks) / span if span > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float], qs: Sequence[int], digits: int = 4) -> dict[str, float | None]:
    """{"p50": ..., "p95": ...} of `values`, rounded; None entries when there are none."""
    out: dict[str, float | None] = {}
    for q in qs:
        v = percentile(values, q)
        out[f"p{q}"] = None if v is None else round(v, digits)
    return out
