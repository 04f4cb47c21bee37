"""Per-session H.264 encoding and fragmented-MP4 packaging.

`H264Encoder` turns each generated chunk of RGB frames into one fMP4 media segment
(`moof` + `mdat`) that starts with an IDR frame, so a client can join, resume or recover
at any segment. The boxes are written here (`SegmentPackager`) rather than by FFmpeg's mp4
muxer, which holds a fragment back until the next keyframe: one whole chunk of latency.

Time: the track timescale is `fps * 1000`, so one frame lasts exactly 1000 ticks at any
integer fps and decode times stay exact integers forever (`tfdt` is 64-bit).
Colour: RGB is converted to BT.709 limited-range yuv420p and the SPS signals BT.709, so
browsers and FFmpeg convert back with the same matrix.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import av
import numpy as np
from av.codec.context import Flags
from av.video.frame import PictureType
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter

TICKS_PER_FRAME = 1000  # timescale = fps * TICKS_PER_FRAME; see the module docstring

# H.264 NAL unit types (ITU-T H.264 table 7-1) that packaging cares about.
NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8

# ISO/IEC 14496-12 sample flags: a sync sample depends on nothing; any other sample
# depends on earlier ones and is marked non-sync.
SAMPLE_FLAGS_SYNC = 0x02000000
SAMPLE_FLAGS_NON_SYNC = 0x01010000

_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


# --------------------------------------------------------------------------- H.264 bits


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex B byte stream (00 00 01 / 00 00 00 01 start codes) into NAL units."""
    nals: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt < 0 else nxt
        # A NAL never ends in a zero byte, so zeros before the next start code belong to
        # that start code (4-byte form) or are trailing_zero_8bits.
        nal = data[begin:end].rstrip(b"\x00")
        if nal:
            nals.append(nal)
        start = nxt
    return nals


def nal_type(nal: bytes) -> int:
    """The nal_unit_type of one NAL unit (without start code or length prefix)."""
    return nal[0] & 0x1F


def avc_codec_string(sps: bytes) -> str:
    """RFC 6381 codec string `avc1.PPCCLL` read from an SPS NAL unit.

    profile_idc, the constraint flags byte and level_idc are the three bytes after the NAL
    header; they can never hold an emulation-prevention byte because profile_idc != 0.
    """
    if len(sps) < 4 or nal_type(sps) != NAL_SPS:
        raise ValueError("not an SPS NAL unit")
    return f"avc1.{sps[1]:02X}{sps[2]:02X}{sps[3]:02X}"


# ------------------------------------------------------------------------------- boxes


def box(kind: bytes, *payload: bytes) -> bytes:
    """One ISO BMFF box: 32-bit size, 4-character type, payload."""
    size = 8 + sum(len(p) for p in payload)
    return struct.pack(">I4s", size, kind) + b"".join(payload)


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A box with the version byte and 24-bit flags of a FullBox."""
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


class Box(NamedTuple):
    """Where one box sits in a buffer: `data[start:end]` is the whole box."""

    kind: str
    start: int
    end: int
    header: int  # bytes of size/type header; the payload starts at start + header

    @property
    def payload_start(self) -> int:
        return self.start + self.header


def iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """Iterate the boxes laid side by side in `data[start:end]` (no descent into children).

    Raises ValueError on a truncated or malformed box header, so tests catch bad sizes.
    """
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"truncated box header at {pos}")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if end - pos < 16:
                raise ValueError(f"truncated largesize box header at {pos}")
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} has bad size {size}")
        yield Box(kind.decode("latin-1"), pos, pos + size, header)
        pos += size


class Sample(NamedTuple):
    """One encoded frame in AVC (length-prefixed) form."""

    data: bytes
    sync: bool


# ------------------------------------------------------------------------- packaging


class SegmentPackager:
    """Writes the fMP4 init segment and one media segment per chunk for a single AVC track.

    Owns the fragment sequence number and the running decode time, so decode times continue
    across segments and connections; the init segment never changes.
    """

    TRACK_ID = 1

    def __init__(self, sps: bytes, pps: bytes, width: int, height: int, fps: int) -> None:
        if nal_type(sps) != NAL_SPS or nal_type(pps) != NAL_PPS:
            raise ValueError("need one SPS and one PPS NAL unit")
        if sps[1] in (100, 110, 122, 144):
            # avcC of High profiles carries extra chroma/bit-depth fields we do not write.
            raise ValueError(f"profile_idc {sps[1]} needs an extended avcC; use baseline/main")
        self.sps, self.pps = sps, pps
        self.width, self.height, self.fps = width, height, fps
        self.timescale = fps * TICKS_PER_FRAME
        self.codec = avc_codec_string(sps)
        self.mime = f'video/mp4; codecs="{self.codec}"'
        self.sequence_number = 0  # mfhd counts from 1; incremented before each fragment
        self.next_frame = 0  # decode time of the next segment, in frames
        self._init = self._build_init()

    def init_segment(self) -> bytes:
        """`ftyp` + `moov` with `mvex`: the same bytes for every connection of the session."""
        return self._init

    def media_segment(self, samples: Sequence[Sample]) -> bytes:
        """`moof` + `mdat` for consecutive frames; decode time continues from the last one."""
        if not samples:
            raise ValueError("a media segment needs at least one sample")
        self.sequence_number += 1
        base_time = self.next_frame * TICKS_PER_FRAME
        self.next_frame += len(samples)

        # tfhd: sample positions are relative to this moof; every frame lasts one frame.
        tfhd = full_box(
            b"tfhd", 0, 0x020000 | 0x000008, struct.pack(">II", self.TRACK_ID, TICKS_PER_FRAME)
        )
        tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time))
        # trun: data offset, then per-sample size and flags (sync marks every IDR).
        entries = b"".join(
            struct.pack(">II", len(s.data), SAMPLE_FLAGS_SYNC if s.sync else SAMPLE_FLAGS_NON_SYNC)
            for s in samples
        )
        trun_size = 8 + 4 + 4 + 4 + len(entries)
        mfhd = full_box(b"mfhd", 0, 0, struct.pack(">I", self.sequence_number))
        traf_size = 8 + len(tfhd) + len(tfdt) + trun_size
        moof_size = 8 + len(mfhd) + traf_size
        data_offset = moof_size + 8  # first sample byte, after the mdat header
        trun = full_box(
            b"trun",
            0,
            0x000001 | 0x000200 | 0x000400,
            struct.pack(">Ii", len(samples), data_offset),
            entries,
        )
        moof = box(b"moof", mfhd, box(b"traf", tfhd, tfdt, trun))
        assert len(moof) == moof_size
        return moof + box(b"mdat", *(s.data for s in samples))

    def _build_init(self) -> bytes:
        w, h, ts, track = self.width, self.height, self.timescale, self.TRACK_ID
        ftyp = box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso6", b"avc1", b"mp41")
        # Times and durations are 0: a fragmented file's duration lives in its fragments.
        # mvhd: times, timescale, duration, rate 1.0, volume 1.0, matrix, next_track_ID.
        mvhd = full_box(
            b"mvhd",
            0,
            0,
            struct.pack(">IIIIIH10x36s24xI", 0, 0, ts, 0, 0x10000, 0x100, _MATRIX, track + 1),
        )
        # tkhd (enabled | in movie): times, track_ID, duration, layer/group/volume 0, size.
        tkhd = full_box(
            b"tkhd",
            0,
            0x3,
            struct.pack(">IIIII8x8x36sII", 0, 0, track, 0, 0, _MATRIX, w << 16, h << 16),
        )
        mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, ts, 0, 0x55C4, 0))  # "und"
        hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"vide"), b"VideoHandler\x00")
        vmhd = full_box(b"vmhd", 0, 1, bytes(8))
        url = full_box(b"url ", 0, 1)  # flag 1: media data is in this file
        dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), url))
        sps, pps = self.sps, self.pps
        # avcC: version 1, profile/compat/level from the SPS, 4-byte NAL lengths, 1 SPS, 1 PPS.
        avcc = box(
            b"avcC",
            struct.pack(">5BBH", 1, sps[1], sps[2], sps[3], 0xFF, 0xE1, len(sps)),
            sps,
            struct.pack(">BH", 1, len(pps)),
            pps,
        )
        # avc1: data_reference_index 1, size, 72 dpi, 1 frame per sample, depth 24.
        avc1 = box(
            b"avc1",
            struct.pack(">6xH16xHHIIIH32xHh", 1, w, h, 0x480000, 0x480000, 0, 1, 0x18, -1),
            avcc,
        )
        stbl = box(
            b"stbl",
            full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
            # Empty sample tables: every sample lives in a fragment.
            full_box(b"stts", 0, 0, struct.pack(">I", 0)),
            full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
            full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
            full_box(b"stco", 0, 0, struct.pack(">I", 0)),
        )
        trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", vmhd, dinf, stbl)))
        trex = full_box(b"trex", 0, 0, struct.pack(">IIIII", track, 1, 0, 0, 0))
        return ftyp + box(b"moov", mvhd, trak, box(b"mvex", trex))


# ---------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class Segment:
    """One chunk's media segment and where it sits on the session's timeline."""

    data: bytes
    first_frame: int  # index of its first frame in the session, from 0
    frames: int
    pts: float  # seconds
    duration: float  # seconds
    keyframe: bool  # first sample is an IDR frame (always, unless the encoder misbehaves)


def _top_boxes(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """The (start, end) of each top-level box between `start` and `end`, by type."""
    out, pos = {}, start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size < 8 or pos + size > end:
            raise ValueError(f"a malformed {kind!r} box")
        out[kind] = (pos, pos + size)
        pos += size
    return out


def trim_segment(data: bytes, keep: int) -> bytes:
    """A media segment (`moof` with one `traf` and a `trun` of per-sample sizes, then
    `mdat`, as the server writes them) cut to its first `keep` samples: the frames before
    a cut. The first sample is the IDR the rest depends on, so the kept ones decode."""
    top = _top_boxes(data, 0, len(data))
    m0, m1 = top[b"moof"]
    moof = _top_boxes(data, m0 + 8, m1)
    t0, t1 = moof[b"traf"]
    traf = _top_boxes(data, t0 + 8, t1)
    r0, r1 = traf[b"trun"]
    flags = int.from_bytes(data[r0 + 9 : r0 + 12], "big")
    count = struct.unpack_from(">I", data, r0 + 12)[0]
    if flags != 0x000601 or not 0 < keep <= count:
        raise ValueError(f"cannot keep {keep} of {count} samples (trun flags {flags:#x})")
    entries = data[r0 + 20 : r0 + 20 + 8 * count]
    sizes = [struct.unpack_from(">I", entries, 8 * i)[0] for i in range(count)]
    mdat0 = top[b"mdat"][0]
    samples = data[mdat0 + 8 : mdat0 + 8 + sum(sizes[:keep])]
    shrink = 8 * (count - keep)
    moof_size = (m1 - m0) - shrink
    trun = (
        struct.pack(">I4s", (r1 - r0) - shrink, b"trun")
        + data[r0 + 8 : r0 + 12]
        + struct.pack(">Ii", keep, moof_size + 8)
        + entries[: 8 * keep]
    )
    traf_box = (
        struct.pack(">I4s", (t1 - t0) - shrink, b"traf") + data[t0 + 8 : r0] + trun + data[r1:t1]
    )
    moof_box = struct.pack(">I4s", moof_size, b"moof") + data[m0 + 8 : t0] + traf_box + data[t1:m1]
    return moof_box + struct.pack(">I4s", 8 + len(samples), b"mdat") + samples


def decode_frame(data: bytes) -> int:
    """The decode time of a media segment's first frame (its `tfdt`), in frames."""
    t0 = _tfdt_value(data)
    return struct.unpack_from(">Q", data, t0)[0] // TICKS_PER_FRAME


def with_decode_time(data: bytes, first_frame: int) -> bytes:
    """A copy of a media segment that starts at `first_frame` of the stream (its `tfdt`
    rewritten; the samples are untouched): the same video, placed later on the timeline."""
    t0 = _tfdt_value(data)
    return data[:t0] + struct.pack(">Q", first_frame * TICKS_PER_FRAME) + data[t0 + 8 :]


def _tfdt_value(data: bytes) -> int:
    """Offset of the 64-bit base media decode time in a segment as the server writes them."""
    m0, m1 = _top_boxes(data, 0, len(data))[b"moof"]
    t0, t1 = _top_boxes(data, m0 + 8, m1)[b"traf"]
    d0, d1 = _top_boxes(data, t0 + 8, t1)[b"tfdt"]
    if data[d0 + 8] != 1 or d1 - d0 != 20:
        raise ValueError("a tfdt that is not version 1 (64-bit)")
    return d0 + 12


class H264Encoder:
    """One session's libx264 encoder and fMP4 packager: RGB chunks in, media segments out.

    Constrained Baseline, no B-frames, zero-latency: every frame of a chunk leaves the
    encoder while the chunk is encoded. Not thread-safe; call from one thread at a time
    (the server runs it off the event loop).
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        *,
        crf: float = 23.0,
        preset: str = "ultrafast",
        threads: int = 1,
    ) -> None:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"yuv420p needs even positive sizes, got {width}x{height}")
        if int(fps) != fps or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps}")
        self.width, self.height, self.fps = width, height, int(fps)
        ctx: Any = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.framerate = Fraction(self.fps)
        ctx.time_base = Fraction(1, self.fps)
        ctx.max_b_frames = 0
        ctx.gop_size = 1 << 30  # keyframes only where we force them (chunk starts)
        # One thread per encoder: sessions already run in parallel, and frame threads would
        # delay output by several frames.
        ctx.thread_count = threads
        ctx.flags |= Flags.global_header  # SPS/PPS go to extradata (avcC), not in-band
        # Signal BT.709 limited range in the SPS VUI to match our RGB -> YUV conversion.
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # AVCOL_*_BT709
        ctx.color_range = ColorRange.MPEG
        ctx.options = {
            "preset": preset,
            "tune": "zerolatency",
            "profile": "baseline",
            "crf": str(crf),
            "forced-idr": "1",  # a forced I picture is an IDR, not a recovery-point I-slice
            "x264-params": "scenecut=0",
        }
        ctx.open()
        self._ctx: Any = ctx
        self._reformatter: VideoReformatter | None = VideoReformatter()

        params = split_annexb(ctx.extradata or b"")
        sps = next((n for n in params if nal_type(n) == NAL_SPS), None)
        pps = next((n for n in params if nal_type(n) == NAL_PPS), None)
        if sps is None or pps is None:
            raise RuntimeError("libx264 produced no SPS/PPS in extradata")
        self.packager = SegmentPackager(sps, pps, width, height, self.fps)
        self.frames_encoded = 0  # the session's timeline: frame index of the next chunk
        self._codec_pts = 0  # what libx264 is fed: always increasing, even after a rewind

    @property
    def mime(self) -> str:
        """MIME type with the codec string read from our SPS, for MediaSource.addSourceBuffer."""
        return self.packager.mime

    @property
    def codec(self) -> str:
        return self.packager.codec

    def init_segment(self) -> bytes:
        """The fMP4 initialization segment; identical for every (re)connection."""
        return self.packager.init_segment()

    def encode_chunk(self, frames: Any) -> Segment:
        """Encode one chunk (n, H, W, 3) uint8 RGB (numpy or CPU/GPU torch) to one segment."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("encoder is closed")
        reformatter = self._reformatter
        assert reformatter is not None
        array = _as_rgb_array(frames, self.height, self.width)
        samples: list[Sample] = []
        first = self.frames_encoded
        codec_first = self._codec_pts
        for i in range(array.shape[0]):
            rgb = av.VideoFrame.from_numpy_buffer(array[i], format="rgb24")
            yuv = reformatter.reformat(
                rgb,
                format="yuv420p",
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
            )
            yuv.pts = codec_first + i
            # Each chunk starts with an IDR so a client can start decoding at any segment.
            yuv.pict_type = PictureType.I if i == 0 else PictureType.NONE
            for packet in ctx.encode(yuv):
                samples.append(self._to_sample(packet, codec_first + len(samples)))
        if len(samples) != array.shape[0]:
            # Zero-latency settings promise one packet per frame; a delayed frame would land
            # in the next segment with the wrong timing, so fail loudly instead.
            raise RuntimeError(f"encoder returned {len(samples)} of {array.shape[0]} frames")
        if not samples[0].sync:
            raise RuntimeError("encoder did not start the chunk with an IDR frame")
        self.frames_encoded += len(samples)
        self._codec_pts += len(samples)
        data = self.packager.media_segment(samples)
        return Segment(
            data=data,
            first_frame=first,
            frames=len(samples),
            pts=first / self.fps,
            duration=len(samples) / self.fps,
            keyframe=samples[0].sync,
        )

    def rewind(self, frame: int) -> None:
        """Continue the timeline at `frame` (<= where it is): the next segment's decode time
        starts there, replacing segments from that frame on (chunks withdrawn by a cut).
        Every segment starts with an IDR, so nothing after the rewind depends on what was
        withdrawn; libx264 itself keeps counting up."""
        if not 0 <= frame <= self.frames_encoded:
            raise ValueError(f"cannot rewind to frame {frame}; at {self.frames_encoded}")
        self.frames_encoded = frame
        self.packager.next_frame = frame

    def close(self) -> None:
        """Free the encoder's native state now rather than at garbage collection."""
        self._ctx = None
        self._reformatter = None

    def _to_sample(self, packet: av.Packet, expected_pts: int) -> Sample:
        if packet.pts != expected_pts or packet.dts != expected_pts:
            # No B-frames means decode order == display order; anything else would need
            # composition offsets this packager does not write.
            raise RuntimeError(
                f"unexpected packet timing pts={packet.pts} dts={packet.dts}, expected {expected_pts}"
            )
        nals = split_annexb(bytes(packet))
        data = b"".join(struct.pack(">I", len(n)) + n for n in nals)
        return Sample(data, any(nal_type(n) == NAL_IDR for n in nals))


def _as_rgb_array(frames: Any, height: int, width: int) -> np.ndarray:
    """A C-contiguous (n, H, W, 3) uint8 view/copy of numpy or torch frames."""
    if hasattr(frames, "detach"):  # torch tensor; avoid importing torch here
        frames = frames.detach().cpu().numpy()
    array = np.ascontiguousarray(frames)
    if array.dtype != np.uint8:
        raise TypeError(f"frames must be uint8 RGB, got {array.dtype}")
    if array.ndim != 4 or array.shape[1:] != (height, width, 3) or array.shape[0] == 0:
        raise ValueError(f"frames must be (n>0, {height}, {width}, 3), got {array.shape}")
    return array
