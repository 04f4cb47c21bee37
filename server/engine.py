"""The engine: the loop that runs the scheduler's plans, and the capacity estimate.

It runs as one task on the event loop. Each turn it asks the scheduler for a plan, awaits
the runner's worker thread executing it, applies the outcome through the scheduler, and
hands each generated chunk to the session manager for packaging. The loop itself never
blocks on torch. See docs/design/scheduling.md.

Capacity: sessions the device can keep real time = margin x chunk playout time / measured
worker time per chunk, capped by memory (per-session bytes vs free device memory) and by
the `max_sessions` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from server.metrics import gauge
from server.runner import StepResult
from server.scheduler import Plan, Scheduler
from server.sessions import SessionManager

log = logging.getLogger("shotstream.engine")


class Engine:
    """The loop over the scheduler's plans, and what it measures."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.runner = manager.runner
        self.settings = manager.settings
        self.cfg = manager.cfg
        self.scheduler = Scheduler(self.settings, self.cfg, lambda: manager.active)
        manager.engine = self
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.chunk_cost = 0.0  # EMA of worker seconds per chunk (shot starts included)
        self._produced: deque[tuple[float, float]] = deque()  # (time, video seconds)
        self.failed: BaseException | None = None
        self.crash_requested = False  # test-only fault injection
        self._cleanup: asyncio.Task | None = None
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
        for s in [*m.waiting, *m.active]:
            m.end(s, "failed", error=("internal", f"the generation engine failed: {self.failed!r}"))
        # No loop runs their release any more: free every ended session's state now.
        for s in m.ended.values():
            s.inflight = False
            m.release(s)
        plan, _ = self.scheduler.schedule(time.monotonic())  # only finishes: none is alive
        task = asyncio.get_running_loop().create_task(self.runner.execute(plan))
        self._cleanup = task  # keep a reference until it is done

    # -- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            if self.crash_requested:
                raise RuntimeError("injected engine crash")
            now = time.monotonic()
            plan, look_again = self.scheduler.schedule(now)
            self.manager.on_planned(plan)
            if plan.empty:
                self._wake.clear()
                timeout = None if look_again is None else max(0.0, look_again - now)
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as the wake-up does, and the loop would go on
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            await self._execute(plan)

    async def _execute(self, plan: Plan) -> None:
        outcome = await self.runner.execute(plan)
        update = self.scheduler.update(plan, outcome)
        m = self.manager.metrics
        for work, result in update.done:
            m.chunks.inc()
            m.frames.inc(result.frames.shape[0])
            for verb, ms in (*result.timings.items(), *result.shot_timings.items()):
                m.verb_duration.labels(verb.removesuffix("_ms")).observe(ms / 1e3)
            self.record(result)
            self.manager.on_chunk(work, result)
        for s in update.orphaned:
            self.manager.release(s)
        for s, exc in update.failed:
            self.manager.on_step_failed(s, exc)

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
        """Start the estimates from the warm-up step (a shot start and its first chunk)."""
        self.chunk_cost = result.worker_s
        self.scheduler.observe_cut_delay(self.runner.shot_start_s or result.worker_s)

    @property
    def chunk_seconds(self) -> float:
        return self.cfg.chunk_seconds

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
            gauge(
                "shotstream_active_sessions",
                "Sessions with a connected stream.",
                sum(1 for s in active if s.conn is not None),
            ),
            gauge(
                "shotstream_waiting_sessions",
                "Sessions alive with no stream connected.",
                sum(1 for s in active if s.conn is None),
            ),
            gauge(
                "shotstream_realtime_factor",
                "Video seconds produced per wall second (30 s window).",
                self.realtime_factor(),
            ),
            gauge(
                "shotstream_chunk_cost_seconds",
                "Worker time per chunk (moving average).",
                self.chunk_cost,
            ),
            gauge(
                "shotstream_capacity_sessions",
                "Sessions this replica can keep real time.",
                self.capacity() if m.ready else 0,
            ),
            gauge(
                "shotstream_free_slots",
                "Real-time session slots free for new sessions.",
                self.free_slots(),
            ),
            gauge(
                "shotstream_cache_bytes",
                "Per-session device state in use, by kind.",
                labels={k: float(v) for k, v in pool.breakdown().items()},
            ),
            gauge(
                "shotstream_pool_bytes", "All per-session device state in use.", pool.bytes_in_use
            ),
            gauge(
                "shotstream_queue_length",
                "Sessions in the waiting room (created with wait while this replica was full).",
                len(m.waiting),
            ),
            gauge(
                "shotstream_viewers",
                "Viewer connections open (watch links), all sessions.",
                sum(len(s.audience.conns) for s in active),
            ),
            gauge(
                "shotstream_viewers_max_per_session",
                "Viewer connections of the session with the most.",
                max((len(s.audience.conns) for s in active), default=0),
            ),
            gauge(
                "shotstream_outbox_bytes",
                "Video segments held for streams: queued, and kept for resumes (ended sessions included).",
                sum(x.outbox.bytes_held for x in (*m.sessions.values(), *m.ended.values())),
            ),
        ]
        mem = self.runner.memory_stats()
        if mem:
            out.append(
                gauge(
                    "shotstream_gpu_memory_bytes",
                    "CUDA memory of this process.",
                    labels={k: float(v) for k, v in mem.items()},
                )
            )
        return out
