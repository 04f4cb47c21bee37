"""Writing the stream to a file: the fMP4 as received, and a remux to a progressive MP4."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


class FragmentWriter:
    """Appends the stream's fMP4 to a binary file: the init segment once, then each media
    segment. Segments after a reconnect continue the decode times, so they append as is."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.init: bytes | None = None
        self.segments = 0
        self.bytes = 0

    def write_init(self, data: bytes) -> None:
        """Write the init segment; a repeat (after a reconnect) is skipped when identical."""
        if self.init == data:
            return
        # A different one would mean new codec parameters; fMP4 readers accept a new init
        # before the segments it describes, so write it rather than lose the video.
        self.init = data
        self._write(data)

    def write_segment(self, data: bytes) -> None:
        """Write one media segment (moof + mdat)."""
        if self.init is None:
            raise ValueError("a media segment before the init segment")
        self.segments += 1
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
        with av.open(str(src)) as inp, av.open(str(tmp), "w", format="mp4",
                                              options={"movflags": "+faststart"}) as out:  # fmt: skip
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
