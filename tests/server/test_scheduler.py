"""The scheduler on its own: a fake clock (`now` passed in) and a fake runner (outcomes made
here), no model, no sockets. Each test plans, "runs" and applies steps in milliseconds."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from model.config import get_preset
from server import protocol as P
from server.metrics import Metrics
from server.runner import Outcome, StepResult, TokenReport
from server.scheduler import Plan, Scheduler, deadline, ready_at
from server.sessions import SessionManager
from server.settings import Settings

CFG = get_preset("tiny").replace(chunks_per_shot=3)


class FakeRunner:
    """What the session manager and scheduler need of a runner; steps are made up here."""

    def __init__(self, cfg=CFG):
        self.cfg = cfg
        self.executed: list[Plan] = []
        self.fail: set[str] = set()  # session ids whose step raises

    def check_caption(self, global_caption, shot_index, text) -> TokenReport:
        return TokenReport(0, False)

    def execute_now(self, plan: Plan) -> Outcome:
        self.executed.append(plan)
        if not plan.rows:
            return Outcome(results=[])
        if any(w.session.id in self.fail for w in plan.rows):
            return Outcome(error=RuntimeError("injected"))
        results = []
        for w in plan.rows:
            n = self.cfg.chunk_pixel_frames(0 if w.starts_shot else 1)
            frames = np.zeros((n, self.cfg.height, self.cfg.width, 3), np.uint8)
            results.append(StepResult(frames, 0, 0, False, {}, 0.01))
        return Outcome(results=results)


class Harness:
    """A manager and scheduler over a fake runner, stepped by hand."""

    def __init__(self, **settings):
        settings = {"lead_chunks": 2.0, "outbox_chunks": 4, "max_batch": 4, **settings}
        self.settings = Settings(**settings)
        self.runner = FakeRunner()
        self.manager = SessionManager(self.settings, self.runner, Metrics())  # type: ignore[arg-type]
        self.scheduler = Scheduler(self.settings, CFG, lambda: self.manager.active)
        self.manager.engine = self  # type: ignore[assignment]  # the manager's view of an engine
        self.ready = True

    # what the manager calls on its engine
    def wake(self) -> None:
        pass

    def capacity(self) -> int:
        return 100

    def create(self, prompt="p", shots=(), **kw):
        s, _ = self.manager.create(
            "c", P.CreateSessionRequest(prompt=prompt, shots=list(shots), **kw)
        )
        return s

    def step(self, now: float) -> tuple[Plan, float | None]:
        """Plan at `now`, run it on the fake runner, apply the outcome (no packaging)."""
        plan, later = self.scheduler.schedule(now)
        self.manager.on_planned(plan)
        if not plan.empty:
            up = self.scheduler.update(plan, self.runner.execute_now(plan))
            for s, exc in up.failed:
                self.manager.on_step_failed(s, exc)
        return plan, later


def open_all(h, ss) -> float:
    """Step until every session has run its first chunk; returns the next time to use."""
    t = 0.0
    while not all(s.opened for s in ss):
        plan, _ = h.step(t)
        # a session's first step starts its shot, alone
        assert plan.rows and (len(plan.rows) == 1 or not any(w.starts_shot for w in plan.rows))
        t += 1.0
    return t


def keep_up(s) -> None:
    """A reader that has everything generated and a player long ago run dry: runnable."""
    s.clock.start, s.clock.delivered = -1e6, 0.0
    s.outbox.chunks_delivered, s.outbox.video_sent = s.chunks_generated, s.video_generated


@pytest.fixture
def h():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the manager arms its session timers on the running loop
    harness = Harness()
    yield harness
    loop.close()
    asyncio.set_event_loop(None)


def run_in_loop(fn):
    async def go():
        return fn()

    return asyncio.get_event_loop().run_until_complete(go())


def test_earliest_deadline_first(h):
    def go():
        a, b = h.create("a"), h.create("b")
        open_all(h, [a, b])
        # both playing and caught up; b's player runs dry a second before a's
        for s, start in ((a, 100.0), (b, 99.0)):
            keep_up(s)
            s.clock.start = start
        assert deadline(b) < deadline(a)
        plan, _ = h.step(100.0)
        assert plan.rows[0].session is b
        # and the other way round
        for s, start in ((a, 98.0), (b, 99.0)):
            keep_up(s)
            s.clock.start = start
        plan, _ = h.step(100.0)
        assert plan.rows[0].session is a

    run_in_loop(go)


def test_lead_pacing_waits_until_the_buffer_drops_below_the_lead(h):
    def go():
        s = h.create()
        h.step(0.0)
        s.clock.start = 10.0  # the player started at t=10 with one chunk delivered
        s.clock.delivered = 0.0
        s.outbox.chunks_delivered, s.outbox.video_sent = 1, s.video_generated
        # nothing buffered beyond the player: runnable now
        assert ready_at(s, 10.0, h.settings, CFG.chunk_seconds) == 10.0
        s.video_generated += 3 * CFG.chunk_seconds  # 3 chunks generated ahead (lead is 2)
        s.chunks_generated += 3
        at = ready_at(s, 10.0, h.settings, CFG.chunk_seconds)
        assert at == pytest.approx(10.0 + CFG.chunk_seconds)
        plan, later = h.scheduler.schedule(10.0)
        assert plan.empty and later == pytest.approx(at)

    run_in_loop(go)


def test_outbox_back_pressure_blocks_a_reader_that_does_not_read(h):
    def go():
        s = h.create()
        plans = 0
        for t in range(20):
            plan, _ = h.step(float(t))
            plans += bool(plan.rows)
        # no player yet: it prepares up to the lead, then waits for a reader
        assert plans == round(h.settings.lead_chunks)
        s.clock.start, s.clock.delivered = 0.0, 0.0  # a player that never advances
        s.video_generated = 0.0  # pretend nothing is buffered: only the outbox holds it back
        for t in range(20, 40):
            plan, _ = h.step(float(t))
            plans += bool(plan.rows)
        assert plans == h.settings.outbox_chunks  # never more undelivered than the outbox

    run_in_loop(go)


def test_paused_session_is_not_scheduled_until_resumed(h):
    def go():
        s = h.create()
        h.manager.pause(s)
        plan, later = h.scheduler.schedule(0.0)
        assert plan.empty and later is None
        h.manager.resume(s)
        plan, _ = h.scheduler.schedule(0.0)
        assert [w.session for w in plan.rows] == [s]

    run_in_loop(go)


def test_cut_starts_at_the_next_chunk_and_queue_after_the_current_and_queued_shots(h):
    def go():
        s = h.create("g", shots=["one"])
        h.step(0.0)  # shot 0 ("one") starts at seq 0
        assert s.current.text == "one" and s.next_seq == 1
        q1 = h.manager.add_prompt(s, "q1", "queue")
        q2 = h.manager.add_prompt(s, "q2", "queue")
        per = CFG.chunks_per_shot
        assert (q1.starts_at_seq, q2.starts_at_seq) == (per, 2 * per)
        cut = h.manager.add_prompt(s, "cut", "cut")
        assert cut.starts_at_seq == 1  # the next chunk
        # the queue moved behind the cut's shot, and the client is told
        assert (q1.starts_at_seq, q2.starts_at_seq) == (1 + per, 1 + 2 * per)
        acks = [m for m in s.outbox.control if m["type"] == "prompt_ack"]
        assert {m["shot_id"]: m["starts_at_seq"] for m in acks} == {
            q1.shot_id: 1 + per, q2.shot_id: 1 + 2 * per,
        }  # fmt: skip
        started = {}
        for t in range(1, 2 + 2 * per):
            keep_up(s)
            plan, _ = h.step(float(t))
            for w in plan.rows:
                if w.starts_shot:
                    started[w.prompt.text] = w.seq
        assert started == {"cut": 1, "q1": 1 + per, "q2": 1 + 2 * per}
        # every prediction held
        assert (cut.starts_at_seq, q1.starts_at_seq, q2.starts_at_seq) == (1, 1 + per, 1 + 2 * per)

    run_in_loop(go)


def test_a_later_cut_supersedes_a_pending_one(h):
    def go():
        s = h.create()
        h.step(0.0)
        a = h.manager.add_prompt(s, "a", "cut")
        b = h.manager.add_prompt(s, "b", "cut")
        dropped = [m for m in s.outbox.control if m["type"] == "prompt_dropped"]
        assert [m["shot_id"] for m in dropped] == [a.shot_id]
        assert s.pending_cut is b and b.starts_at_seq == 1

    run_in_loop(go)


def test_batch_companions_continue_their_shots_and_a_batch_never_starts_a_shot(h):
    def go():
        ss = [h.create(f"s{i}") for i in range(3)]
        open_all(h, ss)
        for s in ss:
            keep_up(s)
        plan, _ = h.step(10.0)
        assert len(plan.rows) == 3 and not any(w.starts_shot for w in plan.rows)
        # a cut pending on one of them: it runs alone, the others may batch without it
        h.manager.add_prompt(ss[1], "cut", "cut")
        plans = []
        for i in range(3):
            for s in ss:
                keep_up(s)
            ss[1].clock.start -= 1.0  # its player needs a chunk first
            plans.append(h.step(11.0 + i)[0])
        for plan in plans:
            if len(plan.rows) > 1:
                assert not any(w.starts_shot for w in plan.rows)
        (cut_plan,) = [
            p for p in plans if any(w.prompt.text == "cut" and w.starts_shot for w in p.rows)
        ]
        assert [(w.session, w.starts_shot) for w in cut_plan.rows] == [(ss[1], True)]

    run_in_loop(go)


def test_max_batch_one_never_batches():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        h = Harness(max_batch=1)

        async def go():
            ss = [h.create(f"s{i}") for i in range(3)]
            for t in range(6):
                plan, _ = h.step(float(t))
                assert len(plan.rows) <= 1
                for s in ss:
                    keep_up(s)

        loop.run_until_complete(go())
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def test_a_failed_batch_is_retried_one_session_at_a_time_and_logged(h, caplog):
    def go():
        ss = [h.create(f"s{i}") for i in range(3)]
        open_all(h, ss)
        for s in ss:
            keep_up(s)
        h.runner.fail = {ss[1].id}
        before = {s.id: s.chunks_generated for s in ss}
        with caplog.at_level(logging.WARNING, logger="shotstream.scheduler"):
            plan, _ = h.step(10.0)
        assert len(plan.rows) == 3
        assert any("retrying each session alone" in r.getMessage() for r in caplog.records)
        seqs = {w.session.id: w.seq for w in plan.rows}
        retried = [h.step(11.0 + i)[0] for i in range(3)]
        assert all(p.retry and len(p.rows) == 1 for p in retried)
        # each retried with the seq it was planned with
        assert {p.rows[0].session.id: p.rows[0].seq for p in retried} == seqs
        # only the faulty session failed; the others generated their chunk
        assert [s.state for s in ss] == ["waiting", "failed", "waiting"]
        assert [s.chunks_generated - before[s.id] for s in ss] == [1, 0, 1]

    run_in_loop(go)


def test_a_session_ended_while_its_retry_waits_is_freed_not_run(h):
    def go():
        ss = [h.create(f"s{i}") for i in range(2)]
        open_all(h, ss)
        for s in ss:
            keep_up(s)
        h.runner.fail = {ss[0].id}
        h.step(10.0)  # the batch fails; both wait for a retry
        h.manager.end(ss[1], "deleted")
        assert not ss[1].released  # still in flight: freed when its retry comes up
        plans = [h.step(11.0 + i)[0] for i in range(3)]
        assert ss[1].released
        assert any(ss[1].id in p.finish for p in plans)
        assert not any(w.session is ss[1] for p in plans for w in p.rows)

    run_in_loop(go)


def test_a_shot_that_ends_with_nothing_queued_continues_or_pauses():
    for on_end, want in (("continue", "waiting"), ("pause", "paused")):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            h = Harness(on_shot_end=on_end)

            async def go(h=h):
                s = h.create("g", shots=["only"])
                for t in range(CFG.chunks_per_shot + 1):
                    keep_up(s)
                    h.step(float(t))
                return s

            s = loop.run_until_complete(go())
            assert s.state == want
            if on_end == "continue":
                assert s.current.auto and s.current.text == "only" and s.shot_index == 1
        finally:
            loop.close()
            asyncio.set_event_loop(None)


def test_ended_sessions_are_freed_at_the_next_step(h):
    def go():
        s = h.create()
        h.step(0.0)
        h.manager.end(s, "deleted")
        plan, _ = h.step(1.0)
        assert plan.finish == [s.id] and not plan.rows

    run_in_loop(go)
