"""The runner's one entry point on the tiny preset (random weights, real tensors): a plan of
one row, a batch, a failing step, sessions freed."""

from __future__ import annotations

import asyncio

import pytest

from model.config import get_preset
from server import protocol as P
from server.metrics import Metrics
from server.runner import ModelRunner, OutOfMemory
from server.scheduler import Scheduler
from server.sessions import SessionManager
from server.settings import Settings


@pytest.fixture(scope="module")
def runner():
    cfg = get_preset("tiny").replace(chunks_per_shot=3)
    r = ModelRunner.load(cfg, None, "cpu", "auto", "auto", 0, "truncate", threads=1)
    yield r
    r.shutdown()


def test_execute_runs_single_and_batched_plans_and_frees_ended_sessions(runner):
    async def go():
        settings = Settings(max_batch=4)
        m = SessionManager(settings, runner, Metrics())
        sched = Scheduler(settings, runner.cfg, lambda: m.active)
        ss = [(await m.create("c", P.CreateSessionRequest(prompt=f"p{i}")))[0] for i in range(2)]
        shapes = []
        for t in range(6):
            for s in ss:  # a reader that keeps up, a player long dry: always runnable,
                # the one with fewer chunks needing the next first
                s.clock.start, s.clock.delivered = -1e6 + s.chunks_generated, 0.0
                s.outbox.chunks_delivered, s.outbox.video_sent = (
                    s.chunks_generated,
                    s.video_generated,
                )
            plan, _ = sched.schedule(float(t))
            outcome = await runner.execute(plan)
            assert outcome.error is None
            up = sched.update(plan, outcome)
            shapes += [(len(plan.rows), r.frames.shape) for _, r in up.done]
        cfg = runner.cfg
        first = (cfg.chunk_pixel_frames(0), cfg.height, cfg.width, 3)
        steady = (cfg.chunk_pixel_frames(1), cfg.height, cfg.width, 3)
        assert (1, first) in shapes and (2, steady) in shapes  # alone to start, batched after
        assert runner.open_sessions == 2 and runner.pool.bytes_in_use > 0
        for s in ss:
            m.end(s, "deleted")
            sched.finish(s.id)
        plan, _ = sched.schedule(10.0)
        assert sorted(plan.finish) == sorted(s.id for s in ss) and not plan.rows
        await runner.execute(plan)
        assert runner.open_sessions == 0 and runner.pool.bytes_in_use == 0

    asyncio.run(go())


def test_a_failing_step_comes_back_as_an_error_and_oom_frees_the_session(runner):
    async def go():
        settings = Settings()
        m = SessionManager(settings, runner, Metrics())
        sched = Scheduler(settings, runner.cfg, lambda: m.active)
        s = (await m.create("c", P.CreateSessionRequest(prompt="p")))[0]
        runner.faults[s.id] = "exception"
        plan, _ = sched.schedule(0.0)
        outcome = await runner.execute(plan)
        assert isinstance(outcome.error, RuntimeError) and outcome.results is None
        up = sched.update(plan, outcome)
        assert [x for x, _ in up.failed] == [s] and not s.inflight
        runner.faults[s.id] = "oom"
        plan, _ = sched.schedule(1.0)
        outcome = await runner.execute(plan)
        assert isinstance(outcome.error, OutOfMemory)
        assert runner.open_sessions == 0 and runner.pool.bytes_in_use == 0  # freed at once

    asyncio.run(go())
