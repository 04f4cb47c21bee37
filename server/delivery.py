"""Delivery: a session's outbox, its playout clock, and the packaging of chunks into it.

Everything here runs on the event loop thread. The engine hands each generated chunk to
`Packager`, which encodes it off the loop (H.264 + one fMP4 segment) and appends it to the
session's `Outbox`; the stream's sender (server/api/stream.py) sends the outbox in order
and reports each item with `Outbox.settle` / `Session`'s manager. Nothing here touches a
tensor: frames arrive as uint8 numpy arrays.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from server import protocol as P
from server.media import H264Encoder
from server.metrics import Metrics
from server.runner import StepResult

if TYPE_CHECKING:  # type hints only: sessions import this module
    from server.scheduler import ChunkWork
    from server.sessions import Prompt, Session

CONTROL_LIMIT = 256  # queued control messages per session: a ping flood cannot grow it


@dataclass
class MediaItem:
    """A message of the ordered lane (`shot`, `chunk`), with its binary segment if any."""

    message: dict[str, Any]
    data: bytes | None = None
    seq: int = -1
    frames: int = 0
    duration: float = 0.0
    ready: float = 0.0  # monotonic time it entered the outbox
    prompt: Prompt | None = None  # the user prompt whose shot this chunk begins
    replay: bool = False  # sent before, on a connection that dropped; sent again on resume


@dataclass
class Connection:
    """One stream connection of a session: how to send on it and how it is doing."""

    send_text: Callable[[str], Any]
    send_bytes: Callable[[bytes], Any]
    close: Callable[[int, str], Any]
    connected_at: float
    next_seq: int = 0  # the first chunk this connection carries (hello.next_seq)
    first_sent: bool = False
    last_sent: float | None = None
    closing: bool = False  # the sender closes it after the control lane is flushed
    close_code: int = 1000
    close_reason: str = ""
    errors: int = 0  # bad messages received on it (the abuse limit)
    dropped: int = 0  # messages dropped for the rate limit (the flood limit)
    farewell: dict[str, Any] | None = None  # the last message before closing, if replaced
    withdraw: bool = False  # feature `withdraw`: instant cuts (playhead in, withdraw out)
    viewer_counts: bool = False  # feature `viewers`: told how many viewers watch
    sent_end_pts: float = 0.0  # end of the media sent on it (seconds): the playhead's bound
    sending: MediaItem | None = None  # the media item its sender is sending now
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def close_after_flush(self, code: int, reason: str) -> None:
        """Ask the sender to send what is queued on the control lane, then close."""
        self.closing, self.close_code, self.close_reason = True, code, P.close_reason(reason)
        self.wake.set()


class PlayoutClock:
    """Where the viewer's player is, as the server reckons it: it starts when the first
    chunk of a connection is delivered and advances in real time, stalls when a chunk
    arrives after the video before it ran out, and stands still while paused."""

    def __init__(self) -> None:
        self.start: float | None = None  # None: no player running
        self.delivered = 0.0  # seconds of video delivered to this player
        self.paused_at: float | None = None

    @property
    def running(self) -> bool:
        return self.start is not None

    def reset(self) -> None:
        """A new player (a new connection): the clock starts again at its first chunk."""
        self.start, self.delivered = None, 0.0

    def withdraw(self, seconds: float) -> None:
        """Delivered video the player will not play (a cut withdrew it)."""
        self.delivered = max(0.0, self.delivered - seconds)

    def on_delivered(self, now: float, duration: float) -> float:
        """Count a chunk delivered now; returns how long the player stalled before it."""
        stalled = 0.0
        if self.start is None:
            self.start, self.delivered = now, 0.0
        else:
            due = self.start + self.delivered
            if now > due + 0.05:  # the player ran dry and waited until now
                stalled = now - due
                self.start += stalled
        self.delivered += duration
        return stalled

    def rebase_if_dry(self, now: float) -> None:
        """If the player has played everything delivered by `now`, move it to `now` (the
        time since is not counted as a stall): for a client that was away."""
        if self.start is not None and self.paused_at is None and self.start + self.delivered < now:
            self.start = now - self.delivered

    def pause(self, now: float) -> None:
        self.paused_at = now

    def resume(self, now: float) -> None:
        if self.start is not None and self.paused_at is not None:
            self.start += now - self.paused_at
        self.paused_at = None

    def runs_dry(self, undelivered_video: float) -> float:
        """When the player runs dry if `undelivered_video` more seconds arrived now."""
        assert self.start is not None
        return self.start + self.delivered + undelivered_video


class Outbox:
    """A session's two lanes to its stream, and what it has delivered over all connections.

    The media lane (`shot`, `chunk` + segment) is strictly ordered; the control lane (acks,
    errors, pongs) overtakes it. An item leaves the media lane only once sent whole; the
    last few sent are kept so a resumed connection can be given what the dropped one may
    not have delivered.
    """

    def __init__(self, keep: int, keep_seconds: float = 0.0) -> None:
        self.media: deque[MediaItem] = deque()
        self.control: deque[dict[str, Any]] = deque()
        # Sent items kept for a resume: at least `keep`, more while they span at most
        # `keep_seconds` of video (a client whose socket died unnoticed may have lost that).
        self.sent: deque[MediaItem] = deque()
        self.keep, self.keep_seconds = keep, keep_seconds
        self._sent_seconds = 0.0
        self.chunks_delivered = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.video_sent = 0.0  # seconds of video delivered, over all connections
        self.last_delivered_seq = -1
        self.shown_shot = -1
        self.seq_floor = 0  # no chunk before this seq will be sent (a cut withdrew them)

    def push_control(self, msg: dict[str, Any]) -> bool:
        """Queue a control message; False (dropped) past CONTROL_LIMIT queued."""
        if len(self.control) >= CONTROL_LIMIT:
            return False
        self.control.append(msg)
        return True

    def settle(self, item: MediaItem) -> bool:
        """Count an item as the client's; True for a chunk counted now (not a `shot`
        message, not a replay counted when it was first sent)."""
        if item.data is None:  # a `shot` or `withdraw` message
            if item.message["type"] == "shot":
                self.shown_shot = item.message["shot"]
            return False
        if item.replay:
            return False
        self.chunks_delivered += 1
        self.frames_sent += item.frames
        self.bytes_sent += len(item.data)
        self.video_sent += item.duration
        self.last_delivered_seq = item.seq
        return True

    def sent_whole(self, item: MediaItem, keep: bool = True) -> bool:
        """The sender got `item` out whole: it leaves the lane and is kept for a resume
        (unless `keep` is false: the session has ended); returns what `settle` does."""
        if self.media and self.media[0] is item:
            self.media.popleft()
        if keep:
            self._keep_sent(item)
        return self.settle(item)

    def _keep_sent(self, item: MediaItem) -> None:
        self.sent.append(item)
        self._sent_seconds += item.duration
        while len(self.sent) > self.keep and self._sent_seconds > self.keep_seconds:
            self._sent_seconds -= self.sent.popleft().duration

    def resume_after(self, last_seq: int | None) -> list[MediaItem]:
        """A new connection whose client holds every chunk up to `last_seq` (None: a fresh
        player). Items it holds that the dropped connection got out before its sender
        could take them off the lane are settled (those counted now are returned, with the
        `shot` and `withdraw` messages among them that were not replays); later ones
        it may have missed are queued again as replays. Replies meant for the dead connection
        (acks, pongs, errors) are dropped, but not the outcome of a prompt: a
        `prompt_dropped` is the session's news, and waiting prompts are acknowledged again
        by the caller."""
        kept = [m for m in self.control if m.get("type") == "prompt_dropped"]
        self.control.clear()
        self.control.extend(kept)
        settled: list[MediaItem] = []
        if last_seq is not None:
            while self.media and self.media[0].seq <= last_seq:
                item = self.media.popleft()
                if self.settle(item) or (item.data is None and not item.replay):
                    settled.append(item)
            again = [replace(x, replay=True) for x in self.sent if x.seq > last_seq]
            self.media.extendleft(reversed(again))
        self.sent.clear()
        self._sent_seconds = 0.0
        return settled

    def held_end(self, last_seq: int | None) -> float:
        """Where the media a resuming client holds ends (seconds): the end of the latest
        chunk up to `last_seq` still kept (0.0 for a fresh player, or when none is kept).
        Call it before `resume_after`, which forgets the sent ones."""
        if last_seq is None:
            return 0.0
        ends = [
            x.message["pts"] + x.message["duration"]
            for x in (*self.sent, *self.media)
            if x.data is not None and x.seq <= last_seq
        ]
        return max(ends, default=0.0)

    def first_media_seq(self) -> int:
        """The seq of the first chunk a new connection will carry."""
        first = next((x.seq for x in self.media if x.data is not None), None)
        if first is not None:
            return first
        return max(self.last_delivered_seq + 1, self.seq_floor)

    def withdraw(
        self, seqs: set[int], tail: MediaItem | None, tail_frames: int, fps: int
    ) -> tuple[list[int], float]:
        """A cut withdrew chunks `seqs` and the last `tail_frames` of `tail`: drop them from
        the lane (unsent) and from the sent ones (uncounting them: the client will not play
        them). Returns the sent seqs withdrawn and the seconds of sent video withdrawn."""
        for item in [x for x in self.media if x.seq in seqs]:
            self.media.remove(item)  # chunks, and the `shot` message of a withdrawn shot
        sent_seqs, seconds = [], 0.0
        for item in [x for x in self.sent if x.seq in seqs and x.data is not None]:
            self.sent.remove(item)
            self._sent_seconds -= item.duration
            sent_seqs.append(item.seq)
            if not item.replay:
                self.chunks_delivered -= 1
                self.frames_sent -= item.frames
                self.bytes_sent -= len(item.data or b"")
                self.video_sent -= item.duration
                seconds += item.duration
        if tail is not None and tail_frames:
            self.frames_sent -= tail_frames
            self.video_sent -= tail_frames / fps
            seconds += tail_frames / fps
        if sent_seqs and self.last_delivered_seq >= min(sent_seqs):
            self.last_delivered_seq = min(sent_seqs) - 1
        return sorted(sent_seqs), seconds

    def sent_item(self, seq: int) -> MediaItem | None:
        return next((x for x in self.sent if x.seq == seq and x.data is not None), None)

    def release(self) -> None:
        """The session ended: drop its video (queued and kept for a resume); the control
        lane stays until the stream has delivered the end (`drop_control`)."""
        self.media.clear()
        self.sent.clear()
        self._sent_seconds = 0.0

    def drop_control(self) -> None:
        self.control.clear()

    @property
    def bytes_held(self) -> int:
        """Segment bytes this outbox holds: queued and kept for a resume."""
        return sum(len(x.data) for x in (*self.media, *self.sent) if x.data is not None)


class Packager:
    """Encodes each generated chunk off the event loop and queues it in order."""

    def __init__(self, pool: Executor, metrics: Metrics) -> None:
        self.pool, self.metrics = pool, metrics

    async def package(
        self, s: Session, work: ChunkWork, result: StepResult, on_failed: Callable[[str], None]
    ) -> bool:
        """Encode `result` into the session's outbox (after any chunk before it); False if
        the session ended first or its encoder failed (`on_failed` gets the reason)."""
        async with s.encode_lock:  # one encoder per session: chunks strictly in order
            if not s.alive or work.seq in s.withdrawn:
                return False  # ended, or withdrawn by a cut before it was encoded
            t0 = time.perf_counter()
            try:
                if s.encoder.frames_encoded != work.first_frame:  # after a cut: its timeline
                    s.encoder.rewind(work.first_frame)
                seg = await asyncio.get_running_loop().run_in_executor(
                    self.pool, s.encoder.encode_chunk, result.frames
                )
            except Exception as exc:  # a broken encoder: the stream cannot continue
                self.metrics.errors.labels("encode").inc()
                on_failed(f"video encoding failed: {exc}")
                return False
            encode_s = time.perf_counter() - t0
            self.metrics.verb_duration.labels("package").observe(encode_s)
            if not s.alive or work.seq in s.withdrawn:
                return False
            now = time.monotonic()
            shot, seq = work.prompt, work.seq
            if work.starts_shot:
                report = result.new_shot or shot.report
                shot_msg = P.ShotMessage(
                    shot_id=shot.shot_id,
                    shot=result.shot,
                    prompt=shot.text,
                    starts_at_seq=seq,
                    truncated_tokens=report.truncated_tokens,
                )
                s.outbox.media.append(
                    MediaItem(shot_msg.model_dump(mode="json"), seq=seq, ready=now)
                )
            t = result.timings
            msg = P.ChunkMessage(
                seq=seq,
                shot=result.shot,
                shot_id=shot.shot_id,
                first_frame=seg.first_frame,
                frames=seg.frames,
                pts=seg.pts,
                duration=seg.duration,
                bytes=len(seg.data),
                timings=P.ChunkTimings(
                    denoise_ms=t.get("denoise_ms", 0.0),
                    refresh_ms=t.get("refresh_ms", 0.0),
                    decode_ms=t.get("decode_ms", 0.0),
                    encode_ms=encode_s * 1e3,
                ),
            )
            shows = shot if work.starts_shot and not shot.auto else None
            s.outbox.media.append(
                MediaItem(
                    msg.model_dump(mode="json"), seg.data, seq, seg.frames, seg.duration, now, shows
                )
            )
            if s.conn is not None:
                s.conn.wake.set()
            return True


def new_encoder(cfg) -> H264Encoder:
    """A session's H.264 encoder at the model's frame size and rate."""
    return H264Encoder(cfg.width, cfg.height, cfg.fps)
