"""Writing the stream to a file: the fMP4 as received, and a remux to a progressive MP4."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import BinaryIO, NamedTuple

KEEP_SEGMENTS = 64  # segments remembered for a withdrawal (a cut reaches back seconds, not minutes)


class _Written(NamedTuple):
    offset: int  # where the segment starts in the file
    first_frame: int
    frames: int
    data: bytes


class FragmentWriter:
    """Appends the stream's fMP4 to a binary file: the init segment once, then each media
    segment. Segments after a reconnect continue the decode times, so they append as is.
    On a seekable file a cut's withdrawal (`withdraw`) cuts the file back to the cut point,
    so the file holds what a viewer saw."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.init: bytes | None = None
        self.segments = 0
        self.bytes = 0
        self._recent: deque[_Written] = deque(maxlen=KEEP_SEGMENTS)

    @property
    def can_withdraw(self) -> bool:
        try:
            return self.out.seekable()
        except (AttributeError, ValueError):
            return False

    def withdraw(self, cut_frame: int) -> int:
        """Remove the video from frame `cut_frame` on (whole segments after it; the segment
        it falls inside keeps its first frames). Returns the frames removed."""
        if not self.can_withdraw:
            raise ValueError("cannot withdraw video already written to a pipe")
        gone = [w for w in self._recent if w.first_frame + w.frames > cut_frame]
        if not gone:
            return 0
        first = gone[0]
        removed = sum(w.frames for w in gone)
        self.out.seek(first.offset)
        self.out.truncate()
        self.bytes = first.offset
        for w in gone:
            self._recent.remove(w)
        self.segments -= len(gone)
        keep = cut_frame - first.first_frame
        if keep > 0:
            from server.media import trim_segment  # PyAV and numpy: imported when needed

            self.write_segment(trim_segment(first.data, keep), first.first_frame, keep)
            removed -= keep
        return removed

    def write_init(self, data: bytes) -> None:
        """Write the init segment; a repeat (after a reconnect) is skipped when identical."""
        if self.init == data:
            return
        # A different one would mean new codec parameters; fMP4 readers accept a new init
        # before the segments it describes, so write it rather than lose the video.
        self.init = data
        self._write(data)

    def write_segment(self, data: bytes, first_frame: int = 0, frames: int = 0) -> None:
        """Write one media segment (moof + mdat), starting at `first_frame` of the stream."""
        if self.init is None:
            raise ValueError("a media segment before the init segment")
        self.segments += 1
        self._recent.append(_Written(self.bytes, first_frame, frames, data))
        self._write(data)

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()  # a pipe reader (ffplay, mpv) should see each chunk at once
        self.bytes += len(data)


def remux_faststart(src: Path, dst: Path) -> int:
    """Copy the video of a fragmented MP4 into a progressive MP4 with the index first
    (`+faststart`), without re-encoding, starting at time 0 (a stream joined late starts
    at its first chunk's decode time); returns the packets written."""
    import av  # PyAV is only needed here; importing it costs a moment

    tmp = dst.with_name(dst.name + ".remux")
    packets, offset = 0, None
    try:
        with (
            av.open(str(src)) as inp,
            av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out,
        ):
            ins = inp.streams.video[0]
            outs = out.add_stream_from_template(ins)
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
                packets += 1
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return packets
