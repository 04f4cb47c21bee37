"""Recordings: what each session's owner was sent, on disk, with its shot timeline.

Each session's folder holds `stream.mp4`, the init segment and every media segment in the
order the owner's sender delivered them (a fragmented MP4: no re-encoding, the segments
already start with keyframes and continue one timeline), `timeline.json`, and the cached
progressive MP4 that `GET .../recording.mp4` serves: a remux of the segments with the
index at the front and one chapter per shot (PyAV, stream copy). A cut that withdraws
video the owner was sent (docs/design/protocol.md §14) truncates the file at the segment it
reaches (byte offsets are kept per segment) and keeps the frames before the cut.

Writes run on a small thread pool, in order per session (an asyncio lock each), never on
the event loop. A write that fails (disk full, any error, a segment over the disk budget)
stops that session's recording, marked incomplete with its reason, and cuts the file back
to the last whole segment; the stream goes on. A retention sweep deletes recordings
`recording_retention_s` after their session ended; a download in progress keeps its open
file (POSIX unlink). Each process records into a folder of its own, locked while it runs,
so the next start removes what a crashed one left. See docs/design/protocol.md §16.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av

from server.delivery import MediaItem
from server.media import trim_segment
from server.metrics import Metrics, gauge
from server.settings import Settings

if TYPE_CHECKING:  # sessions import this module
    from server.sessions import Session

log = logging.getLogger("shotstream.recording")
INSTANCE_PREFIX = "shotstream-"  # an instance folder: <dir>/shotstream-<replica>-<random>
LOCK = ".lock"


@dataclass
class Segment:
    """One media segment in `stream.mp4`."""

    seq: int
    offset: int
    size: int
    first_frame: int
    frames: int
    shot_id: int
    shot: int


@dataclass
class ShotInfo:
    """What the timeline says of a shot, besides its chunks."""

    shot: int
    shot_id: int
    prompt: str
    mode: str  # cut, queue, or continue (the server's own repeat at a shot's end)
    started_at: datetime  # its first chunk sent
    prompt_received_at: datetime | None


@dataclass(eq=False)
class Recording:
    """One session's recording; every field changes on the event loop only."""

    session: Session
    folder: Path
    caption: str
    created_at: datetime
    fd: int | None = None
    size: int = 0  # bytes of whole segments (and the init segment) in stream.mp4
    segments: list[Segment] = field(default_factory=list)
    shots: dict[int, ShotInfo] = field(default_factory=dict)
    state: str = "recording"  # recording, complete, incomplete
    incomplete_reason: str | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    ended_mono: float | None = None
    version: int = 0  # changes with every change of stream.mp4
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write at a time, in order
    readers: int = 0  # remuxes reading stream.mp4 (a truncation waits for them)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    cache: tuple[int, Path, int] | None = None  # (version, recording.mp4, its size)
    remux: tuple[int, asyncio.Future] | None = None  # the remux running, for its version
    deleted: bool = False

    @property
    def path(self) -> Path:
        return self.folder / "stream.mp4"

    @property
    def frames(self) -> int:
        return sum(x.frames for x in self.segments)


class NotRecorded(Exception):
    """No recording to give: off, nothing recorded yet, or deleted."""


class Recorder:
    """The server's recordings: writing, remuxing, the timeline and the retention sweep."""

    def __init__(self, settings: Settings, metrics: Metrics, cfg) -> None:
        self.settings, self.metrics, self.cfg = settings, metrics, cfg
        self.enabled = settings.recording
        self.recordings: dict[str, Recording] = {}
        self.reserved = 0  # bytes of stream.mp4 files, and of writes under way
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shotstream-record")
        self.remux_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shotstream-remux")
        self.root: Path | None = None
        self._lock_fd: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self.faults: dict[str, str] = {}  # TESTS ONLY: a session's next write fails
        metrics.add_sampler(self._gauges)

    # -- life ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Make this process's folder (locked while it runs), remove what processes that
        died left, and start the retention sweep."""
        if not self.enabled:
            return
        base = Path(
            self.settings.recordings_dir or Path(tempfile.gettempdir()) / "shotstream-recordings"
        )
        base.mkdir(parents=True, exist_ok=True)
        for old in base.glob(INSTANCE_PREFIX + "*"):
            _remove_if_abandoned(old)
        root = base / f"{INSTANCE_PREFIX}{self.settings.replica_id}-{secrets.token_hex(4)}"
        root.mkdir(mode=0o700)
        self._lock_fd = os.open(root / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.root = root
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        log.info("recording", extra={"folder": str(root)})

    async def close(self) -> None:
        """Stop: every recording goes with the process (their tokens die with it)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rec in self.recordings.values():
            _close_fd(rec)
        self.recordings.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.remux_pool.shutdown(wait=False, cancel_futures=True)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what the session manager reports -------------------------------------------------------
    def delivered(self, s: Session, item: MediaItem) -> None:
        """The owner was sent `item` whole: record it (a chunk), note it (a shot), or cut
        the recording back (a withdraw). Returns at once; the write runs in order."""
        if self.root is None:
            return
        rec = self.recordings.get(s.id)
        kind = item.message["type"]
        if rec is None:
            if kind not in ("shot", "chunk"):
                return
            rec = self._open(s)
            if rec is None:
                return
        if rec.state != "recording":
            return
        if kind == "shot":
            self._note_shot(rec, item)
        elif kind == "chunk":
            if item.prompt is not None or item.message["shot_id"] not in rec.shots:
                self._note_mode(rec, item)
            self._submit(rec, self._append(rec, item))
        elif kind == "withdraw":
            self._submit(rec, self._withdraw(rec, item.message["pts"]))

    def finish(self, s: Session, reason: str) -> None:
        """The session ended: the recording is complete (unless it stopped early), and its
        retention time starts."""
        rec = self.recordings.get(s.id)
        if rec is None:
            return
        rec.ended_at, rec.end_reason, rec.ended_mono = datetime.now(UTC), reason, time.monotonic()
        if rec.state == "recording":
            rec.state = "complete"
        self._submit(rec, self._finish(rec))

    def state_of(self, sid: str) -> str | None:
        rec = self.recordings.get(sid)
        return None if rec is None or rec.deleted else rec.state

    def session_of(self, sid: str) -> Session | None:
        """The session of a kept recording (its token and watch links authorize it)."""
        rec = self.recordings.get(sid)
        return None if rec is None else rec.session

    # -- writing ----------------------------------------------------------------------------------
    def _open(self, s: Session) -> Recording | None:
        assert self.root is not None
        folder = self.root / s.id
        try:
            folder.mkdir(mode=0o700)
            fd = os.open(folder / "stream.mp4", os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        except OSError as exc:
            log.error("recording failed", extra={"session_id": s.id, "error": repr(exc)})
            return None
        rec = Recording(s, folder, s.global_prompt, s.created_at, fd=fd)
        rec.idle.set()
        self.recordings[s.id] = rec
        init = s.encoder.init_segment()
        self._submit(rec, self._write_init(rec, init))
        return rec

    def _submit(self, rec: Recording, op) -> None:
        """Run `op` after every op of `rec` submitted before it."""

        async def ordered() -> None:
            async with rec.lock:
                if rec.deleted:
                    op.close()
                    return
                await op

        task = asyncio.get_running_loop().create_task(ordered())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _write_init(self, rec: Recording, init: bytes) -> None:
        await self._write(rec, init, None)

    async def _append(self, rec: Recording, item: MediaItem) -> None:
        m = item.message
        seg = Segment(
            item.seq,
            rec.size,
            len(item.data or b""),
            m["first_frame"],
            item.frames,
            m["shot_id"],
            m["shot"],
        )
        await self._write(rec, item.data or b"", seg)

    async def _write(self, rec: Recording, data: bytes, seg: Segment | None) -> None:
        if rec.state == "incomplete" or rec.fd is None:
            return
        if self.reserved + len(data) > self.settings.recording_budget_bytes:
            return self._stop(rec, "budget", "the recordings' disk budget is used up")
        self.reserved += len(data)
        fault = self.faults.pop(rec.session.id, None)
        try:
            await self._io(_pwrite_all, rec.fd, data, rec.size, fault)
        except OSError as exc:
            self.reserved -= len(data)
            # A partial write: cut the file back to its last whole segment.
            with contextlib.suppress(OSError):
                await self._io(os.ftruncate, rec.fd, rec.size)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            return self._stop(rec, "disk_full" if full else "write_error", repr(exc))
        rec.size += len(data)
        rec.version += 1
        if seg is not None:
            rec.segments.append(seg)

    async def _withdraw(self, rec: Recording, pts: float) -> None:
        """Cut the recording back to frame `pts × fps`: whole segments after it go, the
        segment it falls inside keeps its frames before it."""
        if rec.state == "incomplete" or rec.fd is None:
            return
        cut = round(pts * self.cfg.fps)
        at = next((i for i, x in enumerate(rec.segments) if x.first_frame + x.frames > cut), None)
        if at is None:
            return
        first = rec.segments[at]
        keep = cut - first.first_frame
        while rec.readers:  # a remux is reading what is about to change
            rec.idle.clear()
            await rec.idle.wait()
        try:
            trimmed = await self._io(_truncate_at, rec.fd, first.offset, first.size, keep)
        except (OSError, ValueError) as exc:
            return self._stop(rec, "write_error", repr(exc))
        self.reserved -= rec.size - first.offset - len(trimmed)
        rec.size = first.offset + len(trimmed)
        rec.segments = rec.segments[:at]
        if keep > 0:
            rec.segments.append(
                Segment(
                    first.seq,
                    first.offset,
                    len(trimmed),
                    first.first_frame,
                    keep,
                    first.shot_id,
                    first.shot,
                )
            )
        rec.version += 1

    async def _finish(self, rec: Recording) -> None:
        await self._write_timeline(rec)
        _close_fd(rec)

    async def _write_timeline(self, rec: Recording) -> None:
        text = json.dumps(self.timeline(rec), indent=1)
        with contextlib.suppress(OSError):
            await self._io((rec.folder / "timeline.json").write_text, text)

    def _stop(self, rec: Recording, reason: str, detail: str) -> None:
        """Stop recording this session (the stream goes on); say why in its timeline."""
        if rec.state == "incomplete":
            return
        rec.state, rec.incomplete_reason = "incomplete", reason
        self.metrics.recordings_incomplete.labels(reason).inc()
        log.warning(
            "recording stopped",
            extra={"session_id": rec.session.id, "reason": reason, "error": detail},
        )
        self._submit(rec, self._write_timeline(rec))

    def _note_shot(self, rec: Recording, item: MediaItem) -> None:
        m = item.message
        rec.shots[m["shot_id"]] = ShotInfo(
            m["shot"], m["shot_id"], m["prompt"], "continue", datetime.now(UTC), None
        )

    def _note_mode(self, rec: Recording, item: MediaItem) -> None:
        """The first chunk of a shot names its prompt's mode (a user prompt's) and when the
        prompt was received."""
        m, p = item.message, item.prompt
        info = rec.shots.get(m["shot_id"])
        if info is None:
            info = rec.shots[m["shot_id"]] = ShotInfo(
                m["shot"], m["shot_id"], "", "continue", datetime.now(UTC), None
            )
        if p is not None:
            info.mode = p.mode
            ago = timedelta(seconds=time.monotonic() - p.received)
            info.prompt_received_at = datetime.now(UTC) - ago

    # -- reading --------------------------------------------------------------------------------
    def get(self, sid: str) -> Recording:
        rec = self.recordings.get(sid)
        if rec is None or rec.deleted or not rec.segments:
            raise NotRecorded(
                "nothing recorded for this session"
                if self.enabled
                else "recording is off on this server"
            )
        return rec

    def timeline(self, rec: Recording) -> dict[str, Any]:
        """The recording's shots: prompt, mode, seq range, times (JSON-ready)."""
        fps = self.cfg.fps
        shots: list[dict[str, Any]] = []
        for seg in rec.segments:
            if shots and shots[-1]["shot_id"] == seg.shot_id:
                entry = shots[-1]
                entry["last_seq"], entry["frames"] = seg.seq, entry["frames"] + seg.frames
            else:
                info = rec.shots.get(seg.shot_id)
                entry = {
                    "shot": seg.shot,
                    "shot_id": seg.shot_id,
                    "prompt": info.prompt if info else "",
                    "mode": info.mode if info else "continue",
                    "first_seq": seg.seq,
                    "last_seq": seg.seq,
                    "first_frame": seg.first_frame,
                    "frames": seg.frames,
                    "started_at": _iso(info.started_at) if info else None,
                    "prompt_received_at": _iso(info.prompt_received_at) if info else None,
                }
                shots.append(entry)
            entry["start"] = round(entry["first_frame"] / fps, 6)
            entry["end"] = round((entry["first_frame"] + entry["frames"]) / fps, 6)
        frames = rec.frames
        return {
            "session_id": rec.session.id,
            "state": rec.state,
            "incomplete_reason": rec.incomplete_reason,
            "caption": rec.caption,
            "fps": fps,
            "width": self.cfg.width,
            "height": self.cfg.height,
            "chunks": len(rec.segments),
            "frames": frames,
            "duration": round(frames / fps, 6),
            "created_at": _iso(rec.created_at),
            "ended_at": _iso(rec.ended_at),
            "end_reason": rec.end_reason,
            "shots": shots,
        }

    def webvtt(self, rec: Recording) -> str:
        """The timeline as WebVTT chapters: one cue per shot, its prompt as the title."""
        lines = ["WEBVTT", ""]
        for i, shot in enumerate(self.timeline(rec)["shots"], 1):
            title = _vtt_text(chapter_title(shot, rec.caption))
            lines += [str(i), f"{_vtt_time(shot['start'])} --> {_vtt_time(shot['end'])}", title, ""]
        return "\n".join(lines)

    async def mp4(self, rec: Recording) -> tuple[int, int, int]:
        """An open file descriptor, the size and the version of the recording as a
        progressive MP4 (the caller closes it): the cached remux if the recording has not
        changed, else a new one. The descriptor stays readable if the file is deleted
        meanwhile; the version names these bytes (a later chunk makes a new one)."""
        while True:
            version = rec.version
            if rec.cache is not None and rec.cache[0] == version:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(rec.cache[1], os.O_RDONLY)
                    return fd, os.fstat(fd).st_size, version
            if rec.remux is None or rec.remux[0] != version:
                fut = asyncio.ensure_future(self._remux(rec, version))
                rec.remux = (version, fut)
            await asyncio.shield(rec.remux[1])
            if rec.deleted:
                raise NotRecorded("the recording was deleted (its retention time passed)")

    async def _remux(self, rec: Recording, version: int) -> None:
        size = rec.size
        chapters = [
            (x["first_frame"], x["frames"], chapter_title(x, rec.caption))
            for x in self.timeline(rec)["shots"]
        ]
        out = rec.folder / "recording.mp4"
        rec.readers += 1
        try:
            loop = asyncio.get_running_loop()
            written = await loop.run_in_executor(
                self.remux_pool, remux, rec.path, size, out, chapters, self.cfg.fps
            )
        except (OSError, ValueError) as exc:
            if not rec.deleted:
                log.error("remux failed", extra={"session_id": rec.session.id, "error": repr(exc)})
            raise NotRecorded(f"the recording could not be remuxed: {exc}") from exc
        finally:
            rec.readers -= 1
            if rec.readers == 0:
                rec.idle.set()
        rec.cache = (version, out, written)

    # -- retention ------------------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        period = max(0.5, min(30.0, self.settings.recording_retention_s / 4))
        while True:
            await asyncio.sleep(period)
            await self.sweep()

    async def sweep(self) -> None:
        """Delete recordings whose session ended more than the retention time ago."""
        now = time.monotonic()
        keep_s = self.settings.recording_retention_s
        for sid, rec in list(self.recordings.items()):
            if rec.ended_mono is not None and now - rec.ended_mono >= keep_s:
                await self._delete(sid, rec)

    async def _delete(self, sid: str, rec: Recording) -> None:
        async with rec.lock:  # after any write under way
            rec.deleted = True
            _close_fd(rec)
            self.recordings.pop(sid, None)
            self.reserved -= rec.size
            await self._io(shutil.rmtree, rec.folder, True)
            log.info("recording deleted", extra={"session_id": sid})

    def _gauges(self):
        kept = [x for x in self.recordings.values() if not x.deleted]
        return [
            gauge("shotstream_recordings", "Recordings kept on disk.", len(kept)),
            gauge(
                "shotstream_recording_bytes",
                "Disk used by recordings: their segments and cached MP4s.",
                sum(x.size + (x.cache[2] if x.cache else 0) for x in kept),
            ),
        ]


# -- file work (on the recording threads) -------------------------------------------------------
def _pwrite_all(fd: int, data: bytes, offset: int, fault: str | None) -> None:
    if fault == "partial":  # TESTS ONLY: half of it lands, then the disk is full
        os.pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    if fault == "disk_full":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _truncate_at(fd: int, offset: int, size: int, keep: int) -> bytes:
    """Cut the file at `offset` (a segment's start); with `keep` > 0, write back that
    segment's first `keep` frames. Returns what was written back."""
    trimmed = trim_segment(os.pread(fd, size, offset), keep) if keep > 0 else b""
    os.ftruncate(fd, offset)
    if trimmed:
        _pwrite_all(fd, trimmed, offset, None)
    return trimmed


class _Prefix(io.RawIOBase):
    """The first `size` bytes of a file: what was whole when a remux began."""

    def __init__(self, path: Path, size: int) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 (closed with this object)
        self.size, self.pos = size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        self.f.seek(self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.f.close()
        super().close()


def remux(src: Path, size: int, dst: Path, chapters: list[tuple[int, int, str]], fps: int) -> int:
    """The first `size` bytes of fragmented MP4 `src` as a progressive MP4 `dst` with the
    index at the front and a chapter per (first frame, frames, title): stream copy, no
    re-encode, timestamps from 0. Returns the size written."""
    tmp = dst.with_name(f"{dst.name}.{secrets.token_hex(4)}.tmp")
    tb = Fraction(1, fps * 1000)
    try:
        with (
            _Prefix(src, size) as inp_file,
            av.open(inp_file, "r", format="mp4") as inp,
            av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out,
        ):
            ins = inp.streams.video[0]
            outs = out.add_stream_from_template(ins)
            out.set_chapters(
                [
                    {
                        "id": i + 1,
                        "start": first * 1000,
                        "end": (first + frames) * 1000,
                        "time_base": tb,
                        "metadata": {"title": title},
                    }
                    for i, (first, frames, title) in enumerate(chapters)
                ]
            )
            offset = None
            for packet in inp.demux(ins):
                if packet.dts is None:  # the demuxer's end-of-stream flush packet
                    continue
                if offset is None:
                    offset = max(0, packet.dts)
                packet.dts -= offset
                if packet.pts is not None:
                    packet.pts -= offset
                packet.stream = outs
                out.mux(packet)
        os.replace(tmp, dst)
        return dst.stat().st_size
    finally:
        tmp.unlink(missing_ok=True)


def chapter_title(shot: dict[str, Any], caption: str) -> str:
    prompt = " ".join((shot["prompt"] or caption).split())
    return f"Shot {shot['shot']}: {prompt}"


def _remove_if_abandoned(folder: Path) -> None:
    """Remove an instance folder whose process is gone (its lock is free)."""
    lock = folder / LOCK
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return  # not one of ours (or being made): leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # a live process holds it
    finally:
        os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("removed recordings of a process that ended", extra={"folder": str(folder)})


def _close_fd(rec: Recording) -> None:
    if rec.fd is not None:
        with contextlib.suppress(OSError):
            os.close(rec.fd)
        rec.fd = None


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _vtt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def _vtt_text(text: str) -> str:
    # A cue's text must not hold "-->" nor markup; a blank line would end the cue.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
