"""Sessions: lifecycle, tokens, admission, prompts and stream connections.

Everything here runs on the event loop thread, so a session's state needs no locks. The
scheduler (server/scheduler.py) decides what runs, the runner's worker thread computes it,
and delivery (server/delivery.py) packages and accounts for what is sent.

A session's life: created (state `waiting`) -> a stream connects (`streaming`) ->
`paused`/`streaming` -> `ended` or `failed`. Every end goes through `SessionManager.end`,
which releases the session's device state (at the next step, or when its in-flight step
returns) and its encoder.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from server import protocol as P
from server.delivery import Connection, MediaItem, Outbox, Packager, PlayoutClock, new_encoder
from server.fanout import Audience, ViewerConnection, ViewerLink
from server.media import H264Encoder
from server.metrics import Metrics
from server.recording import Recorder
from server.runner import ModelRunner, OutOfMemory, StepResult, TokenReport
from server.settings import Settings
from server.waiting import WaitingRoom

if TYPE_CHECKING:  # the engine and scheduler import this module
    from server.engine import Engine
    from server.scheduler import ChunkWork, Plan, Withdrawal

log = logging.getLogger("shotstream.sessions")


class Refused(Exception):
    """A request the server will not take now: HTTP status, error code, Retry-After."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass
class Prompt:
    """An accepted shot prompt, from its acknowledgement until it is shown or dropped."""

    shot_id: int
    text: str
    mode: str
    received: float  # monotonic
    report: TokenReport
    auto: bool = False  # a continuation of the previous shot's prompt, not a user prompt
    starts_at_seq: int = -1
    acked_seq: int = -1  # the starts_at_seq the client was last told
    cut_planned: float | None = None  # monotonic time an instant cut of it was planned


class TokenBucket:
    """Rate limit: `rate` events per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Session:
    """One session: its prompts and shots (planned by the scheduler), its stream and outbox."""

    def __init__(
        self,
        sid: str,
        token: str,
        client: str,
        prompt: str,
        seed: int,
        mode: str,
        settings: Settings,
        encoder: H264Encoder,
    ) -> None:
        self.id, self.token, self.client = sid, token, client
        self.global_prompt, self.seed, self.mode = prompt, seed, mode
        self.encoder = encoder
        now = time.monotonic()
        self.created_mono = now
        self.created_at = datetime.now(UTC)
        self.expires_mono = now + settings.session_max_s
        self.expires_at = self.created_at + timedelta(seconds=settings.session_max_s)
        self.state = "waiting"
        self.admitted_mono: float | None = now  # None while in the waiting room
        self.queued_mono: float | None = None  # when it entered the waiting room
        self.queue_changed = asyncio.Event()  # its place moved, it started, or it ended
        self.queue_waiter: object | None = None  # the stream connection waiting with it
        self.error: str | None = None
        self.end_reason: str | None = None
        self.released = False  # device state and encoder given back
        # -- shots and prompts, planned by the scheduler
        self.next_shot_id = 0
        self.current: Prompt | None = None  # the shot being generated
        self.shot_index = -1
        self.chunks_in_shot = 0  # chunks planned in the current shot
        self.pending_cut: Prompt | None = None
        self.queue: deque[Prompt] = deque()
        self.next_seq = 0  # seq of the next chunk to plan
        self.opened = False  # the runner holds its state
        self.inflight = False  # a step of it is planned and not yet applied
        self.chunks_generated = 0
        self.video_generated = 0.0  # seconds of video planned: generated or in flight
        self.next_frame = 0  # media timeline: frame index where the next chunk starts
        self.shot_chunks: list = []  # ChunkRecords of the current shot (what a cut may withdraw)
        self.withdrawn: set[int] = set()  # seqs withdrawn by cuts (their encodes are dropped)
        self.playhead: tuple[float, float] | None = None  # (pts, monotonic) last reported
        # -- delivery
        self.outbox = Outbox(2 * max(2, settings.outbox_chunks), settings.resume_window_s)
        # The viewer's player, over all its connections: a reconnect does not restart it, so
        # a session's pace does not depend on how often its client reconnects.
        self.clock = PlayoutClock()
        self.encode_lock = asyncio.Lock()
        self.conn: Connection | None = None
        self.ever_connected = False  # a stream has attached at least once
        self.disconnected_at: float | None = now
        self.prompt_bucket = TokenBucket(settings.prompt_rate, 8)
        self.timer: asyncio.TimerHandle | None = None
        self.audience = Audience()  # watch links and viewers (server/fanout.py)
        # Set when the session ended while a chunk was on its way to the owner: the reason
        # the recording waits for (it finishes once that send is done, with the chunk if it
        # arrived whole: SessionManager.settle_recording).
        self.recording_end: str | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("waiting", "streaming", "paused")

    def waiting_prompts(self) -> list[Prompt]:
        """Acknowledged prompts whose shot has not started: the pending cut, then the queue."""
        return [*([self.pending_cut] if self.pending_cut else []), *self.queue]


class SessionManager:
    """Creates, finds, feeds and ends sessions; owns admission and their connections."""

    def __init__(
        self,
        settings: Settings,
        runner: ModelRunner,
        metrics: Metrics,
        encode_pool=None,
        text_pool=None,
    ) -> None:
        self.settings, self.runner, self.metrics = settings, runner, metrics
        self.text_pool = text_pool  # caption cleaning and tokenizing, off the event loop
        self.cfg = runner.cfg
        self.sessions: dict[str, Session] = {}
        self.waiting = WaitingRoom()  # queued sessions, in order (server/waiting.py)
        self._queue_tick: asyncio.TimerHandle | None = None
        self._queue_pending = 0  # places promised by `admit`, not yet taken by `create`
        # Admissions `admit` granted whose `create` has not registered the session yet (it
        # awaits the caption checks): counted against the slots and the client's quota, so
        # two requests at once cannot both take the last one.
        self._creating: Counter[str] = Counter()
        self._creating_slots = 0
        self.ended: dict[str, Session] = {}  # tombstones for GET after the end
        self.engine: Engine | None = None
        self.recorder: Recorder | None = None  # set by AppState once the model is loaded
        self.ready = False
        self.draining = False
        self.packager = Packager(encode_pool, metrics)
        self.limits = P.Limits(
            max_prompt_chars=settings.max_prompt_chars,
            max_shots=settings.max_shots_per_request,
            max_message_bytes=settings.max_ws_message_bytes,
        )

    # -- lookup ------------------------------------------------------------------------
    def get(self, sid: str, token: str | None) -> Session | None:
        """The session if `token` is its token (constant-time compare), else None."""
        s = self.sessions.get(sid) or self.ended.get(sid)
        # Bytes, not str: compare_digest raises TypeError on non-ASCII str (a 500 for any
        # header or query token with such a character).
        if (
            s is None
            or token is None
            or not hmac.compare_digest(s.token.encode(), token.encode("utf-8", "surrogatepass"))
        ):
            return None
        return s

    def find_reader(self, sid: str, token: str | None) -> tuple[Session, ViewerLink | None] | None:
        """The session for its owner's token (link None) or one of its watch links'; None
        for anything else. A revoked or expired link is refused (401) with its reason."""
        s = self.sessions.get(sid) or self.ended.get(sid)
        if s is None and self.recorder is not None:  # its record is gone, its recording kept
            s = self.recorder.session_of(sid)
        if s is None or token is None:
            return None
        if hmac.compare_digest(s.token.encode(), token.encode("utf-8", "surrogatepass")):
            return s, None
        link = s.audience.find(token)
        if link is None:
            return None
        state = link.state(time.monotonic())
        if state != "active":
            raise Refused(401, P.ErrorCode.UNAUTHORIZED, f"this watch link was {state}")
        return s, link

    @property
    def active(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.alive]

    # -- admission ---------------------------------------------------------------------
    def capacity(self) -> int:
        return self.engine.capacity() if self.engine else 0

    def admit(self, client: str, wait: bool = False) -> bool:
        """Raise Refused unless one more session can be kept real time, for this client too.
        With `wait` (the request asked to wait), a full replica answers True instead: the
        session is to wait in the waiting room (docs/design/protocol.md §17)."""
        if self.draining or not self.ready:
            reason = "draining" if self.draining else "not_ready"
            self.metrics.sessions_refused.labels(reason).inc()
            raise Refused(
                503,
                P.ErrorCode.DRAINING if self.draining else P.ErrorCode.OVER_CAPACITY,
                f"server is {'draining' if self.draining else 'warming up'}; try another replica or later",
                retry_after=5,
            )
        mine = sum(1 for s in (*self.active, *self.waiting) if s.client == client)
        mine += self._creating[client]
        if mine >= self.settings.max_sessions_per_client:
            self.metrics.sessions_refused.labels("quota").inc()
            raise Refused(
                429,
                P.ErrorCode.RATE_LIMITED,
                f"{mine} sessions open for this client; the limit is {self.settings.max_sessions_per_client}",
                retry_after=self.retry_after(),
            )
        self._admit_waiting()  # a free slot goes to those waiting first
        cap = self.capacity()
        if len(self.active) + len(self.waiting) + self._creating_slots < cap:
            self._creating_slots += 1  # held while its captions are checked
            self._creating[client] += 1
            return False
        room = self.settings.queue_max_length
        if wait and room:
            if len(self.waiting) + self._queue_pending < room:
                self._queue_pending += 1  # held while its captions are checked
                self._creating[client] += 1
                return True
            self.metrics.sessions_refused.labels("queue_full").inc()
            raise Refused(
                503,
                P.ErrorCode.OVER_CAPACITY,
                f"all {cap} real-time session slots are in use and {len(self.waiting)} "
                f"sessions wait for one, the most the waiting room holds",
                retry_after=self.retry_after(),
            )
        self.metrics.sessions_refused.labels("capacity").inc()
        raise Refused(
            503,
            P.ErrorCode.OVER_CAPACITY,
            f"all {cap} real-time session slots are in use",
            retry_after=self.retry_after(),
        )

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the soonest idle expiry, else a few chunks."""
        now = time.monotonic()
        soonest = [
            s.disconnected_at + self.settings.session_grace_s - now
            for s in self.active
            if s.conn is None and s.disconnected_at is not None
        ]
        return max(1.0, min(soonest)) if soonest else 10.0

    # -- creation ----------------------------------------------------------------------
    async def create(
        self, client: str, req: P.CreateSessionRequest, queued: bool = False
    ) -> tuple[Session, int]:
        """A new session (after `admit`; `queued`: into the waiting room); returns it and
        the tokens cut from its captions."""
        try:
            P.validate_create(req, self.limits)
            shots = list(req.shots) or [""]
            reports = await self._check_captions(req.prompt, list(enumerate(shots)))
        finally:
            if self._creating[client] > 0:  # what `admit` held for this request
                self._creating[client] -= 1
                if queued:
                    self._queue_pending -= 1
                else:
                    self._creating_slots -= 1
            if not self._creating[client]:
                del self._creating[client]
        if self.draining:  # the drain began while the captions were checked
            raise Refused(503, P.ErrorCode.DRAINING, "server is draining", retry_after=5)
        sid = f"{self.settings.replica_id}.{secrets.token_hex(12)}"
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        s = Session(
            sid,
            secrets.token_urlsafe(32),
            client,
            req.prompt,
            seed,
            req.mode,
            self.settings,
            new_encoder(self.cfg),
        )
        now = time.monotonic()
        for text, report in zip(shots, reports, strict=True):
            p = Prompt(s.next_shot_id, text, "queue", now, report)
            s.next_shot_id += 1
            s.queue.append(p)
        self._replan(s)
        self.sessions[sid] = s
        if queued:
            s.state, s.admitted_mono, s.queued_mono = "queued", None, now
            # the latest it can expire: after the longest wait and a whole lifetime
            s.expires_at += timedelta(seconds=self.settings.queue_max_wait_s)
            self.waiting.add(s)
            self.metrics.sessions_queued.inc()
            self._tick_queue()
        self._arm_timer(s)
        self.metrics.sessions_created.inc()
        self.metrics.prompts_received.inc(len(shots))  # so received >= applied + dropped
        log.info(
            "session created",
            extra={
                "session_id": sid,
                "client": client,
                "seed": seed,
                "shots": len(shots),
                **({"queue_position": self.waiting.position(s)} if queued else {}),
            },
        )
        self._admit_waiting()  # a slot may have freed while its captions were checked
        self._wake_engine()
        return s, sum(r.truncated_tokens for r in reports)

    async def _check_captions(
        self, global_prompt: str, shots: list[tuple[int, str]]
    ) -> list[TokenReport]:
        """Clean and tokenize captions (ftfy is slow on long mojibake) on the text pool,
        one request's captions as one job, so the event loop never waits for them."""

        def check() -> list[TokenReport]:
            return [self.runner.check_caption(global_prompt, i, text) for i, text in shots]

        try:
            return await asyncio.get_running_loop().run_in_executor(self.text_pool, check)
        except ValueError as exc:  # PromptTooLong under prompt_overflow=reject
            raise P.LimitError(P.ErrorCode.PROMPT_TOO_MANY_TOKENS, str(exc)) from exc

    def expires_at(self, s: Session) -> datetime:
        return s.expires_at  # hard expiry: session_max_s after it started

    # -- the waiting room (docs/design/protocol.md §17) ------------------------------------------
    def _admit_waiting(self) -> None:
        """Start queued sessions, first come first served, while there are free slots."""
        if not self.waiting or not self.ready or self.draining:
            return
        started = False
        while self.waiting and len(self.active) < self.capacity():
            s = self.waiting.queue.popleft()
            now = time.monotonic()
            s.state, s.admitted_mono, s.disconnected_at = "waiting", now, now
            s.expires_mono = now + self.settings.session_max_s
            s.expires_at = datetime.now(UTC) + timedelta(seconds=self.settings.session_max_s)
            assert s.queued_mono is not None
            self.metrics.queue_wait.observe(now - s.queued_mono)
            self._arm_timer(s)  # from now: its grace to connect, its lifetime
            s.queue_changed.set()
            log.info(
                "session started from the waiting room",
                extra={"session_id": s.id, "waited_s": round(now - s.queued_mono, 3)},
            )
            started = True
        if started:
            for x in self.waiting:
                x.queue_changed.set()  # a place moved
            self._wake_engine()

    def _tick_queue(self) -> None:
        """While sessions wait, look for a slot every second too (capacity follows the
        measured chunk cost, which can fall as well as rise)."""
        if self._queue_tick is not None or not self.waiting:
            return

        def tick() -> None:
            self._queue_tick = None
            self._admit_waiting()
            self._tick_queue()

        self._queue_tick = asyncio.get_running_loop().call_later(1.0, tick)

    def queue_info(self, s: Session) -> tuple[int, int, float | None] | None:
        """(position, queue length, estimated seconds to start) of a queued session."""
        position = self.waiting.position(s)
        if position is None:
            return None
        now, grace = time.monotonic(), self.settings.session_grace_s
        live = []
        for x in self.active:
            latest = x.expires_mono - now
            if x.conn is None and x.disconnected_at is not None:
                latest = min(latest, x.disconnected_at + grace - now)
            live.append((now - (x.admitted_mono or x.created_mono), latest))
        estimate = self.waiting.estimate(
            position, live, self.capacity(), self.settings.session_max_s
        )
        return position, len(self.waiting), estimate

    # -- prompts -------------------------------------------------------------------------
    async def add_prompt(self, s: Session, text: str, mode: str | None) -> Prompt:
        """Accept a shot prompt now; it starts at the next chunk (`cut`) or after the
        current and queued shots (`queue`). Raises LimitError / Refused."""
        if not s.alive:
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}")
        P.validate_prompt(P.PromptRequest(prompt=text), self.limits)
        if not s.prompt_bucket.take():
            raise Refused(
                429,
                P.ErrorCode.RATE_LIMITED,
                f"more than {self.settings.prompt_rate:g} prompts per second",
                retry_after=1,
            )
        mode = mode or s.mode
        if mode == "queue" and len(s.queue) >= self.settings.max_queued_prompts:
            raise Refused(
                429,
                P.ErrorCode.RATE_LIMITED,
                f"{len(s.queue)} prompts queued; the limit is {self.settings.max_queued_prompts}",
                retry_after=self.cfg.chunk_seconds,
            )
        expected_shot = s.shot_index + 1 + (len(s.queue) if mode == "queue" else 0)
        (report,) = await self._check_captions(s.global_prompt, [(max(expected_shot, 0), text)])
        if not s.alive:  # ended while its caption was checked
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}")
        p = Prompt(s.next_shot_id, text, mode, time.monotonic(), report)
        s.next_shot_id += 1
        self.metrics.prompts_received.inc()
        if mode == "cut":
            if s.pending_cut is not None:
                self._drop(s, s.pending_cut, "superseded by a later cut")
            s.pending_cut = p
        else:
            s.queue.append(p)
        self._replan(s, acked=p)
        log.info(
            "prompt accepted",
            extra={
                "session_id": s.id,
                "shot_id": p.shot_id,
                "mode": mode,
                "starts_at_seq": p.starts_at_seq,
                **({"prompt": text} if self.settings.log_prompts else {}),
            },
        )
        self._wake_engine()
        return p

    def _replan(self, s: Session, acked: Prompt | None = None) -> None:
        """Give waiting prompts their starts_at_seq; tell the client of any that moved."""
        if self.engine is not None:
            for p in self.engine.scheduler.replan(s, acked):
                self._ack(s, p)

    def _ack(self, s: Session, p: Prompt, ref: str | None = None) -> None:
        self.send_control(
            s,
            P.PromptAckMessage(
                shot_id=p.shot_id,
                starts_at_seq=p.starts_at_seq,
                truncated_tokens=p.report.truncated_tokens,
                ref=ref,
            ),
        )

    def _drop(self, s: Session, p: Prompt, reason: str) -> None:
        self.metrics.prompts_dropped.labels(reason.split(" ")[0]).inc()
        self.send_control(s, P.PromptDroppedMessage(shot_id=p.shot_id, reason=reason))

    # -- what the engine reports -----------------------------------------------------------
    def on_planned(self, plan: Plan) -> None:
        """A plan was made: tell clients of moved prompts; log sessions paused at a shot end."""
        for s, p in plan.moved:
            self._ack(s, p)
        for s in plan.paused:
            log.info("session paused", extra={"session_id": s.id, "reason": "shot ended"})
        for s in plan.orphaned:
            self.release(s)
        for w in plan.withdrawals:
            self._withdraw(w)

    def _withdraw(self, w: Withdrawal) -> None:
        """Delivery's side of a cut at the playhead: the withdrawn video leaves the lanes and
        the counts, the player's clock forgets it, and the viewer is told (in order with the
        media) what to remove. A user prompt whose whole shot went is reported dropped."""
        s, fps = w.session, self.cfg.fps
        tail_item, tail_frames = None, 0
        if w.partial is not None:
            tail_item = s.outbox.sent_item(w.partial.seq)
            tail_frames = w.partial.first_frame + w.partial.frames - w.cut_frame
        sent, seconds = s.outbox.withdraw(set(w.seqs), tail_item, tail_frames, fps)
        s.outbox.seq_floor = w.prompt.starts_at_seq  # the withdrawn seqs are never sent
        s.clock.withdraw(seconds)
        self.metrics.chunks_withdrawn.inc(len(w.seqs))
        self.metrics.frames_withdrawn.inc(w.frames_withdrawn)
        w.prompt.cut_planned = time.monotonic()
        if sent or tail_frames:
            msg = P.WithdrawMessage(seqs=sent, pts=w.cut_frame / fps, shot_id=w.prompt.shot_id)
            # In the media lane, under the seq of the cut's first chunk, which follows it: a
            # resume before that chunk replays it as it replays a chunk.
            seq = w.prompt.starts_at_seq
            s.outbox.media.append(
                MediaItem(msg.model_dump(mode="json"), seq=seq, ready=time.monotonic())
            )
            if s.conn is not None:
                s.conn.sent_end_pts = min(s.conn.sent_end_pts, w.cut_frame / fps)
                s.conn.wake.set()
        if w.replaced is not None:
            self._drop(s, w.replaced, "superseded by a later cut before it was shown")
        log.info(
            "cut at the playhead",
            extra={
                "session_id": s.id,
                "cut_frame": w.cut_frame,
                "withdrawn_frames": w.frames_withdrawn,
            },
        )

    def on_chunk(self, work: ChunkWork, result: StepResult) -> None:
        """A chunk came back from the worker: package it into the outbox, in order."""
        s = work.session

        def failed(reason: str) -> None:
            self.end(s, "failed", error=(P.ErrorCode.SESSION_FAILED, reason))

        asyncio.get_running_loop().create_task(self.packager.package(s, work, result, failed))

    def on_step_failed(self, s: Session, exc: BaseException) -> None:
        oom = isinstance(exc, OutOfMemory)
        code = P.ErrorCode.OUT_OF_MEMORY if oom else P.ErrorCode.SESSION_FAILED
        self.metrics.errors.labels("oom" if oom else "step").inc()
        log.error("session step failed", extra={"session_id": s.id, "error": repr(exc)})
        msg = (
            "out of device memory; the session was ended and its memory freed"
            if oom
            else f"generation failed: {type(exc).__name__}: {exc}"
        )
        self.end(s, "failed", error=(code, msg))

    # -- delivery ------------------------------------------------------------------------
    def send_control(self, s: Session, msg: P.BaseModel | dict[str, Any]) -> None:
        """Queue a message that overtakes media (acks, errors, pongs)."""
        if isinstance(msg, P.BaseModel):
            msg = msg.model_dump(mode="json")
        s.outbox.push_control(msg)
        if s.conn is not None:
            s.conn.wake.set()

    def delivered(self, s: Session, item: MediaItem, send_s: float) -> None:
        """An item was sent whole: counters, playout clock, deadline misses, latencies."""
        now = time.monotonic()
        m, conn = self.metrics, s.conn
        counted = s.outbox.sent_whole(item, keep=s.alive)  # an ended session keeps no video
        if counted and item.prompt is not None:
            m.prompts_applied.inc()
        if not item.replay and s.alive:  # viewers and the recording get what the owner was sent
            skipped = s.audience.deliver(item, self.settings.viewer_queue_chunks)
            if skipped:
                m.viewer_chunks_skipped.inc(skipped)
            if self.recorder is not None:
                self.recorder.delivered(s, item)
        elif not item.replay and s.recording_end is not None:
            # In flight when the session ended, and sent whole: the recording has it too.
            if self.recorder is not None:
                self.recorder.delivered(s, item)
            self.settle_recording(s)
        if item.data is None:  # a `shot` or `withdraw` message
            return
        m.frames_sent.inc(item.frames)
        m.bytes_sent.inc(len(item.data))
        m.ws_send.observe(send_s)
        if conn is not None:
            if not conn.first_sent:
                conn.first_sent = True
                m.ttff.observe(now - conn.connected_at)
            elif conn.last_sent is not None:
                m.inter_chunk_gap.observe(now - conn.last_sent)
            conn.last_sent = now
        if s.clock.on_delivered(now, item.duration) > 0:
            m.deadline_misses.inc()
        if counted and item.prompt is not None:
            m.prompt_to_visible.observe(now - item.prompt.received)
            if item.prompt.cut_planned is not None and self.engine is not None:
                self.engine.scheduler.observe_cut_delay(now - item.prompt.cut_planned)
        if conn is not None:
            msg = item.message
            conn.sent_end_pts = max(conn.sent_end_pts, msg["pts"] + msg["duration"])
        self._wake_engine()

    def report_playhead(self, s: Session, conn: Connection, pts: float) -> None:
        """The viewer's player is at `pts` (feature `withdraw`). A playhead past what this
        connection was sent cannot be true: refused (LimitError), not believed."""
        if not conn.withdraw:
            raise P.LimitError(
                P.ErrorCode.BAD_MESSAGE,
                "playhead reports need the `withdraw` feature (?features=withdraw)",
            )
        if pts > conn.sent_end_pts + 1.0 / self.cfg.fps:
            raise P.LimitError(
                P.ErrorCode.BAD_PLAYHEAD,
                f"playhead {pts:.3f} s is past the media sent ({conn.sent_end_pts:.3f} s)",
            )
        s.playhead = (pts, time.monotonic())

    # -- viewers (docs/design/protocol.md §15) ------------------------------------------------
    def mint_viewer(self, s: Session, ttl_s: float | None) -> ViewerLink:
        """A new watch link of `s`; Refused when the session is over or has too many."""
        if not s.alive and s.state != "queued":
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}")
        now = time.monotonic()
        limit = self.settings.max_viewer_links
        s.audience.prune(now, limit)
        if len(s.audience.live_links(now)) >= limit:
            self.metrics.errors.labels("viewer_limit").inc()
            raise Refused(
                429,
                P.ErrorCode.VIEWER_LIMIT,
                f"{limit} watch links are active; revoke one first",
                retry_after=1,
            )
        ttl = min(ttl_s or self.settings.viewer_link_ttl_s, self.settings.viewer_link_ttl_s)
        link = ViewerLink(
            secrets.token_hex(8),
            secrets.token_urlsafe(32),
            now + ttl,
            datetime.now(UTC) + timedelta(seconds=ttl),
        )
        s.audience.links[link.id] = link
        log.info("watch link minted", extra={"session_id": s.id, "viewer_id": link.id})
        return link

    def revoke_viewer(self, s: Session, viewer_id: str) -> None:
        """Revoke a watch link: its token stops working and its viewers are closed (4001)."""
        link = s.audience.links.get(viewer_id)
        if link is None:
            raise Refused(404, P.ErrorCode.UNKNOWN_VIEWER, f"no watch link {viewer_id!r}")
        link.revoked = True
        msg = "this watch link was revoked"
        err = P.ErrorMessage(code=P.ErrorCode.UNAUTHORIZED, message=msg, fatal=True)
        for c in link.conns:
            c.push_control(err.model_dump())
            c.close_after_flush(int(P.CloseCode.UNAUTHORIZED), msg)
        log.info("watch link revoked", extra={"session_id": s.id, "viewer_id": viewer_id})

    def viewers(self, s: Session) -> P.ViewerList:
        now = time.monotonic()
        infos = [
            P.ViewerInfo(
                viewer_id=x.id, expires_at=x.expires_at, state=x.state(now), connected=len(x.conns)
            )
            for x in s.audience.links.values()
        ]
        return P.ViewerList(viewers=infos, connected=len(s.audience.conns))

    def attach_viewer(self, s: Session, conn: ViewerConnection) -> None:
        """A viewer connection joins at the latest chunk; Refused past the viewer limits."""
        per_session = self.settings.max_viewers_per_session
        total = sum(len(x.audience.conns) for x in self.sessions.values())
        if len(s.audience.conns) >= per_session or total >= self.settings.max_viewers:
            self.metrics.errors.labels("viewer_limit").inc()
            which = (
                f"this session has {per_session} viewers"
                if len(s.audience.conns) >= per_session
                else f"this server has {self.settings.max_viewers} viewers"
            )
            raise Refused(503, P.ErrorCode.VIEWER_LIMIT, f"{which}, the most it takes")
        s.audience.conns.append(conn)
        if conn.link is not None:
            conn.link.conns.append(conn)
        conn.queue.extend(s.audience.join_items(conn))
        first = next((x.seq for x in conn.queue if x.data is not None), None)
        conn.next_seq = (
            first if first is not None else max(s.outbox.last_delivered_seq + 1, s.outbox.seq_floor)
        )
        log.info(
            "viewer connected",
            extra={"session_id": s.id, "viewer_id": conn.link.id if conn.link else "owner"},
        )
        self._count_viewers(s)

    def detach_viewer(self, s: Session, conn: ViewerConnection) -> None:
        if conn not in s.audience.conns:
            return
        s.audience.conns.remove(conn)
        if conn.link is not None and conn in conn.link.conns:
            conn.link.conns.remove(conn)
        conn.queue.clear()
        log.info("viewer disconnected", extra={"session_id": s.id, "skipped": conn.skipped})
        if s.alive:
            self._count_viewers(s)

    def _count_viewers(self, s: Session) -> None:
        msg = P.ViewersMessage(count=len(s.audience.conns)).model_dump()
        for c in s.audience.conns:
            c.push_control(msg)
        if s.conn is not None and s.conn.viewer_counts:
            self.send_control(s, msg)

    # -- control ----------------------------------------------------------------------------
    def pause(self, s: Session) -> None:
        if not s.alive:
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}")
        if s.state in ("streaming", "waiting"):
            s.state = "paused"
            s.clock.pause(time.monotonic())

    def resume(self, s: Session) -> None:
        if s.state != "paused":
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}, not paused")
        s.clock.resume(time.monotonic())
        s.state = "streaming" if s.conn is not None else "waiting"
        self._wake_engine()

    def _wake_engine(self) -> None:
        if self.engine:
            self.engine.wake()

    # -- connections ------------------------------------------------------------------------
    def attach(self, s: Session, conn: Connection, last_seq: int | None = None) -> None:
        """Make `conn` the session's stream; sets `conn.next_seq`, the first chunk it carries.

        A resuming client names the last chunk it received (`last_seq`): chunks after it
        that the dropped connection sent are sent again if still kept.
        """
        s.conn = conn
        s.ever_connected = True
        s.disconnected_at = None
        self._arm_timer(s)  # connected: only the session's lifetime limit stays armed
        if s.state == "waiting":
            s.state = "streaming"
        # The player's clock goes on across connections (a reconnect earns no new lead); if
        # it ran dry while nobody was connected, that wait is the client's, not a miss.
        s.clock.rebase_if_dry(time.monotonic())
        s.playhead = None  # unknown until this connection's player reports
        # A resuming player already holds (and may be playing) the media up to last_seq:
        # its playhead reports are bounded by that, not by what this connection sent yet.
        conn.sent_end_pts = max(conn.sent_end_pts, s.outbox.held_end(last_seq))
        for item in s.outbox.resume_after(last_seq):
            if item.data is not None and item.prompt is not None:
                # its shot's prompt counts as applied; when it became visible is not known
                self.metrics.prompts_applied.inc()
            # The client has it, though the dropped connection's sender never reported it:
            # viewers and the recording get it now.
            s.audience.deliver(item, self.settings.viewer_queue_chunks)
            if self.recorder is not None:
                self.recorder.delivered(s, item)
        # Waiting prompts are acknowledged again: the dropped connection may have lost them.
        for p in s.waiting_prompts():
            self._ack(s, p)
        log.info("stream connected", extra={"session_id": s.id, "last_seq": last_seq})
        self._wake_engine()
        conn.next_seq = s.outbox.first_media_seq()

    def replace_connection(self, s: Session) -> None:
        """A newer connection is taking over: tell the old one why and close it (it is not
        to reconnect), and detach it now."""
        old = s.conn
        if old is None:
            return
        log.info("stream replaced", extra={"session_id": s.id})
        msg = "a newer connection of this session took over"
        old.close_after_flush(int(P.CloseCode.REPLACED), msg)
        # Straight to the old socket, not the session's lanes (they belong to the new one).
        err = P.ErrorMessage(code=P.ErrorCode.REPLACED, message=msg, fatal=True)
        old.farewell = err.model_dump()
        self.detach(s, old)

    def detach(self, s: Session, conn: Connection) -> None:
        if s.conn is not conn:
            return
        s.conn = None
        if not s.alive:
            s.outbox.drop_control()  # the end was delivered (or cannot be any more)
            return
        s.disconnected_at = time.monotonic()
        if s.state == "streaming":
            s.state = "waiting"
        self._arm_timer(s)
        log.info("stream disconnected", extra={"session_id": s.id})

    def _arm_timer(self, s: Session) -> None:
        loop = asyncio.get_running_loop()
        if s.timer:
            s.timer.cancel()
        delay = max(0.0, s.expires_mono - time.monotonic())
        if s.state == "queued":  # waiting room: its longest wait
            assert s.queued_mono is not None
            delay = max(0.0, s.queued_mono + self.settings.queue_max_wait_s - time.monotonic())
        elif s.conn is None:  # no stream: idle after the grace period (or expired before)
            delay = min(self.settings.session_grace_s, delay)
        s.timer = loop.call_later(delay, self._on_timer, s)

    def _on_timer(self, s: Session) -> None:
        if s.state == "queued":
            self.end(s, "wait_timeout")
            return
        if not s.alive:
            return
        if time.monotonic() >= s.expires_mono:
            self.end(s, "expired")  # connected or not: session_max_s is a hard limit
        elif s.conn is None:
            self.end(s, "idle")
        else:  # woken early (a clock step): keep the lifetime limit armed
            self._arm_timer(s)

    # -- the end ------------------------------------------------------------------------------
    def end(
        self,
        s: Session,
        reason: str,
        error: tuple[str, str] | None = None,
        close_code: int | None = None,
    ) -> None:
        """End a session for good: tell its stream, drop its prompts, free its state."""
        if not s.alive and s.state != "queued":
            return
        if s.state == "queued":
            self.waiting.remove(s)
            for x in self.waiting:
                x.queue_changed.set()
        elif s.admitted_mono is not None:
            self.waiting.observe_session(time.monotonic() - s.admitted_mono)
        s.queue_changed.set()
        s.state = "failed" if error else "ended"
        s.end_reason = reason
        s.error = error[1] if error else None
        self.metrics.sessions_ended.labels(reason).inc()
        log.info(
            "session ended",
            extra={"session_id": s.id, "reason": reason, **({"error": error[1]} if error else {})},
        )
        if s.timer:
            s.timer.cancel()
            s.timer = None
        for p in s.waiting_prompts():
            self._drop(s, p, f"session {reason}")
        s.pending_cut = None
        s.queue.clear()
        s.outbox.release()
        conn = s.conn
        if conn is not None:
            if error:
                s.outbox.control.append(
                    P.ErrorMessage(code=error[0], message=error[1], fatal=True).model_dump()
                )
                code = close_code or int(P.close_code_for(error[0]))
            else:
                s.outbox.control.append(P.EndedMessage(reason=reason).model_dump())
                code = close_code or (1001 if reason in ("draining", "shutdown") else 1000)
            conn.close_after_flush(code, error[1] if error else reason)
        else:
            s.outbox.drop_control()  # nobody to tell: a tombstone keeps no messages
        if error:
            last = P.ErrorMessage(code=error[0], message=error[1], fatal=True).model_dump()
            vcode = close_code or int(P.close_code_for(error[0]))
        else:
            last = P.EndedMessage(reason=reason).model_dump()
            vcode = close_code or (1001 if reason in ("draining", "shutdown") else 1000)
        s.audience.close_all([last], vcode, error[1] if error else reason)
        s.audience.join = []
        if self.recorder is not None:
            if conn is not None and conn.sending is not None and not conn.sending.replay:
                s.recording_end = reason  # the owner may yet get that chunk whole
            else:
                self.recorder.finish(s, reason)
        self._admit_waiting()  # its slot, to the first waiting
        self.sessions.pop(s.id, None)
        self.ended[s.id] = s
        while len(self.ended) > 1000:
            self.ended.pop(next(iter(self.ended)))
        if not s.inflight:
            self.release(s)
        self._wake_engine()

    def settle_recording(self, s: Session) -> None:
        """Finish the recording that the session's end left open for the chunk then in
        flight (the sender calls this when it stops; idempotent)."""
        if s.recording_end is not None:
            reason, s.recording_end = s.recording_end, None
            if self.recorder is not None:
                self.recorder.finish(s, reason)

    def release(self, s: Session) -> None:
        """Free the session's encoder now and its device state at the next step (idempotent)."""
        if s.released:
            return
        s.released = True
        try:
            s.encoder.close()
        except Exception as exc:  # nothing left to encode: log and go on freeing
            log.warning("encoder close failed", extra={"session_id": s.id, "error": repr(exc)})
        if self.engine is not None:
            self.engine.scheduler.finish(s.id)
            self.engine.wake()

    def status(self, s: Session) -> P.SessionStatus:
        return P.SessionStatus(
            session_id=s.id,
            state=s.state,
            shot=max(0, s.outbox.shown_shot),
            chunk_seq=s.next_seq,
            frames_sent=s.outbox.frames_sent,
            queued_prompts=len(s.waiting_prompts()),
            created_at=s.created_at,
            error=s.error,
            viewers=len(s.audience.conns),
            recording=self.recorder.state_of(s.id) if self.recorder else None,
            **self._queue_fields(s),
        )

    def _queue_fields(self, s: Session) -> dict[str, Any]:
        info = self.queue_info(s) if s.state == "queued" else None
        if info is None:
            return {}
        return {"queue_position": info[0], "estimated_wait_s": info[2]}
