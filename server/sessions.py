"""Sessions: lifecycle, tokens, prompts, pacing and the outbox of each stream.

Everything here runs on the event loop thread, so a session's state needs no locks; the
engine (also on the loop) decides what runs and the runner's worker thread computes it.

A session's life: created (state `waiting`) -> a stream connects (`streaming`) ->
`paused`/`streaming` -> `ended` or `failed`. Every end goes through `SessionManager.end`,
which releases the session's device state (at once, or when its in-flight step returns)
and its encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from server import protocol as P
from server.media import H264Encoder
from server.metrics import Metrics
from server.runner import ModelRunner, StepResult, TokenReport
from server.settings import Settings

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


@dataclass
class MediaItem:
    """A message of the ordered lane (`shot`, `chunk`), with its binary segment if any."""

    message: dict[str, Any]
    data: bytes | None = None
    seq: int = -1
    frames: int = 0
    duration: float = 0.0
    ready: float = 0.0  # monotonic time it entered the outbox
    prompt: Prompt | None = None  # the prompt this chunk first shows
    replay: bool = False  # sent before, on a connection that dropped; sent again on resume


@dataclass
class Connection:
    """One stream connection of a session."""

    send_text: Callable[[str], Any]
    send_bytes: Callable[[bytes], Any]
    close: Callable[[int, str], Any]
    connected_at: float
    first_sent: bool = False
    last_sent: float | None = None
    closing: bool = False
    errors: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


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
    """One viewer's stream: its prompts, its position in the video, and its outbox."""

    def __init__(self, sid: str, token: str, client: str, prompt: str, seed: int, mode: str,
                 settings: Settings, encoder: H264Encoder, cfg) -> None:  # fmt: skip
        self.id, self.token, self.client = sid, token, client
        self.global_prompt, self.seed, self.mode = prompt, seed, mode
        self.settings = settings
        self.encoder = encoder
        self.cfg = cfg
        now = time.monotonic()
        self.created_mono = now
        self.created_at = datetime.now(UTC)
        self.expires_mono = now + settings.session_max_s
        self.state = "waiting"
        self.error: str | None = None
        self.end_reason: str | None = None
        # shots and prompts (planned side)
        self.next_shot_id = 0
        self.current: Prompt | None = None  # the shot being generated
        self.shot_index = -1
        self.chunks_in_shot = 0  # chunks planned in the current shot
        self.pending_cut: Prompt | None = None
        self.queue: deque[Prompt] = deque()
        self.next_seq = 0  # seq of the next chunk to plan
        self.opened = False  # the runner holds its state
        self.inflight = False
        self.video_generated = 0.0  # seconds of video planned: generated or in flight
        self.video_sent = 0.0  # seconds of video delivered, over all connections
        # delivery side
        self.media: deque[MediaItem] = deque()
        # The last items sent, so a resumed connection can be given what the dropped one
        # may not have received (the client names its last seq).
        self.sent: deque[MediaItem] = deque(maxlen=2 * max(2, settings.outbox_chunks))
        self.last_delivered_seq = -1
        self.control: deque[dict[str, Any]] = deque()
        self.encode_lock = asyncio.Lock()
        self.conn: Connection | None = None
        self.disconnected_at: float | None = now
        self.chunks_generated = 0
        self.chunks_delivered = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.shown_shot = -1
        self.play_start: float | None = None  # when this connection's player started
        self.video_delivered = 0.0  # seconds delivered on this connection
        self.paused_at: float | None = None
        self.prompt_bucket = TokenBucket(settings.prompt_rate, 8)
        self.timer: asyncio.TimerHandle | None = None

    # -- pacing (read by the engine) -------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.state in ("waiting", "streaming", "paused")

    @property
    def chunk_seconds(self) -> float:
        return self.cfg.chunk_frames * self.cfg.vae.temporal_stride / self.cfg.fps

    def undelivered(self) -> int:
        return self.chunks_generated + int(self.inflight) - self.chunks_delivered

    def buffer_end(self) -> float:
        """When this connection's player runs dry if all generated video arrived now."""
        assert self.play_start is not None
        return self.play_start + self.video_delivered + (self.video_generated - self.video_sent)

    def ready_at(self, now: float) -> float | None:
        """When this session may run its next chunk (<= now: runnable), None if blocked."""
        if not self.alive or self.inflight or self.state == "paused":
            return None
        if self.undelivered() >= self.settings.outbox_chunks:
            return None  # slow or absent reader: wait for the outbox to drain
        if self.play_start is None:
            # Nobody is watching yet: prepare up to the lead, then wait for a player.
            return now if self.undelivered() < max(1, round(self.settings.lead_chunks)) else None
        ahead = self.buffer_end() - now
        lead = self.settings.lead_chunks * self.chunk_seconds
        return now if ahead < lead else now + (ahead - lead)

    def deadline(self) -> float:
        """When the player needs the next chunk: earliest deadline first."""
        if self.play_start is None:
            return self.created_mono if self.conn is None else self.conn.connected_at
        return self.buffer_end()


class SessionManager:
    """Creates, finds, feeds and ends sessions; owns admission and the per-session outboxes."""

    def __init__(self, settings: Settings, runner: ModelRunner, metrics: Metrics) -> None:
        self.settings, self.runner, self.metrics = settings, runner, metrics
        self.cfg = runner.cfg
        self.sessions: dict[str, Session] = {}
        self.ended: dict[str, Session] = {}  # tombstones for GET after the end
        self.engine = None  # set by the engine
        self.ready = False
        self.draining = False
        self.encode_pool = None  # executor for H.264 encoding, set by the app
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

    @property
    def active(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.alive]

    # -- admission ---------------------------------------------------------------------
    def capacity(self) -> int:
        return self.engine.capacity() if self.engine else 0

    def admit(self, client: str) -> None:
        """Raise Refused unless one more session can be kept real time, for this client too."""
        if self.draining or not self.ready:
            reason = "draining" if self.draining else "not_ready"
            self.metrics.sessions_refused.labels(reason).inc()
            raise Refused(503, P.ErrorCode.DRAINING if self.draining else P.ErrorCode.OVER_CAPACITY,
                          f"server is {'draining' if self.draining else 'warming up'}; try another replica or later",
                          retry_after=5)  # fmt: skip
        mine = sum(1 for s in self.active if s.client == client)
        if mine >= self.settings.max_sessions_per_client:
            self.metrics.sessions_refused.labels("quota").inc()
            raise Refused(
                429, P.ErrorCode.RATE_LIMITED,
                f"{mine} sessions open for this client; the limit is {self.settings.max_sessions_per_client}",
                retry_after=self.retry_after(),
            )  # fmt: skip
        cap = self.capacity()
        if len(self.active) >= cap:
            self.metrics.sessions_refused.labels("capacity").inc()
            raise Refused(
                503, P.ErrorCode.OVER_CAPACITY,
                f"all {cap} real-time session slots are in use",
                retry_after=self.retry_after(),
            )  # fmt: skip

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
    def create(self, client: str, req: P.CreateSessionRequest) -> tuple[Session, int]:
        """A new session (after `admit`); returns it and the tokens cut from its captions."""
        P.validate_create(req, self.limits)
        shots = list(req.shots) or [""]
        reports = [self._check_caption(req.prompt, i, text) for i, text in enumerate(shots)]
        sid = f"{self.settings.replica_id}.{secrets.token_hex(12)}"
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        encoder = H264Encoder(self.cfg.width, self.cfg.height, self.cfg.fps)
        s = Session(sid, secrets.token_urlsafe(32), client, req.prompt, seed, req.mode,
                    self.settings, encoder, self.cfg)  # fmt: skip
        now = time.monotonic()
        for text, report in zip(shots, reports, strict=True):
            p = Prompt(s.next_shot_id, text, "queue", now, report)
            s.next_shot_id += 1
            s.queue.append(p)
        self._plan_queue(s)
        self.sessions[sid] = s
        self._arm_timer(s)
        self.metrics.sessions_created.inc()
        self.metrics.prompts_received.inc(len(shots))  # so received >= applied + dropped
        log.info("session created", extra={"session_id": sid, "client": client, "seed": seed,
                                           "shots": len(shots)})  # fmt: skip
        self._wake_engine()
        return s, sum(r.truncated_tokens for r in reports)

    def _check_caption(self, global_prompt: str, shot_index: int, text: str) -> TokenReport:
        try:
            return self.runner.check_caption(global_prompt, shot_index, text)
        except ValueError as exc:  # PromptTooLong under prompt_overflow=reject
            raise P.LimitError(P.ErrorCode.PROMPT_TOO_MANY_TOKENS, str(exc)) from exc

    def expires_at(self, s: Session) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.settings.session_grace_s)

    # -- prompts -------------------------------------------------------------------------
    def add_prompt(self, s: Session, text: str, mode: str | None) -> Prompt:
        """Accept a shot prompt now; it starts at the next chunk (`cut`) or after the
        current and queued shots (`queue`). Raises LimitError / Refused."""
        if not s.alive:
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}")
        P.validate_prompt(P.PromptRequest(prompt=text), self.limits)
        if not s.prompt_bucket.take():
            raise Refused(429, P.ErrorCode.RATE_LIMITED,
                          f"more than {self.settings.prompt_rate:g} prompts per second", retry_after=1)  # fmt: skip
        mode = mode or s.mode
        if mode == "queue" and len(s.queue) >= self.settings.max_queued_prompts:
            raise Refused(429, P.ErrorCode.RATE_LIMITED,
                          f"{len(s.queue)} prompts queued; the limit is {self.settings.max_queued_prompts}",
                          retry_after=s.chunk_seconds)  # fmt: skip
        expected_shot = s.shot_index + 1 + (len(s.queue) if mode == "queue" else 0)
        report = self._check_caption(s.global_prompt, max(expected_shot, 0), text)
        p = Prompt(s.next_shot_id, text, mode, time.monotonic(), report)
        s.next_shot_id += 1
        self.metrics.prompts_received.inc()
        if mode == "cut":
            if s.pending_cut is not None:
                self._drop(s, s.pending_cut, "superseded by a later cut")
            s.pending_cut = p
        else:
            s.queue.append(p)
        self._plan_queue(s, acked=p)
        log.info("prompt accepted", extra={"session_id": s.id, "shot_id": p.shot_id, "mode": mode,
                                           "starts_at_seq": p.starts_at_seq,
                                           **({"prompt": text} if self.settings.log_prompts else {})})  # fmt: skip
        self._wake_engine()
        return p

    def _plan_queue(self, s: Session, acked: Prompt | None = None) -> None:
        """Give every waiting prompt its starts_at_seq; tell the client of any that moved."""
        per_shot = self.cfg.chunks_per_shot
        at = s.next_seq if s.current is None else s.next_seq + max(0, per_shot - s.chunks_in_shot)
        order: list[Prompt] = []
        if s.pending_cut is not None:
            s.pending_cut.starts_at_seq = s.next_seq
            at = s.next_seq + per_shot
            order = [s.pending_cut]
        for p in s.queue:
            p.starts_at_seq, at = at, at + per_shot
        for p in [*order, *s.queue]:
            if p is not acked and p.acked_seq not in (-1, p.starts_at_seq):
                self.send_control(s, P.PromptAckMessage(shot_id=p.shot_id, starts_at_seq=p.starts_at_seq,
                                                        truncated_tokens=p.report.truncated_tokens))  # fmt: skip
            p.acked_seq = p.starts_at_seq

    def _drop(self, s: Session, p: Prompt, reason: str) -> None:
        self.metrics.prompts_dropped.labels(reason.split(" ")[0]).inc()
        self.send_control(s, P.PromptDroppedMessage(shot_id=p.shot_id, reason=reason))

    # -- planning (engine, loop thread) ---------------------------------------------------
    def plan_next(self, s: Session) -> tuple[int, Prompt, bool] | None:
        """Decide the session's next chunk: its seq, the prompt of its shot, and whether
        it starts that shot."""
        start: Prompt | None = None
        if s.pending_cut is not None:
            start, s.pending_cut = s.pending_cut, None
        elif s.current is None or s.chunks_in_shot >= self.cfg.chunks_per_shot:
            if s.queue:
                start = s.queue.popleft()
            elif s.current is not None and self.settings.on_shot_end == "continue":
                start = Prompt(s.next_shot_id, s.current.text, "queue", time.monotonic(),
                               s.current.report, auto=True)  # fmt: skip
                s.next_shot_id += 1
            else:
                self.pause(s, reason="shot ended")
                return None
        seq = s.next_seq
        s.next_seq += 1
        if start is not None:
            start.starts_at_seq = seq
            s.current, s.shot_index, s.chunks_in_shot = start, s.shot_index + 1, 0
        s.chunks_in_shot += 1
        frames = self.cfg.chunk_pixel_frames(s.chunks_in_shot - 1)
        s.video_generated += frames / self.cfg.fps
        s.inflight = True
        self._plan_queue(s)
        return seq, s.current, start is not None

    def continues_shot(self, s: Session) -> bool:
        """Whether the session's next chunk stays in its current shot (so it can batch)."""
        return (
            s.opened and s.current is not None and s.pending_cut is None
            and s.chunks_in_shot < self.cfg.chunks_per_shot
        )  # fmt: skip

    def on_step_failed(self, s: Session, exc: BaseException) -> None:
        s.inflight = False
        from server.runner import OutOfMemory

        oom = isinstance(exc, OutOfMemory)
        code = P.ErrorCode.OUT_OF_MEMORY if oom else P.ErrorCode.SESSION_FAILED
        self.metrics.errors.labels("oom" if oom else "step").inc()
        log.error("session step failed", extra={"session_id": s.id, "error": repr(exc)})
        msg = ("out of device memory; the session was ended and its memory freed" if oom
               else f"generation failed: {type(exc).__name__}: {exc}")  # fmt: skip
        self.end(s, "failed", error=(code, msg))

    def on_step_done(
        self, s: Session, seq: int, shot: Prompt, starts: bool, result: StepResult
    ) -> None:
        """A chunk came back from the worker: count it and package it (in order)."""
        s.inflight = False
        s.opened = True
        m = self.metrics
        m.chunks.inc()
        m.frames.inc(result.frames.shape[0])
        for verb, ms in (*result.timings.items(), *result.shot_timings.items()):
            m.verb_duration.labels(verb.removesuffix("_ms")).observe(ms / 1e3)
        if self.engine:
            self.engine.record(result)
        if not s.alive:  # ended while its step ran: now its state can go
            self._release(s)
            return
        s.chunks_generated += 1
        asyncio.get_running_loop().create_task(self._package(s, seq, shot, starts, result))

    async def _package(
        self, s: Session, seq: int, shot: Prompt, starts: bool, result: StepResult
    ) -> None:
        async with s.encode_lock:  # one encoder per session: chunks strictly in order
            if not s.alive:
                return
            t0 = time.perf_counter()
            try:
                seg = await asyncio.get_running_loop().run_in_executor(
                    self.encode_pool, s.encoder.encode_chunk, result.frames
                )
            except Exception as exc:  # a broken encoder: the stream cannot continue
                self.metrics.errors.labels("encode").inc()
                self.end(
                    s, "failed", error=(P.ErrorCode.SESSION_FAILED, f"video encoding failed: {exc}")
                )
                return
            encode_s = time.perf_counter() - t0
            self.metrics.verb_duration.labels("package").observe(encode_s)
            if not s.alive:
                return
            now = time.monotonic()
            if starts:
                report = result.new_shot or shot.report
                shot_msg = P.ShotMessage(shot_id=shot.shot_id, shot=result.shot, prompt=shot.text,
                                         starts_at_seq=seq, truncated_tokens=report.truncated_tokens)  # fmt: skip
                s.media.append(MediaItem(shot_msg.model_dump(mode="json"), seq=seq, ready=now))
            t = result.timings
            msg = P.ChunkMessage(
                seq=seq, shot=result.shot, shot_id=shot.shot_id,
                first_frame=seg.first_frame, frames=seg.frames, pts=seg.pts, duration=seg.duration,
                bytes=len(seg.data),
                timings=P.ChunkTimings(
                    denoise_ms=t.get("denoise_ms", 0.0), refresh_ms=t.get("refresh_ms", 0.0),
                    decode_ms=t.get("decode_ms", 0.0), encode_ms=encode_s * 1e3,
                ),
            )  # fmt: skip
            s.media.append(MediaItem(msg.model_dump(mode="json"), seg.data, seq, seg.frames,
                                     seg.duration, now, shot if starts and not shot.auto else None))  # fmt: skip
            self._wake_sender(s)

    # -- delivery ------------------------------------------------------------------------
    def send_control(self, s: Session, msg: P.BaseModel | dict[str, Any]) -> None:
        """Queue a message that overtakes media (acks, errors, pongs)."""
        if isinstance(msg, P.BaseModel):
            msg = msg.model_dump(mode="json")
        if len(s.control) < 256:  # a flood of pings cannot grow it without bound
            s.control.append(msg)
        self._wake_sender(s)

    def _wake_sender(self, s: Session) -> None:
        if s.conn is not None:
            s.conn.wake.set()

    def delivered(self, s: Session, item: MediaItem, send_s: float) -> None:
        """Account for an item fully sent: counters, playout clock, deadline, latencies."""
        now = time.monotonic()
        m, conn = self.metrics, s.conn
        s.sent.append(item)
        counted = self._settle(s, item)
        if item.data is None:  # a `shot` message
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
        if s.play_start is None:  # this connection's player starts with this chunk
            s.play_start, s.video_delivered = now, 0.0
        else:
            due = s.play_start + s.video_delivered
            if now > due + 0.05:  # the player ran dry and stalled until now
                m.deadline_misses.inc()
                s.play_start += now - due
        s.video_delivered += item.duration
        if counted and item.prompt is not None:
            m.prompt_to_visible.observe(now - item.prompt.received)
        self._wake_engine()

    def _settle(self, s: Session, item: MediaItem) -> bool:
        """Count an item as the client's: a chunk leaves the outbox bound and joins the
        session's totals, and the prompt whose shot it begins counts as applied (True),
        unless it is a replay, counted when it was first sent."""
        if item.data is None:  # a `shot` message
            s.shown_shot = item.message["shot"]
            return False
        if item.replay:
            return False
        s.chunks_delivered += 1
        s.frames_sent += item.frames
        s.bytes_sent += len(item.data)
        s.video_sent += item.duration
        s.last_delivered_seq = item.seq
        if item.prompt is not None:
            self.metrics.prompts_applied.inc()
        return True

    # -- control ----------------------------------------------------------------------------
    def pause(self, s: Session, reason: str = "client") -> None:
        if not s.alive:
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}")
        if s.state == "streaming" or s.state == "waiting":
            s.state = "paused"
            s.paused_at = time.monotonic()

    def resume(self, s: Session) -> None:
        if s.state != "paused":
            raise Refused(409, P.ErrorCode.INVALID_STATE, f"session is {s.state}, not paused")
        now = time.monotonic()
        if s.play_start is not None and s.paused_at is not None:
            s.play_start += now - s.paused_at
        s.paused_at = None
        s.state = "streaming" if s.conn is not None else "waiting"
        self._wake_engine()

    def _wake_engine(self) -> None:
        if self.engine:
            self.engine.wake()

    # -- connections ------------------------------------------------------------------------
    def attach(self, s: Session, conn: Connection, last_seq: int | None = None) -> int:
        """Make `conn` the session's stream; returns the seq of the first chunk it carries.

        A resuming client names the last chunk it received (`last_seq`): chunks after it
        that the dropped connection sent are sent again if still kept.
        """
        s.conn = conn
        s.disconnected_at = None
        self._arm_timer(s)  # connected: only the session's lifetime limit stays armed
        if s.state == "waiting":
            s.state = "streaming"
        # A fresh player: its clock starts at the first chunk sent on this connection.
        s.play_start = None
        s.control.clear()  # replies meant for the dead connection
        if last_seq is not None:
            # The client holds every seq up to last_seq. The dropped connection may have got
            # an item out whole before its sender could take it off the outbox: it is the
            # client's, not sent again.
            while s.media and s.media[0].seq <= last_seq:
                # a prompt it shows counts as applied; when it became visible is not known
                self._settle(s, s.media.popleft())
            again = [replace(x, replay=True) for x in s.sent if x.seq > last_seq]
            s.media.extendleft(reversed(again))
        s.sent.clear()
        # Waiting prompts are acknowledged again: the dropped connection may have lost them.
        for p in [*([s.pending_cut] if s.pending_cut else []), *s.queue]:
            self.send_control(s, P.PromptAckMessage(shot_id=p.shot_id, starts_at_seq=p.starts_at_seq,
                                                    truncated_tokens=p.report.truncated_tokens))  # fmt: skip
        log.info("stream connected", extra={"session_id": s.id, "last_seq": last_seq})
        self._wake_engine()
        first = next((x.seq for x in s.media if x.data is not None), None)
        return first if first is not None else s.last_delivered_seq + 1

    def detach(self, s: Session, conn: Connection) -> None:
        if s.conn is not conn:
            return
        s.conn = None
        if not s.alive:
            return
        s.disconnected_at = time.monotonic()
        if s.state == "streaming":
            s.state = "waiting"
        s.play_start = None
        self._arm_timer(s)
        log.info("stream disconnected", extra={"session_id": s.id})

    def _arm_timer(self, s: Session) -> None:
        loop = asyncio.get_running_loop()
        if s.timer:
            s.timer.cancel()
        delay = max(0.0, s.expires_mono - time.monotonic())
        if s.conn is None:  # no stream: idle after the grace period (or expired before)
            delay = min(self.settings.session_grace_s, delay)
        s.timer = loop.call_later(delay, self._on_timer, s)

    def _on_timer(self, s: Session) -> None:
        if not s.alive:
            return
        if time.monotonic() >= s.expires_mono:
            self.end(s, "expired")  # connected or not: session_max_s is a hard limit
        elif s.conn is None:
            self.end(s, "idle")
        else:  # woken early (a clock step): keep the lifetime limit armed
            self._arm_timer(s)

    # -- the end ------------------------------------------------------------------------------
    def end(self, s: Session, reason: str, error: tuple[str, str] | None = None,
            close_code: int | None = None) -> None:  # fmt: skip
        """End a session for good: tell its stream, drop its prompts, free its state."""
        if not s.alive:
            return
        s.state = "failed" if error else "ended"
        s.end_reason = reason
        s.error = error[1] if error else None
        self.metrics.sessions_ended.labels(reason).inc()
        log.info("session ended", extra={"session_id": s.id, "reason": reason,
                                         **({"error": error[1]} if error else {})})  # fmt: skip
        if s.timer:
            s.timer.cancel()
            s.timer = None
        for p in [*([s.pending_cut] if s.pending_cut else []), *s.queue]:
            self._drop(s, p, f"session {reason}")
        s.pending_cut = None
        s.queue.clear()
        s.media.clear()
        conn = s.conn
        if conn is not None:
            if error:
                s.control.append(
                    P.ErrorMessage(code=error[0], message=error[1], fatal=True).model_dump()
                )
                code = close_code or int(P.close_code_for(error[0]))
            else:
                s.control.append(P.EndedMessage(reason=reason).model_dump())
                code = close_code or (1001 if reason in ("draining", "shutdown") else 1000)
            conn.closing = True
            conn.close_code, conn.close_reason = code, (error[1] if error else reason)[:120]  # type: ignore[attr-defined]
            conn.wake.set()
        self.sessions.pop(s.id, None)
        self.ended[s.id] = s
        while len(self.ended) > 1000:
            self.ended.pop(next(iter(self.ended)))
        if not s.inflight:
            self._release(s)
        self._wake_engine()

    def _release(self, s: Session) -> None:
        """Free the session's device state and encoder (idempotent)."""
        if getattr(s, "_released", False):
            return
        s._released = True  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            s.encoder.close()
        asyncio.get_running_loop().create_task(self.runner.close(s.id))

    def status(self, s: Session) -> P.SessionStatus:
        return P.SessionStatus(
            session_id=s.id, state=s.state, shot=max(0, s.shown_shot), chunk_seq=s.next_seq,
            frames_sent=s.frames_sent, queued_prompts=len(s.queue) + int(s.pending_cut is not None),
            created_at=s.created_at, error=s.error,
        )  # fmt: skip
