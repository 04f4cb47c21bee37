"""`shotstream-client`: watch a session into an MP4, play a multi-shot script, generate load.

    shotstream-client watch "a red fox in the snow" --shot "wide shot" --out fox.mp4
    shotstream-client watch "a red fox" --out - | ffplay -        # fragmented MP4 on stdout
    shotstream-client watch "http://host/?watch=ID#token=T" --out theirs.mp4   # a watch link
    shotstream-client record "http://host/?watch=ID#token=T" --out recording.mp4
    shotstream-client script demo.json --out demo.mp4             # {"global_caption", "shot1", ...}
    shotstream-client load --sessions 4 --duration 30             # one JSON line

A file is written as the fragmented MP4 the server sends (`OUT.partial` while streaming, so
an interrupted run still leaves a playable file) and on exit remuxed, without re-encoding,
to a progressive MP4 with the index first (`+faststart`), which every player and editor
reads; `--fragmented` keeps the fMP4 as received instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from clients.client import (
    Chunk,
    ConnectionLost,
    Ended,
    Error,
    Event,
    Hello,
    Init,
    NotConnected,
    PromptAck,
    PromptDropped,
    Queued,
    Reconnected,
    RetryPolicy,
    Session,
    SessionFailed,
    Shot,
    ShotStreamClient,
    ShotStreamError,
    Skipped,
    Viewers,
    Withdraw,
    parse_watch_url,
)
from clients.media import FragmentWriter, remux_faststart
from clients.stats import Playout, RateMeter

PROG = "shotstream-client"


# ------------------------------------------------------------------------------ console


class Console:
    """stderr: a live status line (on a terminal) and one line per notable event."""

    def __init__(self, quiet: bool = False, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and self.stream.isatty()
        self._status = ""
        self._drawn = 0.0

    def say(self, text: str) -> None:
        """One event line (kept in the scrollback), redrawing the status line below it."""
        if self.quiet:
            return
        self._clear()
        print(f"{PROG}: {text}", file=self.stream, flush=True)
        self._draw()

    def status(self, text: str, force: bool = False) -> None:
        """Replace the status line (at most 5 redraws a second)."""
        self._status = text
        now = time.monotonic()
        if self.live and (force or now - self._drawn >= 0.2):
            self._clear()
            self._draw()
            self._drawn = now

    def done(self) -> None:
        """Leave the status line's last state on screen."""
        if self.live and self._status:
            self.stream.write("\n")
            self.stream.flush()
            self._status = ""

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.live and self._status:
            width = max(
                20,
                (
                    os.get_terminal_size(self.stream.fileno()).columns
                    if self.stream.isatty()
                    else 120
                )
                - 1,
            )
            self.stream.write(self._status[:width])
            self.stream.flush()


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------- viewer


class Viewer:
    """Consumes a session's events: writes the video, keeps what was seen, shows status."""

    def __init__(
        self,
        writer: FragmentWriter | None,
        console: Console,
        max_chunks: int | None = None,
        max_video_s: float | None = None,
    ) -> None:
        self.writer = writer
        self.console = console
        self.max_chunks = max_chunks
        self.max_video_s = max_video_s
        self.playout = Playout()
        self.rate = RateMeter()
        self.fps = 0
        self.frames = 0
        self.video_s = 0.0
        self.chunks: list[dict[str, Any]] = []
        self.chunks_of: dict[int, int] = {}  # shot_id -> chunks received
        self.shots: list[dict[str, Any]] = []
        self.prompts: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.reconnects = 0
        self.ended: str | None = None
        self.shot_prompt = ""
        self.shot_index: int | None = None
        self.sent_at: dict[int, float] = {}  # shot_id -> when its prompt was sent
        self.latency: float | None = None  # the last prompt's prompt-to-visible seconds
        self.rtt: float | None = None
        self.broken_pipe = False
        self.first_pts: float | None = None  # media time of the player's first frame
        self.withdrawn_frames = 0
        self.viewers = 0  # viewers watching (the server says, when it changes)
        self.skipped: list[int] = []  # chunks skipped as a viewer that fell behind
        self.queued: list[int] = []  # places in the waiting room, as they changed

    def playhead(self, now: float) -> float | None:
        """Media time the modelled player shows at `now` (what instant cuts report)."""
        if self.first_pts is None:
            return None
        return self.first_pts + self.playout.played_s(now)

    @property
    def done(self) -> bool:
        """A requested limit (chunks or seconds of video) was reached."""
        return (self.max_chunks is not None and len(self.chunks) >= self.max_chunks) or (
            self.max_video_s is not None and self.video_s >= self.max_video_s - 1e-9
        )

    def on_event(self, ev: Event) -> None:
        """Account one event; writes media unless a limit was already reached."""
        if isinstance(ev, Hello):
            self.fps = ev.message.fps
        elif isinstance(ev, Init):
            self._write(ev.data, init=True)
        elif isinstance(ev, Chunk):
            if self.done:
                return  # arrived after we asked to stop: not part of the requested video
            m = ev.message
            self._write(ev.data, init=False, first_frame=m.first_frame, frames=m.frames)
            if self.first_pts is None:
                self.first_pts = m.pts
            self.playout.on_chunk(ev.received, m.duration)
            self.rate.add(ev.received, m.frames)
            self.frames += m.frames
            self.video_s += m.duration
            self.chunks.append(
                {
                    "seq": m.seq,
                    "shot": m.shot,
                    "shot_id": m.shot_id,
                    "first_frame": m.first_frame,
                    "frames": m.frames,
                    "pts": m.pts,
                    "bytes": m.bytes,
                }
            )
            self.chunks_of[m.shot_id] = self.chunks_of.get(m.shot_id, 0) + 1
            sent = self.sent_at.pop(m.shot_id, None)
            if sent is not None:
                # visible when the player reaches it, not when it arrives
                shown = self.playout.visible_at(m.pts - (self.first_pts or 0.0)) or ev.received
                self.latency = max(shown, ev.received) - sent
                self.console.say(f"prompt visible after {self.latency:.2f} s (seq {m.seq})")
        elif isinstance(ev, Shot):
            s = ev.message
            self.shots.append(s.model_dump())
            self.shot_prompt, self.shot_index = s.prompt, s.shot
            self.console.say(
                f"shot {s.shot} (id {s.shot_id}) from seq {s.starts_at_seq}: {_short(s.prompt, 60)!r}"
            )
        elif isinstance(ev, PromptAck):
            for p in self.prompts:
                if p["shot_id"] == ev.message.shot_id:
                    p["starts_at_seq"] = ev.message.starts_at_seq  # a queued prompt moved
        elif isinstance(ev, PromptDropped):
            self.dropped.append(ev.message.model_dump())
            self.sent_at.pop(ev.message.shot_id, None)
            self.console.say(f"prompt {ev.message.shot_id} dropped: {ev.message.reason}")
        elif isinstance(ev, Withdraw):
            self._withdraw(ev)
        elif isinstance(ev, Queued):
            q = ev.message
            self.queued.append(q.position)
            wait = "" if q.estimated_wait_s is None else f", about {q.estimated_wait_s:.0f} s"
            self.console.say(f"the server is full: number {q.position} in line{wait}")
        elif isinstance(ev, Viewers):
            self.viewers = ev.message.count
        elif isinstance(ev, Skipped):
            self.skipped += ev.message.seqs
            self.console.say(
                f"fell behind: {len(ev.message.seqs)} chunks skipped, on at seq {ev.message.next_seq}"
            )
        elif isinstance(ev, Error):
            self.errors.append(ev.message.model_dump())
            self.console.say(f"server error: {ev.message.code}: {ev.message.message}")
        elif isinstance(ev, Reconnected):
            self.reconnects += 1
            self.console.say(
                f"connection dropped; resumed after {ev.downtime_s:.2f} s ({ev.attempts} attempts)"
            )
        elif isinstance(ev, Ended):
            self.ended = ev.reason
        self._status()

    def prompt_sent(
        self, text: str, mode: str | None, sent_at: float, shot_id: int, starts_at_seq: int
    ) -> None:
        """Record a prompt the server acknowledged."""
        self.sent_at[shot_id] = sent_at
        self.prompts.append(
            {"prompt": text, "mode": mode, "shot_id": shot_id, "starts_at_seq": starts_at_seq}
        )
        self.console.say(f"prompt accepted: shot id {shot_id} starts at seq {starts_at_seq}")

    def _withdraw(self, ev: Withdraw) -> None:
        """A cut replaced video we received but had not played: cut the file and our
        counts back to `pts`, as the player removes it."""
        m = ev.message
        cut = round(m.pts * self.fps) if self.fps else 0
        frames = 0
        for c in self.chunks:
            end = c["first_frame"] + c["frames"]
            if end > cut:
                frames += end - max(cut, c["first_frame"])
        self.chunks = [c for c in self.chunks if c["first_frame"] < cut]
        for c in self.chunks:
            c["frames"] = min(c["frames"], cut - c["first_frame"])
        self.frames -= frames
        self.video_s -= frames / self.fps if self.fps else 0.0
        self.withdrawn_frames += frames
        self.playout.withdraw(frames / self.fps if self.fps else 0.0)
        if self.writer is not None and self.writer.can_withdraw and not self.broken_pipe:
            self.writer.withdraw(cut)
        self.console.say(f"cut at {m.pts:.2f} s: {frames} frames not yet played withdrawn")

    def _write(self, data: bytes, init: bool, first_frame: int = 0, frames: int = 0) -> None:
        if self.writer is None or self.broken_pipe:
            return
        try:
            if init:
                self.writer.write_init(data)
            else:
                self.writer.write_segment(data, first_frame, frames)
        except BrokenPipeError:
            self.broken_pipe = True  # the player on our stdout quit: stop like Ctrl-C

    def _status(self) -> None:
        now = time.monotonic()
        parts = [f"seq {self.chunks[-1]['seq']}" if self.chunks else "waiting for video"]
        if self.shot_index is not None:
            parts.append(f"shot {self.shot_index} {_short(self.shot_prompt)!r}")
        parts += [
            f"{self.rate.rate(now):4.1f} fps",
            f"buffer {self.playout.buffer_s(now):4.1f} s",
            f"{self.video_s:5.1f} s video",
        ]
        if self.playout.misses:
            parts.append(f"{self.playout.misses} stalls")
        if self.rtt is not None:
            parts.append(f"rtt {self.rtt * 1e3:.0f} ms")
        if self.latency is not None:
            parts.append(f"prompt latency {self.latency:.2f} s")
        if self.viewers:
            parts.append(f"{self.viewers} watching")
        self.console.status(" · ".join(parts))

    def report(self, session: Session, out: str | None) -> dict[str, Any]:
        """What was received, as JSON-ready data (`--report`)."""
        return {
            "session_id": session.session_id,
            "out": out,
            "fps": self.fps,
            "chunks": self.chunks,
            "frames": self.frames,
            "video_s": round(self.video_s, 4),
            "shots": self.shots,
            "prompts": self.prompts,
            "dropped": self.dropped,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "ended": self.ended,
            "stalls": self.playout.misses,
            "stalled_s": round(self.playout.stalled_s, 3),
            "withdrawn_frames": self.withdrawn_frames,
            "skipped": self.skipped,
            "queued": self.queued,
        }


# ----------------------------------------------------------------------------- output


class Output:
    """Where the video goes: stdout as fMP4, or OUT.partial remuxed to OUT on close."""

    def __init__(self, out: str, fragmented: bool) -> None:
        self.out = out
        self.fragmented = fragmented
        self.path: Path | None = None if out == "-" else Path(out)
        self.partial: Path | None = None
        self.file: BinaryIO
        if self.path is None:
            self.file = sys.stdout.buffer
        else:
            self.partial = self.path.with_name(self.path.name + ".partial")
            self.file = open(self.partial, "wb")  # noqa: SIM115 (closed in finish)
        self.writer = FragmentWriter(self.file)

    def finish(self, console: Console) -> str | None:
        """Close the file; remux it (unless --fragmented). Returns a problem, if any."""
        if self.path is None:
            try:
                self.file.flush()
            except (BrokenPipeError, ValueError):
                # The reader left: point stdout at /dev/null so the exit flush is quiet.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return None
        self.file.close()
        assert self.partial is not None
        if self.writer.segments == 0:
            self.partial.unlink(missing_ok=True)
            return "no video was received; nothing written"
        if self.fragmented:
            os.replace(self.partial, self.path)
            return None
        try:
            remux_faststart(self.partial, self.path)
        except Exception as exc:  # keep the video: the fMP4 plays in most players
            os.replace(self.partial, self.path)
            console.say(f"remux to a progressive MP4 failed ({exc}); kept the fragmented MP4")
            return None
        self.partial.unlink(missing_ok=True)
        return None


# ---------------------------------------------------------------------------- running


def _client(args: argparse.Namespace) -> ShotStreamClient:
    return ShotStreamClient(args.server, api_key=args.api_key, timeout=args.timeout)


def _install_stop(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Ctrl-C (or SIGTERM) stops cleanly once; a second Ctrl-C interrupts at once."""

    def first(sig: signal.Signals) -> None:
        stop.set()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, first, sig)


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines typed on stdin, read by a daemon thread (so exit never waits for Enter)."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: we are exiting
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="stdin-prompts", daemon=True).start()
    return queue


async def _send_prompt(session: Session, viewer: Viewer, text: str, mode: str | None) -> bool:
    """Send one prompt and record its ack; a refusal is reported, not fatal."""
    sent = time.monotonic()
    try:
        acc = await session.prompt(text, mode)  # type: ignore[arg-type]
    except (ShotStreamError, TimeoutError) as exc:
        viewer.console.say(f"prompt refused: {exc}")
        return False
    viewer.prompt_sent(text, mode, sent, acc.shot_id, acc.starts_at_seq)
    return True


async def _interactive(session: Session, viewer: Viewer, default_mode: str | None) -> None:
    viewer.console.say("type a prompt and Enter to cut to it; a leading '+' queues it instead")
    lines = _stdin_lines(asyncio.get_running_loop())
    while (line := await lines.get()) is not None:
        text = line.strip()
        mode = default_mode
        if text.startswith("+"):
            text, mode = text[1:].strip(), "queue"
        if text:
            await _send_prompt(session, viewer, text, mode)


async def _playhead_reporter(session: Session, viewer: Viewer) -> None:
    """Instant cuts: tell the server where the modelled player is, four times a second."""
    while True:
        await asyncio.sleep(0.25)
        at = viewer.playhead(time.monotonic())
        if at is not None:
            await session.report_playhead(at)


async def _pinger(session: Session, viewer: Viewer) -> None:
    """Measure the round trip every 2 s for the status line."""
    while True:
        await asyncio.sleep(2.0)
        with contextlib.suppress(ShotStreamError, TimeoutError):
            viewer.rtt = await session.ping(timeout=5.0)


async def _play(session: Session, viewer: Viewer, stop: asyncio.Event, on_event=None) -> None:
    """Consume the stream until it ends, a limit is reached, or `stop` is set."""

    async def consume() -> None:
        async for ev in session.stream():
            viewer.on_event(ev)
            if on_event is not None:
                await on_event(ev)
            if viewer.done or viewer.broken_pipe:
                return

    task = asyncio.create_task(consume())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # re-raises the stream's error, if any


async def _finish_session(session: Session, viewer: Viewer, leave: bool) -> None:
    """Stop the session (or leave it running) and close the connection."""
    if session.role == "viewer":  # someone else's session: just leave it
        await session.close()
        return
    if viewer.ended is None and not leave:
        try:
            await session.stop()
            # Read to `ended` so the stop is confirmed (later chunks are not written).
            async with asyncio.timeout(10):
                while (ev := await session.next_event()) is not None:
                    viewer.on_event(ev)
        except (ShotStreamError, TimeoutError, NotConnected) as exc:
            viewer.console.say(f"could not stop the session cleanly: {exc}")
    elif leave and viewer.ended is None:
        viewer.console.say(
            f"left the session running; it ends unless a stream attaches within "
            f"its grace period: --session {session.session_id} "
            f"--token {session.token}"
        )
    await session.close()


async def _open_session(
    args: argparse.Namespace,
    client: ShotStreamClient,
    prompt: str | None,
    shots: list[str] | None,
    console: Console,
) -> Session:
    # Instant cuts need a file to cut back (not a pipe): on by default when writing one.
    cuts = args.instant_cuts if args.instant_cuts is not None else args.out != "-"
    features = ("withdraw",) if cuts else ()
    if prompt is not None and _is_url(prompt):  # a watch link: someone else's session
        session = client.watch(prompt, token=getattr(args, "token", None), features=features)
        console.say(f"watching session {session.session_id}")
        return session
    if getattr(args, "session", None):
        if not args.token:
            raise SystemExit(f"{PROG}: --session needs --token")
        return client.attach(args.session, args.token, features=features)
    if not prompt:
        raise SystemExit(f"{PROG}: give a prompt (or --session ID --token T to attach)")
    retry = (
        RetryPolicy(on_retry=lambda e, d: console.say(f"{e}; retrying in {d:.0f} s"))
        if args.retry
        else False
    )
    session = await client.create_session(
        prompt, shots or None, args.seed, args.mode, retry, features=features, wait=args.wait
    )
    console.say(f"session {session.session_id}")
    return session


def _is_url(text: str) -> bool:
    return re.match(r"(https?|wss?)://", text) is not None


async def _watch(args: argparse.Namespace, script: dict[str, Any] | None = None) -> int:
    console = Console(quiet=args.quiet)
    stop = asyncio.Event()
    _install_stop(asyncio.get_running_loop(), stop)
    failure: ShotStreamError | None = None
    failures: list[ShotStreamError] = []  # from helper tasks (a timed script prompt refused)
    if script is None and args.prompt and _is_url(args.prompt):
        args.server = parse_watch_url(args.prompt).base_url  # the link names its server
    async with _client(args) as client:
        if script is not None:
            session = await _open_session(
                args, client, script["global"], script["shots"][:1], console
            )
        else:
            session = await _open_session(args, client, args.prompt, args.shot, console)
        output = Output(args.out, args.fragmented)
        viewer = Viewer(output.writer, console, args.chunks, args.duration)
        helpers = [
            asyncio.create_task(_pinger(session, viewer)),
            asyncio.create_task(_playhead_reporter(session, viewer)),
        ]
        on_event = None
        try:
            if script is not None:

                def fail(exc: ShotStreamError) -> None:
                    failures.append(exc)
                    stop.set()

                on_event = await _script_driver(
                    args, client, session, viewer, script, helpers, fail
                )
            elif args.interactive:
                helpers.append(asyncio.create_task(_interactive(session, viewer, args.mode)))
            await _play(session, viewer, stop, on_event)
            failure = failures[0] if failures else None
        except ShotStreamError as exc:
            failure = exc
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if isinstance(failure, SessionFailed | ConnectionLost):
                await session.close()  # nothing left to stop
            else:
                await _finish_session(session, viewer, args.leave)
            console.done()
            problem = output.finish(console)
        if args.report:
            Path(args.report).write_text(json.dumps(viewer.report(session, args.out), indent=1))
    where = "stdout" if args.out == "-" else args.out
    if failure is not None:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        if viewer.chunks and args.out != "-":
            print(
                f"{PROG}: kept the {len(viewer.chunks)} chunks received in {where}", file=sys.stderr
            )
        return 1
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    console.say(
        f"wrote {where}: {len(viewer.chunks)} chunks, {viewer.frames} frames, "
        f"{viewer.video_s:.2f} s" + (f" (ended: {viewer.ended})" if viewer.ended else "")
    )
    return 0


# ------------------------------------------------------------------------------ record


async def _record(args: argparse.Namespace) -> int:
    """Download a session's recording (and its timeline) with a watch link or a token."""
    link = parse_watch_url(args.url)
    token = args.token or link.token
    if not token:
        print(f"{PROG}: error: the URL carries no token: give --token", file=sys.stderr)
        return 2
    async with ShotStreamClient(link.base_url, timeout=args.timeout) as client:
        session = client.attach(link.session_id, token)
        out = Path(args.out)
        state = await session.download_recording(out)
        timeline = await session.timeline()
        if args.timeline:
            Path(args.timeline).write_text(json.dumps(timeline, indent=1))
    note = ""
    if state == "incomplete":
        note = f"; incomplete: recording stopped ({timeline.get('incomplete_reason')})"
    elif state == "recording":
        note = "; the session is still running: this is the recording so far"
    if not args.quiet:
        print(
            f"{PROG}: wrote {out}: {timeline['chunks']} chunks, {timeline['frames']} frames, "
            f"{timeline['duration']:.2f} s, {len(timeline['shots'])} shots{note}",
            file=sys.stderr,
        )
    return 0


# ------------------------------------------------------------------------------ script


def load_script(path: Path) -> dict[str, Any]:
    """A demo script `{"global_caption": ..., "shot1": ..., "shot2": ...}` as
    {"global": caption, "shots": [shot1, shot2, ...]} (shots in numeric order)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("global_caption"), str):
        raise ValueError(f'{path}: expected an object with a "global_caption" string')
    numbered = {}
    for key, value in data.items():
        if m := re.fullmatch(r"shot(\d+)", key):
            if not isinstance(value, str):
                raise ValueError(f"{path}: {key} must be a string")
            numbered[int(m.group(1))] = value
    if not numbered:
        raise ValueError(f'{path}: no "shot1", "shot2", ... entries')
    return {"global": data["global_caption"], "shots": [numbered[k] for k in sorted(numbered)]}


async def _script_driver(
    args: argparse.Namespace,
    client: ShotStreamClient,
    session: Session,
    viewer: Viewer,
    script: dict[str, Any],
    helpers: list[asyncio.Task],
    fail: Callable[[ShotStreamError], None],
):
    """Send the script's later shots (at boundaries, or every N s); finish after the last."""
    shots: list[str] = script["shots"]
    shot_chunks = args.shot_chunks or (await client.models()).chunks_per_shot
    ids: dict[int, int] = {}  # scripted shot_id -> index in the script
    sent = 1  # shots sent so far (shot1 came with the session)
    last_id: int | None = None  # shot_id of the script's last shot, once known

    def check_finished() -> None:
        if last_id is not None and viewer.chunks_of.get(last_id, 0) >= shot_chunks:
            viewer.max_chunks = len(viewer.chunks)  # the last shot has played: done

    async def send(index: int, mode: str) -> None:
        nonlocal last_id
        before = len(viewer.prompts)
        if not await _send_prompt(session, viewer, shots[index], mode):
            raise ShotStreamError(f"shot{index + 1} was refused; stopping the script")
        shot_id = viewer.prompts[before]["shot_id"]
        ids[shot_id] = index
        if index == len(shots) - 1:
            last_id = shot_id
            check_finished()

    async def on_event(ev: Event) -> None:
        nonlocal sent, last_id
        if isinstance(ev, Shot) and not ids and ev.message.starts_at_seq == 0:
            ids[ev.message.shot_id] = 0  # the session's first shot is shot1
            if len(shots) == 1:
                last_id = ev.message.shot_id
        if isinstance(ev, Shot) and args.every is None:
            index = ids.get(ev.message.shot_id)
            # At each scripted shot's start, queue the next one: it plays after this one.
            if index is not None and index + 1 == sent < len(shots):
                sent += 1
                await send(index + 1, "queue")
        if isinstance(ev, Chunk):
            check_finished()

    async def timed() -> None:
        nonlocal sent
        while not viewer.chunks:  # the clock starts with the first chunk
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        try:
            for index in range(1, len(shots)):
                await asyncio.sleep(max(0.0, t0 + index * args.every - time.monotonic()))
                sent += 1
                await send(index, args.mode or "cut")
        except ShotStreamError as exc:
            fail(exc)

    if args.every is not None:
        helpers.append(asyncio.create_task(timed()))
    return on_event


async def _script(args: argparse.Namespace) -> int:
    try:
        script = load_script(Path(args.file))
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = str(Path(args.file).with_suffix(".mp4").name)
    args.chunks, args.duration, args.interactive, args.session = None, None, False, None
    return await _watch(args, script)


# -------------------------------------------------------------------------------- main


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("SHOTSTREAM_SERVER", "http://127.0.0.1:8000"),
        help="server base URL (default: $SHOTSTREAM_SERVER or http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SHOTSTREAM_API_KEY"),
        help="API key for creating sessions (default: $SHOTSTREAM_API_KEY)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP and connect timeout, s")


def _add_session(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the server's)")
    p.add_argument(
        "--mode",
        choices=["cut", "queue"],
        default=None,
        help="default mode of new prompts (server default: cut)",
    )
    p.add_argument(
        "--retry",
        action="store_true",
        help="when the server is busy (429/503), retry after its Retry-After",
    )
    p.add_argument(
        "--fragmented",
        action="store_true",
        help="keep the fragmented MP4 as received instead of remuxing it",
    )
    p.add_argument(
        "--leave",
        action="store_true",
        help="on exit, leave the session running (re-attach with --session/--token) instead of stopping it",
    )
    p.add_argument(
        "--report",
        metavar="FILE.json",
        help="write what was received (chunks, shots, prompts) as JSON",
    )
    p.add_argument("--quiet", action="store_true", help="no status line or event lines")
    p.add_argument(
        "--wait",
        action="store_true",
        help="when the server is full, wait in its waiting room (the place in line is shown)",
    )
    p.add_argument(
        "--instant-cuts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a cut replaces the video received but not yet played (the file is "
        "cut back to it); default: on when writing a file, off on stdout",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Client of a ShotStream server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "watch",
        help="stream a session into an MP4 file or stdout",
        description="Create a session (or attach to one, or watch someone else's from its "
        "watch link) and write its video as it streams, with a live status line on stderr. "
        "Stops after --duration or --chunks, when the session ends, or on Ctrl-C (which "
        "stops the session unless --leave; a watched session is only left).",
    )
    _add_common(p)
    p.add_argument(
        "prompt",
        nargs="?",
        help="global caption of the video, or a watch link (http://host/?watch=ID#token=T, "
        "or its stream URL) to watch that session read-only",
    )
    p.add_argument(
        "--shot",
        action="append",
        metavar="TEXT",
        help="a first shot prompt; repeat for several, played in order",
    )
    p.add_argument("--session", metavar="ID", help="attach to an existing session instead")
    p.add_argument(
        "--token",
        metavar="T",
        help="the session's token (with --session), or a watch link's if its URL has none",
    )
    p.add_argument(
        "--out",
        default="shotstream.mp4",
        metavar="FILE.mp4",
        help="MP4 file to write, or - for fragmented MP4 on stdout (pipe into ffplay - or mpv -)",
    )
    p.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after this many seconds of video"
    )
    p.add_argument("--chunks", type=int, metavar="N", help="stop after N chunks")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read new prompts from stdin, one per line (a leading + queues it)",
    )
    _add_session(p)
    p.set_defaults(func=lambda a: asyncio.run(_watch(a)))

    p = sub.add_parser(
        "script",
        help="play a multi-shot script (demo JSON format) into an MP4",
        description='Play {"global_caption": ..., "shot1": ..., "shot2": ...}: the caption '
        "is the session prompt, shot1 starts the session, and each later shot is queued at "
        "the start of the one before (so each plays its full length) or, with --every, sent "
        "every SECONDS. Finishes once the last shot has played.",
    )
    _add_common(p)
    p.add_argument("file", metavar="FILE.json", help="the script")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.mp4",
        help="MP4 to write (default: the script's name .mp4), - for stdout",
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--on-boundary",
        action="store_true",
        help="queue each shot to start at the next shot boundary (default)",
    )
    when.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="send each later shot SECONDS after the previous (mode --mode, default cut), counted from the first chunk",
    )
    p.add_argument(
        "--shot-chunks",
        type=int,
        metavar="N",
        help="chunks of the last shot to play before finishing (default: the server's chunks per shot)",
    )
    _add_session(p)
    p.set_defaults(func=lambda a: asyncio.run(_script(a)))

    p = sub.add_parser(
        "record",
        help="download a session's recording as an MP4 (and its shot timeline)",
        description="Download the recording of a session (a standard MP4 with a chapter "
        "per shot: what its owner was sent, so far if it still runs) with a watch link or "
        "a session URL (http://host/v1/sessions/ID) and --token.",
    )
    p.add_argument("url", metavar="URL", help="a watch link, or http://host/v1/sessions/ID")
    p.add_argument("--out", default="recording.mp4", metavar="FILE.mp4", help="MP4 to write")
    p.add_argument("--token", metavar="T", help="the session's or a watch link's token")
    p.add_argument("--timeline", metavar="FILE.json", help="also write the shot timeline")
    p.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout, s")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=lambda a: asyncio.run(_record(a)))

    from clients.load import add_load_arguments, main_load

    p = sub.add_parser(
        "load",
        help="N concurrent sessions for T seconds; prints one JSON line",
        description="Load generator (loopback servers only unless --allow-remote): N "
        "concurrent sessions for T seconds with prompts at random (seeded) times; prints one "
        "JSON line of client-side measurements.",
    )
    add_load_arguments(p)
    p.set_defaults(func=main_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `shotstream-client`."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ShotStreamError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
