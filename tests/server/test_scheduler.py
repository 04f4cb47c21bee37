"""The scheduler on its own: a fake clock (`now` passed in) and a fake runner (outcomes made
here), no model, no sockets. Each test plans, "runs" and applies steps in milliseconds."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np
import pytest

from model.config import get_preset
from server import protocol as P
from server.delivery import Connection, MediaItem
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


def _noop(*args) -> None:
    pass


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

    async def create(self, prompt="p", shots=(), connect=True, **kw):
        req = P.CreateSessionRequest(prompt=prompt, shots=list(shots), **kw)
        s, _ = await self.manager.create("c", req)
        if connect:  # a stream connection the test never reads from
            self.manager.attach(s, Connection(_noop, _noop, _noop, 0.0))
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


def run(body, **settings):
    """Run `async body(harness)` on a fresh loop (the manager arms timers on it)."""

    async def go():
        return await body(Harness(**settings))

    return asyncio.run(go())


def test_earliest_deadline_first():
    async def body(h):
        a, b = await h.create("a"), await h.create("b")
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

    run(body)


def test_lead_pacing_waits_until_the_buffer_drops_below_the_lead():
    async def body(h):
        s = await h.create()
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

    run(body)


def test_outbox_back_pressure_blocks_a_reader_that_does_not_read():
    async def body(h):
        s = await h.create()
        plans = 0
        s.clock.start, s.clock.delivered = -1e6, 0.0  # a player long dry, never fed
        for t in range(40):
            plan, _ = h.step(float(t))
            plans += bool(plan.rows)
        assert plans == h.settings.outbox_chunks  # never more undelivered than the outbox

    run(body)


def test_without_a_connection_only_the_lead_is_prepared():
    async def body(h):
        s = await h.create(connect=False)
        plans = sum(bool(h.step(float(t))[0].rows) for t in range(20))
        assert plans == round(h.settings.lead_chunks)  # then it waits for a player
        # the same once a player has run and gone: a reconnect storm gains nothing here
        h.manager.attach(s, Connection(_noop, _noop, _noop, 0.0))
        keep_up(s)
        h.manager.detach(s, s.conn)
        plans = sum(bool(h.step(100.0 + t)[0].rows) for t in range(20))
        assert plans == round(h.settings.lead_chunks)

    run(body)


def test_a_reconnect_does_not_restart_the_players_clock():
    """The playout clock belongs to the session: a client that reconnects after every chunk
    gets no fresh lead, so its pace is real time, not faster."""

    async def body(h):
        s = await h.create()
        h.step(0.0)
        keep_up(s)
        now = time.monotonic()  # attach reads the real clock: the player lives in its time
        s.clock.start = now  # a player started now with 3 chunks delivered: 2.25 s buffered
        s.clock.delivered = 3 * CFG.chunk_seconds
        at = ready_at(s, now, h.settings, CFG.chunk_seconds)
        assert at == pytest.approx(now + CFG.chunk_seconds)  # lead 1.5 s: wait 0.75 s
        for _ in range(5):  # reconnect, over and over
            h.manager.detach(s, s.conn)
            h.manager.attach(s, Connection(_noop, _noop, _noop, now), last_seq=s.next_seq - 1)
            assert ready_at(s, now, h.settings, CFG.chunk_seconds) == pytest.approx(at)
        plan, _ = h.scheduler.schedule(now)
        assert plan.empty

    run(body)


def test_a_client_back_after_its_player_ran_dry_is_not_a_deadline_miss():
    async def body(h):
        s = await h.create()
        s.clock.on_delivered(10.0, 0.75)  # played until 10.75
        h.manager.detach(s, s.conn)
        h.manager.attach(s, Connection(_noop, _noop, _noop, 30.0))  # back at t=30
        s.clock.rebase_if_dry(30.0)
        assert s.clock.on_delivered(30.0, 0.75) == 0.0

    run(body)


def test_paused_session_is_not_scheduled_until_resumed():
    async def body(h):
        s = await h.create()
        h.manager.pause(s)
        plan, later = h.scheduler.schedule(0.0)
        assert plan.empty and later is None
        h.manager.resume(s)
        plan, _ = h.scheduler.schedule(0.0)
        assert [w.session for w in plan.rows] == [s]

    run(body)


def test_cut_starts_at_the_next_chunk_and_queue_after_the_current_and_queued_shots():
    async def body(h):
        s = await h.create("g", shots=["one"])
        h.step(0.0)  # shot 0 ("one") starts at seq 0
        assert s.current.text == "one" and s.next_seq == 1
        q1 = await h.manager.add_prompt(s, "q1", "queue")
        q2 = await h.manager.add_prompt(s, "q2", "queue")
        per = CFG.chunks_per_shot
        assert (q1.starts_at_seq, q2.starts_at_seq) == (per, 2 * per)
        cut = await h.manager.add_prompt(s, "cut", "cut")
        assert cut.starts_at_seq == 1  # the next chunk
        # the queue moved behind the cut's shot, and the client is told
        assert (q1.starts_at_seq, q2.starts_at_seq) == (1 + per, 1 + 2 * per)
        acks = [
            m
            for m in s.outbox.control
            if m["type"] == "prompt_ack" and m["shot_id"] in (q1.shot_id, q2.shot_id)
        ]
        assert {m["shot_id"]: m["starts_at_seq"] for m in acks} == {
            q1.shot_id: 1 + per,
            q2.shot_id: 1 + 2 * per,
        }
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

    run(body)


def test_a_later_cut_supersedes_a_pending_one():
    async def body(h):
        s = await h.create()
        h.step(0.0)
        a = await h.manager.add_prompt(s, "a", "cut")
        b = await h.manager.add_prompt(s, "b", "cut")
        dropped = [m for m in s.outbox.control if m["type"] == "prompt_dropped"]
        assert [m["shot_id"] for m in dropped] == [a.shot_id]
        assert s.pending_cut is b and b.starts_at_seq == 1

    run(body)


def test_batch_companions_continue_their_shots_and_a_batch_never_starts_a_shot():
    async def body(h):
        ss = [await h.create(f"s{i}") for i in range(3)]
        open_all(h, ss)
        for s in ss:
            keep_up(s)
        plan, _ = h.step(10.0)
        assert len(plan.rows) == 3 and not any(w.starts_shot for w in plan.rows)
        # a cut pending on one of them: it runs alone, the others may batch without it
        await h.manager.add_prompt(ss[1], "cut", "cut")
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

    run(body)


def test_max_batch_one_never_batches():
    async def body(h):
        ss = [await h.create(f"s{i}") for i in range(3)]
        for t in range(6):
            plan, _ = h.step(float(t))
            assert len(plan.rows) <= 1
            for s in ss:
                keep_up(s)

    run(body, max_batch=1)


def test_a_failed_batch_is_retried_one_session_at_a_time_and_logged(caplog):
    async def body(h):
        ss = [await h.create(f"s{i}") for i in range(3)]
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
        assert [s.state for s in ss] == ["streaming", "failed", "streaming"]
        assert [s.chunks_generated - before[s.id] for s in ss] == [1, 0, 1]

    run(body)


def test_a_session_ended_while_its_retry_waits_is_freed_not_run():
    async def body(h):
        ss = [await h.create(f"s{i}") for i in range(2)]
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

    run(body)


def test_a_shot_that_ends_with_nothing_queued_continues_or_pauses():
    for on_end, want in (("continue", "streaming"), ("pause", "paused")):

        async def body(h):
            s = await h.create("g", shots=["only"])
            for t in range(CFG.chunks_per_shot + 1):
                keep_up(s)
                h.step(float(t))
            return s

        s = run(body, on_shot_end=on_end)
        assert s.state == want
        if on_end == "continue":
            assert s.current.auto and s.current.text == "only" and s.shot_index == 1


def test_ended_sessions_are_freed_at_the_next_step():
    async def body(h):
        s = await h.create()
        h.step(0.0)
        h.manager.end(s, "deleted")
        plan, _ = h.step(1.0)
        assert plan.finish == [s.id] and not plan.rows

    run(body)


# -- instant cuts (feature `withdraw`) ----------------------------------------------------
def withdraw_conn() -> Connection:
    conn = Connection(_noop, _noop, _noop, 0.0)
    conn.withdraw = True
    return conn


def run_and_send(h, s, now: float, sent: bool = True) -> list:
    """Step once; the session's chunks that came out are packaged as the Packager would
    (message + segment in the media lane) and, if `sent`, delivered whole."""
    plan, _ = h.scheduler.schedule(now)
    h.manager.on_planned(plan)
    if plan.empty:
        return []
    up = h.scheduler.update(plan, h.runner.execute_now(plan))
    fps = CFG.fps
    out = []
    for work, result in up.done:
        if work.session is not s:
            continue
        n = result.frames.shape[0]
        items = []
        if work.starts_shot:
            msg = {"type": "shot", "shot": s.shot_index, "shot_id": work.prompt.shot_id}
            items.append(MediaItem(msg, None, work.seq))
        msg = {"type": "chunk", "seq": work.seq, "pts": work.first_frame / fps, "duration": n / fps}
        items.append(MediaItem(msg, b"x" * 100, work.seq, n, n / fps))
        s.outbox.media.extend(items)
        if sent:
            for item in items:
                h.manager.delivered(s, item, 0.0)
        out.append(work)
    return out


def test_a_cut_at_the_playhead_withdraws_the_unplayed_rest_of_the_shot():
    """Three chunks sent (9 + 12 + 12 = 33 frames); the player reports 0.5 s; with a 0.25 s
    margin the cut lands at frame 12 (0.75 s), inside the second chunk: the third is
    withdrawn whole, the second keeps its first 3 frames, the viewer is told, and the new
    shot's first chunk starts at frame 12 with the generator told to keep 12 frames."""

    async def body(h):
        s = await h.create(connect=False)
        h.manager.attach(s, withdraw_conn())
        now = time.monotonic()
        for i in range(3):
            keep_up(s)
            run_and_send(h, s, now + i)
        assert [x.seq for x in s.outbox.sent if x.data] == [0, 1, 2]
        assert s.outbox.frames_sent == 33
        h.manager.report_playhead(s, s.conn, 0.5)
        cut = await h.manager.add_prompt(s, "the cut", "cut")
        assert ready_at(s, now, h.settings, CFG.chunk_seconds) == now  # at once, lead or not
        assert deadline(s) == -math.inf  # before anyone else
        plan, _ = h.scheduler.schedule(s.playhead[1])  # as the report arrived: no drift
        h.manager.on_planned(plan)
        (w,) = plan.withdrawals
        assert (w.cut_frame, w.seqs, w.partial.seq, w.frames_withdrawn) == (12, [2], 1, 21)
        (work,) = plan.rows
        assert work.starts_shot and work.prompt is cut and work.truncate_to == 12
        assert work.first_frame == 12 and work.seq == 3 == cut.starts_at_seq
        # delivery forgot the withdrawn video and tells the viewer, in order with the media
        assert s.outbox.frames_sent == 12 and s.outbox.chunks_delivered == 2
        assert s.outbox.last_delivered_seq == 1 and s.chunks_generated == 2
        msg = s.outbox.media[-1].message
        assert msg == {"type": "withdraw", "seqs": [2], "pts": 12 / CFG.fps, "shot_id": cut.shot_id}
        assert 2 in s.withdrawn

    run(body, cut_margin_s=0.25)


def test_without_a_playhead_report_only_unsent_chunks_are_withdrawn():
    async def body(h):
        s = await h.create(connect=False)
        h.manager.attach(s, withdraw_conn())
        now = time.monotonic()
        keep_up(s)
        run_and_send(h, s, now)  # chunk 0 sent
        keep_up(s)
        s.outbox.chunks_delivered = s.chunks_generated  # (keep the scheduler willing)
        run_and_send(h, s, now + 1, sent=False)  # chunk 1 generated, still in the lane
        s.outbox.chunks_delivered = 1
        await h.manager.add_prompt(s, "cut", "cut")
        plan, _ = h.scheduler.schedule(now + 2)
        h.manager.on_planned(plan)
        (w,) = plan.withdrawals
        assert (w.cut_frame, w.seqs, w.partial) == (9, [1], None)
        assert [x.seq for x in s.outbox.media] == []  # chunk 1 left the lane, unannounced
        assert not any(x.message["type"] == "withdraw" for x in s.outbox.media)

    run(body)


def test_a_version_1_viewer_keeps_cuts_behind_the_buffer():
    async def body(h):
        s = await h.create()  # a connection without the feature
        now = time.monotonic()
        for i in range(2):
            keep_up(s)
            run_and_send(h, s, now + i)
        s.playhead = (0.1, now)
        await h.manager.add_prompt(s, "cut", "cut")
        keep_up(s)
        plan, _ = h.scheduler.schedule(now + 3)
        assert not plan.withdrawals and plan.rows[0].truncate_to is None
        assert plan.rows[0].first_frame == 21  # after everything generated

    run(body)


def test_a_shot_withdrawn_whole_is_replaced_and_its_prompt_reported_dropped():
    """Cut A lands, then cut B before any of A's video is played: A's shot is withdrawn
    whole (B takes its shot index) and A gets `prompt_dropped`: the latest cut wins."""

    async def body(h):
        s = await h.create(connect=False)
        h.manager.attach(s, withdraw_conn())
        now = time.monotonic()
        for i in range(2):
            keep_up(s)
            run_and_send(h, s, now + i)
        h.manager.report_playhead(s, s.conn, 0.1)
        a = await h.manager.add_prompt(s, "A", "cut")
        t = s.playhead[1]
        assert [w.prompt for w in run_and_send(h, s, t)] == [a]
        index_a = s.shot_index
        s.playhead = (0.1, t)  # the player has not moved on
        b = await h.manager.add_prompt(s, "B", "cut")
        plan, _ = h.scheduler.schedule(t)
        h.manager.on_planned(plan)
        (w,) = plan.withdrawals
        assert w.replaced is a and plan.rows[0].truncate_to == 0
        assert s.shot_index == index_a and s.current is b
        dropped = [m for m in s.outbox.control if m["type"] == "prompt_dropped"]
        assert [m["shot_id"] for m in dropped] == [a.shot_id]

    run(body, cut_margin_s=0.25)


def test_a_playhead_past_what_was_sent_is_refused():
    async def body(h):
        s = await h.create(connect=False)
        h.manager.attach(s, withdraw_conn())
        keep_up(s)
        run_and_send(h, s, time.monotonic())
        with pytest.raises(P.LimitError):
            h.manager.report_playhead(s, s.conn, 5.0)  # 9 frames were sent: 0.5625 s
        assert s.playhead is None
        h.manager.report_playhead(s, s.conn, 0.5)
        assert s.playhead[0] == 0.5

    run(body)


# -- the recording at a session's end ------------------------------------------------------
class RecorderLog:
    """What the manager tells its recorder, in order (the real recorder's files are checked
    against real servers in test_recordings.py and tests/clients/test_watch_record.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def delivered(self, s, item: MediaItem) -> None:
        self.calls.append((item.message["type"], item.seq))

    def finish(self, s, reason: str) -> None:
        self.calls.append(("finish", reason))


@pytest.mark.parametrize("arrives", [True, False])
def test_a_chunk_in_flight_at_the_end_is_recorded_if_its_owner_got_it(arrives):
    """A session that ends while its sender is sending a chunk: the owner may still get it
    whole, so the recording (which holds what the owner was sent) finishes after that send,
    with the chunk when it arrived and without it when the send failed."""

    async def body(h):
        h.manager.recorder = rec = RecorderLog()
        s = await h.create()
        keep_up(s)
        run_and_send(h, s, time.monotonic(), sent=False)
        shot, chunk = list(s.outbox.media)
        h.manager.delivered(s, shot, 0.0)
        s.conn.sending = chunk  # the sender is writing it to the socket
        h.manager.end(s, "stopped")
        assert rec.calls == [("shot", 0)]  # not finished yet
        s.conn.sending = None
        if arrives:
            h.manager.delivered(s, chunk, 0.0)
        h.manager.settle_recording(s)  # the sender stops
        h.manager.settle_recording(s)  # (idempotent)
        got = [("chunk", 0)] if arrives else []
        assert rec.calls == [("shot", 0), *got, ("finish", "stopped")]

    run(body)


def test_a_session_ending_between_sends_finishes_its_recording_at_once():
    async def body(h):
        h.manager.recorder = rec = RecorderLog()
        s = await h.create()
        h.manager.end(s, "deleted")
        assert rec.calls == [("finish", "deleted")]
        h.manager.settle_recording(s)
        assert rec.calls == [("finish", "deleted")]

    run(body)
