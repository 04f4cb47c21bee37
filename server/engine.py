"""The engine: decides which session's chunk runs next and keeps the capacity estimate.

It runs as one task on the event loop. Each turn it picks, among sessions that are not
too far ahead of their playout clock and whose outbox has room, the one whose player runs
dry first (earliest deadline first), plans its chunk (seq, shot start) and awaits the
runner's worker thread. The loop itself never blocks on torch.

Capacity: sessions the device can keep real time = margin x chunk playout time / measured
worker time per chunk, capped by memory (per-session bytes vs free device memory) and by
the `max_sessions` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque

from server.metrics import gauge
from server.runner import StepResult
from server.sessions import Session, SessionManager

log = logging.getLogger("shotstream.engine")


class Engine:
    """The scheduling loop over the manager's sessions."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.runner = manager.runner
        self.settings = manager.settings
        self.cfg = manager.cfg
        manager.engine = self
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.chunk_cost = 0.0  # EMA of worker seconds per chunk (shot starts included)
        self._produced: deque[tuple[float, float]] = deque()  # (time, video seconds)
        self.failed: BaseException | None = None
        self.crash_requested = False  # test-only fault injection
        manager.metrics.add_sampler(self._gauges)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="shotstream-engine")
        self._task.add_done_callback(self._on_exit)

    async def stop(self) -> None:
        self._stopping = True
        self.wake()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _on_exit(self, task: asyncio.Task) -> None:
        if self._stopping or task.cancelled():
            return
        # The scheduler died: say so (not ready) and fail every session instead of hanging.
        self.failed = task.exception() or RuntimeError("engine stopped")
        log.critical("engine failed", extra={"error": repr(self.failed)})
        m = self.manager
        m.ready = False
        m.metrics.errors.labels("engine").inc()
        for s in list(m.active):
            m.end(s, "failed", error=("internal", f"the generation engine failed: {self.failed!r}"))

    # -- scheduling ---------------------------------------------------------------------
    def pick(self, now: float) -> tuple[Session | None, float | None]:
        """The runnable session with the earliest deadline, or when to look again."""
        best, best_deadline, soonest = None, math.inf, None
        for s in self.manager.active:
            at = s.ready_at(now)
            if at is None:
                continue
            if at > now:
                soonest = at if soonest is None else min(soonest, at)
                continue
            d = s.deadline()
            if d < best_deadline:
                best, best_deadline = s, d
        return best, soonest

    async def _run(self) -> None:
        while not self._stopping:
            if self.crash_requested:
                raise RuntimeError("injected engine crash")
            now = time.monotonic()
            s, soonest = self.pick(now)
            if s is None:
                self._wake.clear()
                timeout = None if soonest is None else max(0.0, soonest - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            await self._step(s)

    async def _step(self, s: Session) -> None:
        plan = self.manager.plan_next(s)
        if plan is None:
            return
        seq, shot, starts = plan
        group = [(s, plan)]
        if not starts and s.opened:
            group += self._companions(s)
        if len(group) == 1:
            await self._step_one(s, plan)
            return
        try:
            results = await self.runner.step_batch([x.id for x, _ in group])
        except Exception:
            # A batch failed: retry each alone, so only the session at fault fails.
            for x, p in group:
                await self._step_one(x, p)
            return
        for (x, (seq, shot, starts)), result in zip(group, results, strict=True):
            self.manager.on_step_done(x, seq, shot, starts, result)

    def _companions(self, first: Session) -> list[tuple[Session, tuple]]:
        """Other runnable sessions continuing their shots, earliest deadline first, planned."""
        now = time.monotonic()
        m = self.manager
        others = [
            x for x in m.active
            if x is not first and m.continues_shot(x) and (at := x.ready_at(now)) is not None and at <= now
        ]  # fmt: skip
        others.sort(key=Session.deadline)
        group = []
        for x in others[: max(0, self.settings.max_batch - 1)]:
            plan = m.plan_next(x)
            if plan is not None:
                group.append((x, plan))
        return group

    async def _step_one(self, s: Session, plan: tuple) -> None:
        seq, shot, starts = plan
        init = None if s.opened else (s.global_prompt, s.seed)
        try:
            result = await self.runner.step(s.id, shot.text if starts else None, init)
        except Exception as exc:  # this session fails; the server and the others go on
            self.manager.on_step_failed(s, exc)
            return
        self.manager.on_step_done(s, seq, shot, starts, result)

    # -- measurements ---------------------------------------------------------------------
    def record(self, result: StepResult) -> None:
        """Fold one step's worker time into the capacity estimate and the real-time factor."""
        cost = result.worker_s
        self.chunk_cost = cost if self.chunk_cost == 0 else 0.9 * self.chunk_cost + 0.1 * cost
        now = time.monotonic()
        self._produced.append((now, result.frames.shape[0] / self.cfg.fps))
        while self._produced and self._produced[0][0] < now - 30.0:
            self._produced.popleft()

    def seed_cost(self, result: StepResult) -> None:
        """Start the estimate from the warm-up step."""
        self.chunk_cost = result.worker_s

    @property
    def chunk_seconds(self) -> float:
        return self.cfg.chunk_frames * self.cfg.vae.temporal_stride / self.cfg.fps

    def realtime_factor(self) -> float:
        """Video seconds produced per wall second over the last 30 s."""
        if not self._produced:
            return 0.0
        span = max(1.0, time.monotonic() - self._produced[0][0])
        return sum(v for _, v in self._produced) / span

    def compute_capacity(self) -> int:
        if self.chunk_cost <= 0:
            return 1
        return max(1, int(self.settings.realtime_margin * self.chunk_seconds / self.chunk_cost))

    def memory_capacity(self) -> int:
        per = self.runner.bytes_per_session()
        if per <= 0:
            return 1 << 30
        live = len(self.manager.active)
        return live + int(self.runner.free_device_bytes() // per)

    def capacity(self) -> int:
        """Sessions this process can keep real time now (admission and free slots)."""
        cap = min(self.compute_capacity(), self.memory_capacity())
        if self.settings.max_sessions:
            cap = min(cap, self.settings.max_sessions)
        return cap

    def free_slots(self) -> int:
        """Sessions this replica would admit now: 0 while warming up or draining."""
        m = self.manager
        if not m.ready or m.draining:
            return 0
        return max(0, self.capacity() - len(m.active))

    def _gauges(self):
        m = self.manager
        active = m.active
        pool = self.runner.pool
        out = [
            gauge("shotstream_active_sessions", "Sessions with a connected stream.",
                  sum(1 for s in active if s.conn is not None)),
            gauge("shotstream_waiting_sessions", "Sessions alive with no stream connected.",
                  sum(1 for s in active if s.conn is None)),
            gauge("shotstream_realtime_factor", "Video seconds produced per wall second (30 s window).",
                  self.realtime_factor()),
            gauge("shotstream_chunk_cost_seconds", "Worker time per chunk (moving average).", self.chunk_cost),
            gauge("shotstream_capacity_sessions", "Sessions this replica can keep real time.",
                  self.capacity() if m.ready else 0),
            gauge("shotstream_free_slots", "Real-time session slots free for new sessions.",
                  self.free_slots()),
            gauge("shotstream_cache_bytes", "Per-session device state in use, by kind.",
                  labels={k: float(v) for k, v in pool.breakdown().items()}),
            gauge("shotstream_pool_bytes", "All per-session device state in use.", pool.bytes_in_use),
        ]  # fmt: skip
        mem = self.runner.memory_stats()
        if mem:
            out.append(gauge("shotstream_gpu_memory_bytes", "CUDA memory of this process.",
                             labels={k: float(v) for k, v in mem.items()}))  # fmt: skip
        return out
