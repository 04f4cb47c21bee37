"""The scheduler: the one place that decides what the worker runs next.

Each turn of the engine asks `Scheduler.schedule(now)` for a `Plan`: the sessions whose
state the runner frees, and the chunk rows to run as one step (one row, or several
sessions continuing their shots as one batched forward). The runner executes the plan
through one entry point and returns an `Outcome`; `Scheduler.update` applies it and says
which chunks are ready to package and which sessions failed. See docs/design/scheduling.md.

What it weighs, all from the sessions' own state (no locks: the event loop owns them):
- playout deadlines: earliest deadline first, a session's deadline being when its player
  runs dry (`deadline`);
- lead pacing: a session runs only while less than `lead_chunks` of video is buffered
  ahead of its player (`ready_at`);
- outbox back-pressure: a session with `outbox_chunks` undelivered chunks waits;
- pause, and shots: a pending cut starts at the next chunk, a finished shot takes the next
  queued prompt or continues as a new shot of the same prompt (`on_shot_end`);
- batching: companions continue their shots (a batch never starts a shot);
- failure: a failed batch is retried one session at a time (logged), so only the session
  at fault fails.

Nothing here awaits, sleeps or reads a clock of its own: `now` is passed in, so the tests
drive it with a fake clock and a fake runner.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.runner import Outcome, StepResult
from server.sessions import Prompt, Session
from server.settings import Settings

log = logging.getLogger("shotstream.scheduler")


@dataclass
class ChunkWork:
    """One row of a plan: a session's next chunk."""

    session: Session
    seq: int
    prompt: Prompt  # the prompt of the shot this chunk belongs to
    starts_shot: bool  # begin that shot first (encode its captions, select context)
    init: tuple[str, int] | None = None  # (global caption, seed): open the generator first
    first_frame: int = 0  # where the chunk starts on the session's media timeline
    frames: int = 0
    truncate_to: int | None = None  # a cut: keep this many frames of the current shot first

    @property
    def shot_text(self) -> str | None:
        return self.prompt.text if self.starts_shot else None


@dataclass(frozen=True)
class ChunkRecord:
    """A chunk of the current shot, as planned: what a cut may withdraw."""

    seq: int
    first_frame: int
    frames: int


@dataclass
class Withdrawal:
    """A cut that takes effect at the viewer's playhead: the current shot is cut at
    `cut_frame` (on the media timeline); chunks `seqs` wholly after it are withdrawn, and
    the chunk holding it, if any, keeps only its frames before it."""

    session: Session
    cut_frame: int
    seqs: list[int]  # wholly withdrawn
    partial: ChunkRecord | None  # the chunk the cut falls inside (already sent)
    frames_withdrawn: int
    prompt: Prompt  # the cut's
    replaced: Prompt | None  # a user prompt whose whole shot was withdrawn before it showed


@dataclass
class Plan:
    """What the worker does next: free some sessions' state, then run `rows` as one step."""

    rows: list[ChunkWork] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)  # session ids whose state is freed
    retry: bool = False  # a row of a failed batch, run alone
    moved: list[tuple[Session, Prompt]] = field(default_factory=list)  # starts_at_seq changed
    paused: list[Session] = field(default_factory=list)  # a shot ended with nothing next
    orphaned: list[Session] = field(default_factory=list)  # ended while a retry waited
    withdrawals: list[Withdrawal] = field(default_factory=list)  # cuts at the playhead

    @property
    def empty(self) -> bool:
        return not self.rows and not self.finish and not self.orphaned


@dataclass
class Update:
    """What applying an outcome produced."""

    done: list[tuple[ChunkWork, StepResult]] = field(default_factory=list)
    failed: list[tuple[Session, BaseException]] = field(default_factory=list)
    orphaned: list[Session] = field(default_factory=list)  # ended while their step ran


# -- pacing -------------------------------------------------------------------------------
def undelivered(s: Session) -> int:
    """Chunks generated (or in flight) that the client has not received."""
    return s.chunks_generated + int(s.inflight) - s.outbox.chunks_delivered


def buffer_end(s: Session) -> float:
    """When the player runs dry if every generated chunk arrived now."""
    return s.clock.runs_dry(s.video_generated - s.outbox.video_sent)


def ready_at(s: Session, now: float, settings: Settings, chunk_seconds: float) -> float | None:
    """When the session may run its next chunk (<= now: runnable), None while blocked."""
    if not s.alive or s.inflight or s.state == "paused":
        return None
    if cuts_at_playhead(s) and s.pending_cut is not None:
        return now  # an instant cut replaces the buffered video: it runs first, at once
    if undelivered(s) >= settings.outbox_chunks:
        return None  # slow or absent reader: wait for the outbox to drain
    if not s.clock.running or s.conn is None:
        # Nobody is watching (yet, or now): prepare up to the lead, then wait for a player.
        return now if undelivered(s) < max(1, round(settings.lead_chunks)) else None
    ahead = buffer_end(s) - now
    lead = settings.lead_chunks * chunk_seconds
    return now if ahead < lead else now + (ahead - lead)


def deadline(s: Session) -> float:
    """When the player needs the session's next chunk (earliest deadline first)."""
    if cuts_at_playhead(s) and s.pending_cut is not None:
        return -math.inf  # the viewer waits for this one
    if not s.clock.running:
        return s.created_mono if s.conn is None else s.conn.connected_at
    return buffer_end(s)


def cuts_at_playhead(s: Session) -> bool:
    """Whether the session's viewer takes instant cuts (its connection asked for the
    `withdraw` feature); others keep cuts behind the buffered video."""
    return s.conn is not None and s.conn.withdraw


def playhead(s: Session, now: float) -> float | None:
    """Where the viewer's player is now (media seconds), from its last report: it plays on
    in real time unless paused, and never past what it was sent."""
    if s.playhead is None or s.conn is None:
        return None
    pts, at = s.playhead
    if s.state != "paused":
        pts += now - at
    return min(pts, s.conn.sent_end_pts)


# -- shots --------------------------------------------------------------------------------
def assign_starts(s: Session, chunks_per_shot: int, acked: Prompt | None = None) -> list[Prompt]:
    """Give every waiting prompt its `starts_at_seq`: a pending cut at the next chunk, the
    queue after the current shot and each other. Returns the prompts whose seq moved since
    the client was told (except `acked`, being told now)."""
    at = (
        s.next_seq if s.current is None else s.next_seq + max(0, chunks_per_shot - s.chunks_in_shot)
    )
    order: list[Prompt] = []
    if s.pending_cut is not None:
        s.pending_cut.starts_at_seq = s.next_seq
        at = s.next_seq + chunks_per_shot
        order = [s.pending_cut]
    for p in s.queue:
        p.starts_at_seq, at = at, at + chunks_per_shot
    moved = []
    for p in [*order, *s.queue]:
        if p is not acked and p.acked_seq not in (-1, p.starts_at_seq):
            moved.append(p)
        p.acked_seq = p.starts_at_seq
    return moved


def continues_shot(s: Session, chunks_per_shot: int) -> bool:
    """Whether the session's next chunk stays in its current shot (so it can batch)."""
    return (
        s.opened
        and s.current is not None
        and s.pending_cut is None
        and s.chunks_in_shot < chunks_per_shot
    )


class Scheduler:
    """Plans each step from the sessions' state; applies each step's outcome."""

    def __init__(
        self,
        settings: Settings,
        cfg,  # model.config.ModelConfig
        sessions: Callable[[], Iterable[Session]],
    ) -> None:
        self.settings, self.cfg = settings, cfg
        self.sessions = sessions  # the live sessions, in creation order
        self._finish: list[str] = []
        self._retry: deque[ChunkWork] = deque()
        # Seconds from planning an instant cut to its first chunk reaching the viewer
        # (moving average; the engine seeds it from the warm-up, delivery updates it).
        self.cut_delay = 0.0

    @property
    def chunk_seconds(self) -> float:
        return self.cfg.chunk_seconds

    # -- inputs from the rest of the server -----------------------------------------------
    def finish(self, sid: str) -> None:
        """Free this session's state at the next step (it ended)."""
        if sid not in self._finish:
            self._finish.append(sid)

    def cut_margin(self) -> float:
        """How far past the viewer's playhead a cut lands: the time its first chunk takes
        to reach the viewer, with room, so the player never waits for it."""
        if self.settings.cut_margin_s > 0:
            return self.settings.cut_margin_s
        return max(0.1, 1.25 * self.cut_delay + 0.05)

    def observe_cut_delay(self, seconds: float) -> None:
        a = 0.3 if self.cut_delay else 1.0
        self.cut_delay = (1 - a) * self.cut_delay + a * seconds

    def replan(self, s: Session, acked: Prompt | None = None) -> list[Prompt]:
        """The session's waiting prompts changed: their starts; see `assign_starts`."""
        return assign_starts(s, self.cfg.chunks_per_shot, acked)

    # -- the plan -----------------------------------------------------------------------------
    def schedule(self, now: float) -> tuple[Plan, float | None]:
        """The next plan, and when to look again if it is empty (None: when woken)."""
        plan = Plan(finish=self._finish)
        self._finish = []
        while self._retry:
            work = self._retry.popleft()
            if work.session.alive:
                plan.rows, plan.retry = [work], True
                return plan, None
            work.session.inflight = False
            plan.orphaned.append(work.session)  # ended while waiting for its retry
        while True:
            first, soonest = self._earliest(now)
            if first is None:
                return plan, soonest
            work = self._next_chunk(first, plan, now)
            if work is not None:
                break  # else it paused at a shot's end: look again
        plan.rows = [work]
        if not work.starts_shot and first.opened:
            plan.rows += self._companions(first, now, plan)
        return plan, None

    def _earliest(self, now: float) -> tuple[Session | None, float | None]:
        """The runnable session with the earliest deadline, or when one becomes runnable."""
        best, best_deadline, soonest = None, math.inf, None
        for s in self.sessions():
            at = ready_at(s, now, self.settings, self.chunk_seconds)
            if at is None:
                continue
            if at > now:
                soonest = at if soonest is None else min(soonest, at)
                continue
            d = deadline(s)
            if d < best_deadline:
                best, best_deadline = s, d
        return best, soonest

    def _companions(self, first: Session, now: float, plan: Plan) -> list[ChunkWork]:
        """Other runnable sessions continuing their shots, earliest deadline first."""
        per_shot = self.cfg.chunks_per_shot
        others = [
            x
            for x in self.sessions()
            if x is not first
            and continues_shot(x, per_shot)
            and (at := ready_at(x, now, self.settings, self.chunk_seconds)) is not None
            and at <= now
        ]
        others.sort(key=deadline)
        rows = []
        for x in others[: max(0, self.settings.max_batch - 1)]:
            work = self._next_chunk(x, plan, now)
            if work is not None:
                rows.append(work)
        return rows

    def _next_chunk(self, s: Session, plan: Plan, now: float) -> ChunkWork | None:
        """Plan the session's next chunk: its seq, its shot's prompt and whether it starts
        that shot; None if its shot ended with nothing to follow (the session pauses)."""
        per_shot = self.cfg.chunks_per_shot
        start: Prompt | None = None
        truncate_to: int | None = None
        if s.pending_cut is not None:
            start, s.pending_cut = s.pending_cut, None
            if cuts_at_playhead(s):
                w = self._withdraw(s, start, now)
                if w is not None:
                    plan.withdrawals.append(w)
                    truncate_to = w.cut_frame - s.shot_chunks[0].first_frame
        elif s.current is None or s.chunks_in_shot >= per_shot:
            if s.queue:
                start = s.queue.popleft()
            elif s.current is not None and self.settings.on_shot_end == "continue":
                start = Prompt(
                    s.next_shot_id,
                    s.current.text,
                    "queue",
                    time.monotonic(),
                    s.current.report,
                    auto=True,
                )
                s.next_shot_id += 1
            else:
                s.state = "paused"
                s.clock.pause(time.monotonic())
                plan.paused.append(s)
                return None
        seq = s.next_seq
        s.next_seq += 1
        if start is not None:
            start.starts_at_seq = seq
            if truncate_to == 0:  # the withdrawn shot is replaced: the cut takes its index
                s.shot_index -= 1
            s.current, s.shot_index, s.chunks_in_shot = start, s.shot_index + 1, 0
            s.shot_chunks = []
        frames = self.cfg.chunk_pixel_frames(s.chunks_in_shot)
        s.chunks_in_shot += 1
        s.video_generated += frames / self.cfg.fps
        s.inflight = True
        record = ChunkRecord(seq, s.next_frame, frames)
        s.shot_chunks.append(record)
        s.next_frame += frames
        plan.moved += [(s, p) for p in assign_starts(s, per_shot)]
        assert s.current is not None
        init = None if s.opened else (s.global_prompt, s.seed)
        return ChunkWork(
            s, seq, s.current, start is not None, init, record.first_frame, frames, truncate_to
        )

    def _withdraw(self, s: Session, cut: Prompt, now: float) -> Withdrawal | None:
        """Where a cut lands for a viewer that takes instant cuts: the current shot's video
        past the viewer's playhead plus `cut_margin` is withdrawn (to a frame; inside a chunk
        already sent, whose first frames stay), or, with no playhead report yet, only what
        was not sent. None when nothing of the current shot lies past that point."""
        if not s.shot_chunks or s.current is None:
            return None
        fps = self.cfg.fps
        assert s.conn is not None
        sent = {x.seq for x in s.outbox.sent if x.data is not None}
        at = playhead(s, now)
        cut_pts = s.conn.sent_end_pts if at is None else at + self.cut_margin()
        shot_start = s.shot_chunks[0].first_frame
        cut_frame = max(shot_start, math.ceil(round(cut_pts * fps, 6)))
        partial = None
        for r in s.shot_chunks:
            if r.first_frame < cut_frame < r.first_frame + r.frames:
                if r.seq in sent:
                    partial = r
                else:  # not sent: it cannot be cut into; it stays whole
                    cut_frame = r.first_frame + r.frames
                break
        if cut_frame >= s.next_frame:
            return None
        gone = [r for r in s.shot_chunks if r.first_frame >= cut_frame]
        tail = 0 if partial is None else partial.first_frame + partial.frames - cut_frame
        withdrawn = sum(r.frames for r in gone) + tail
        # The planning side forgets the withdrawn video now; delivery settles its side.
        s.next_frame = cut_frame
        s.chunks_generated -= len(gone)
        s.video_generated -= withdrawn / fps
        s.withdrawn.update(r.seq for r in gone)
        whole_shot = cut_frame == shot_start
        replaced = s.current if whole_shot and not s.current.auto and s.current is not cut else None
        return Withdrawal(s, cut_frame, [r.seq for r in gone], partial, withdrawn, cut, replaced)

    # -- the outcome ----------------------------------------------------------------------------
    def update(self, plan: Plan, outcome: Outcome) -> Update:
        """Apply the runner's outcome of `plan`."""
        up = Update()
        if outcome.error is not None:
            if len(plan.rows) > 1:
                # Whose fault? Unknown in a batch: run each alone, so only that one fails.
                log.warning(
                    "batched step failed; retrying each session alone",
                    extra={"sessions": len(plan.rows), "error": repr(outcome.error)},
                )
                self._retry.extend(plan.rows)  # still in flight until retried
                return up
            for work in plan.rows:
                work.session.inflight = False
                up.failed.append((work.session, outcome.error))
            return up
        results = outcome.results or []
        for work, result in zip(plan.rows, results, strict=True):
            s = work.session
            s.inflight = False
            s.opened = True
            if not s.alive:  # ended while its step ran: now its state can go
                up.orphaned.append(s)
                continue
            s.chunks_generated += 1
            up.done.append((work, result))
        return up
