"""H.264 + fMP4 packaging: what ffprobe and a decoder see in the bytes we would stream."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from server.media import (
    NAL_IDR,
    H264Encoder,
    Segment,
    SegmentPackager,
    avc_codec_string,
    decode_frame,
    iter_boxes,
    split_annexb,
    with_decode_time,
)

FPS = 16
HEIGHT, WIDTH = 64, 96
CHUNKS = [9, 12, 12, 9, 12]  # a shot's first chunk is 9 frames, later ones 12

needs_ffprobe = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe not installed")


def moving_frames(n: int, height: int, width: int, start: int) -> np.ndarray:
    """Colour gradient with a bright square that moves right by 3 px per frame."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        t = start + i
        frames[i, ..., 0] = (xx * 255 // width + 4 * t) % 256
        frames[i, ..., 1] = yy * 255 // height
        frames[i, ..., 2] = 128
        x0 = (3 * t) % (width - 16)
        frames[i, 8:24, x0 : x0 + 16] = (250, 240, 20)
    return frames


def ffprobe(path: Path) -> dict:
    """Decode every frame with ffprobe; stream facts plus per-frame pts and key flags."""
    cmd = [
        "ffprobe",
        "-v",
        "error",
        "-count_frames",
        "-of",
        "json",
        "-show_entries",
        "stream=nb_read_frames,codec_name,profile,level,r_frame_rate,width,height:frame=pts_time,key_frame,pict_type",
        str(path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    assert out.stderr == "", out.stderr  # any decode or demux complaint is a failure
    return json.loads(out.stdout)


def decode_rgb(data: bytes) -> list[tuple[float, np.ndarray]]:
    """(pts seconds, RGB frame) of every frame in an fMP4 byte string, decoded by PyAV."""
    with av.open(io.BytesIO(data), format="mp4") as container:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


@dataclass
class Session:
    init: bytes
    segments: list[Segment]
    inputs: list[np.ndarray]
    probe: dict
    mime: str


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    enc = H264Encoder(WIDTH, HEIGHT, FPS)
    init = enc.init_segment()
    inputs, segments, start = [], [], 0
    for n in CHUNKS:
        frames = moving_frames(n, HEIGHT, WIDTH, start)
        inputs.append(frames)
        segments.append(enc.encode_chunk(frames))
        start += n
    assert enc.init_segment() == init  # a reconnect later in the session gets the same init
    path = tmp_path_factory.mktemp("media") / "stream.mp4"
    path.write_bytes(init + b"".join(s.data for s in segments))
    probe = ffprobe(path) if shutil.which("ffprobe") else {}
    return Session(init, segments, inputs, probe, enc.mime)


def child(data: bytes, parent, kind: str):
    """The first child box of `kind` inside box `parent` (or at top level when None)."""
    start, end = (0, len(data)) if parent is None else (parent.payload_start, parent.end)
    if parent is not None and parent.kind in ("stsd",):
        start += 8  # FullBox header + entry_count
    if parent is not None and parent.kind == "avc1":
        start += 78  # VisualSampleEntry fields before its child boxes
    for b in iter_boxes(data, start, end):
        if b.kind == kind:
            return b
    raise AssertionError(f"no {kind} box in {parent.kind if parent else 'top level'}")


def find(data: bytes, *path: str):
    """Descend a path of box types, e.g. find(init, 'moov', 'mvex', 'trex')."""
    node = None
    for kind in path:
        node = child(data, node, kind)
    return node


def full_box_fields(data: bytes, b, fmt: str) -> tuple:
    """Unpack a FullBox payload after its version/flags word."""
    return struct.unpack_from(fmt, data, b.payload_start + 4)


# ------------------------------------------------------------------------ decoded stream


@needs_ffprobe
def test_stream_decodes_every_frame_at_session_fps(session: Session) -> None:
    stream = session.probe["streams"][0]
    total = sum(CHUNKS)
    assert stream["codec_name"] == "h264"
    assert int(stream["nb_read_frames"]) == total
    assert (stream["width"], stream["height"]) == (WIDTH, HEIGHT)
    assert stream["r_frame_rate"] == f"{FPS}/1"
    pts = np.array([float(f["pts_time"]) for f in session.probe["frames"]])
    assert len(pts) == total
    assert pts[0] == 0.0
    np.testing.assert_allclose(np.diff(pts), 1 / FPS, atol=1e-6)


@needs_ffprobe
def test_every_segment_starts_with_an_idr_keyframe(session: Session) -> None:
    frames = session.probe["frames"]
    starts = [s.first_frame for s in session.segments]
    assert starts == list(np.cumsum([0] + CHUNKS[:-1]))
    keys = [i for i, f in enumerate(frames) if f["key_frame"] == 1]
    assert keys == starts  # keyframes exactly at chunk starts: none missing, none wasted
    assert all(frames[i]["pict_type"] == "I" for i in starts)
    assert all(s.keyframe for s in session.segments)


def test_segment_samples_flag_the_idr_as_the_only_sync_sample(session: Session) -> None:
    """Each segment's first sample holds an IDR (NAL type 5, not merely an I-slice) and is the
    one sample flagged sync, so MSE can start or resume at any segment."""
    for seg in session.segments:
        samples = segment_samples(seg.data)
        assert len(samples) == seg.frames
        nal_types = [types for types, _ in samples]
        sync = [flags & 0x00010000 == 0 for _, flags in samples]  # not sample_is_non_sync
        assert NAL_IDR in nal_types[0] and sync[0]
        assert not any(NAL_IDR in t for t in nal_types[1:]) and not any(sync[1:])


def segment_samples(data: bytes) -> list[tuple[list[int], int]]:
    """(NAL types, sample flags) of every sample, walking trun sizes over the mdat payload."""
    trun = find(data, "moof", "traf", "trun")
    count, _ = full_box_fields(data, trun, ">Ii")
    entries = struct.unpack_from(f">{2 * count}I", data, trun.payload_start + 12)
    mdat = find(data, "mdat")
    pos, samples = mdat.payload_start, []
    for size, flags in zip(entries[::2], entries[1::2], strict=True):
        end, types = pos + size, []
        while pos < end:
            (n,) = struct.unpack_from(">I", data, pos)
            types.append(data[pos + 4] & 0x1F)
            pos += 4 + n
        assert pos == end  # sample boundaries fall on NAL boundaries
        samples.append((types, flags))
    assert pos == mdat.end  # the trun accounts for every mdat byte
    return samples


def test_decoded_pixels_match_input(session: Session) -> None:
    decoded = decode_rgb(session.init + b"".join(s.data for s in session.segments))
    sent = np.concatenate(session.inputs)
    assert len(decoded) == len(sent)
    err = np.abs(np.stack([f for _, f in decoded]).astype(np.int16) - sent.astype(np.int16))
    assert err.mean() < 6.0  # lossy, but the same moving picture


def test_late_join_decodes_a_segment_alone(session: Session) -> None:
    """init + segment k (a client joining or resuming at k) gives exactly k's frames."""
    full = decode_rgb(session.init + b"".join(s.data for s in session.segments))
    for k in (1, 3, len(session.segments) - 1):
        seg = session.segments[k]
        alone = decode_rgb(session.init + seg.data)
        assert len(alone) == seg.frames == CHUNKS[k]
        assert alone[0][0] == pytest.approx(seg.pts)  # decode time continues, never restarts
        # An IDR start means no reference to earlier segments: bit-identical pictures.
        for (t, pic), (t_full, pic_full) in zip(
            alone, full[seg.first_frame : seg.first_frame + seg.frames], strict=True
        ):
            assert t == pytest.approx(t_full)
            np.testing.assert_array_equal(pic, pic_full)


def test_a_segment_moved_on_the_timeline_decodes_the_same_pictures_later(session: Session) -> None:
    """with_decode_time rewrites only the tfdt: the samples are the same bytes and decode to
    the same pictures, starting at the new frame."""
    seg = session.segments[2]
    later = seg.first_frame + 7
    moved = with_decode_time(seg.data, later)
    assert decode_frame(seg.data) == seg.first_frame and decode_frame(moved) == later
    assert len(moved) == len(seg.data)
    assert sum(a != b for a, b in zip(moved, seg.data, strict=True)) <= 8  # one 64-bit field
    here, there = decode_rgb(session.init + seg.data), decode_rgb(session.init + moved)
    assert [t for t, _ in there] == pytest.approx([t + 7 / FPS for t, _ in here])
    for (_, a), (_, b) in zip(here, there, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_ffprobe
def test_mime_codec_string_matches_what_ffprobe_reports(session: Session) -> None:
    stream = session.probe["streams"][0]
    codec = session.mime.removeprefix('video/mp4; codecs="').removesuffix('"')
    assert session.mime == f'video/mp4; codecs="{codec}"'
    profile_idc, constraints, level_idc = (int(codec[i : i + 2], 16) for i in (5, 7, 9))
    assert profile_idc == 66 and constraints & 0x40  # Baseline + constraint_set1
    assert stream["profile"] == "Constrained Baseline"
    assert stream["level"] == level_idc


@needs_ffprobe
def test_full_size_chunk_is_constrained_baseline_level_3(tmp_path: Path) -> None:
    height, width = 480, 832
    enc = H264Encoder(width, height, FPS)
    seg = enc.encode_chunk(moving_frames(9, height, width, 0))
    path = tmp_path / "big.mp4"
    path.write_bytes(enc.init_segment() + seg.data)
    probe = ffprobe(path)
    stream = probe["streams"][0]
    assert enc.mime == 'video/mp4; codecs="avc1.42C01E"'  # docs/design/media.md §6
    assert (stream["width"], stream["height"], stream["level"]) == (width, height, 30)
    assert int(stream["nb_read_frames"]) == 9
    assert probe["frames"][0]["key_frame"] == 1


@pytest.mark.parametrize(
    "rgb",
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 50, 30), (0, 0, 0), (255, 255, 255), (128,) * 3],
)
def test_flat_colour_survives_rgb_to_yuv_and_back(rgb: tuple[int, int, int]) -> None:
    """RGB order, BT.709 matrix and limited range agree between encoder and decoder."""
    enc = H264Encoder(WIDTH, HEIGHT, FPS)
    frames = np.empty((9, HEIGHT, WIDTH, 3), np.uint8)
    frames[:] = rgb
    decoded = decode_rgb(enc.init_segment() + enc.encode_chunk(frames).data)
    assert len(decoded) == 9
    mean = np.stack([f for _, f in decoded]).reshape(-1, 3).mean(0)
    assert np.abs(mean - np.array(rgb)).max() < 4.0, mean


# --------------------------------------------------------------------------- box layout


def test_init_segment_boxes(session: Session) -> None:
    init = session.init
    assert [b.kind for b in iter_boxes(init)] == ["ftyp", "moov"]
    mdhd = find(init, "moov", "trak", "mdia", "mdhd")
    assert full_box_fields(init, mdhd, ">III")[2] == FPS * 1000  # timescale
    trex = find(init, "moov", "mvex", "trex")
    assert full_box_fields(init, trex, ">II")[0] == 1  # track 1
    avcc = find(init, "moov", "trak", "mdia", "minf", "stbl", "stsd", "avc1", "avcC")
    record = init[avcc.payload_start : avcc.end]
    sps_len = struct.unpack_from(">H", record, 6)[0]
    sps = record[8 : 8 + sps_len]
    assert record[1:4] == sps[1:4]
    assert session.mime.endswith(f'"{avc_codec_string(sps)}"')


def test_segments_continue_decode_time_and_sequence(session: Session) -> None:
    for k, seg in enumerate(session.segments):
        assert [b.kind for b in iter_boxes(seg.data)] == ["moof", "mdat"]
        mfhd = find(seg.data, "moof", "mfhd")
        assert full_box_fields(seg.data, mfhd, ">I")[0] == k + 1
        tfdt = find(seg.data, "moof", "traf", "tfdt")
        assert seg.data[tfdt.payload_start] == 1  # 64-bit decode time: never wraps
        assert full_box_fields(seg.data, tfdt, ">Q")[0] == seg.first_frame * 1000
        trun = find(seg.data, "moof", "traf", "trun")
        count, offset = full_box_fields(seg.data, trun, ">Ii")
        assert count == seg.frames
        assert offset == find(seg.data, "mdat").payload_start  # data offset from moof start
        assert seg.pts == pytest.approx(seg.first_frame / FPS)
        assert seg.duration == pytest.approx(seg.frames / FPS)


# ------------------------------------------------------------------------ inputs, helpers


def test_torch_frames_encode_like_numpy() -> None:
    torch = pytest.importorskip("torch")
    frames = moving_frames(9, HEIGHT, WIDTH, 0)
    from_numpy = H264Encoder(WIDTH, HEIGHT, FPS).encode_chunk(frames)
    from_torch = H264Encoder(WIDTH, HEIGHT, FPS).encode_chunk(torch.from_numpy(frames))
    assert from_torch.data == from_numpy.data


def test_bad_frames_are_rejected_before_encoding() -> None:
    enc = H264Encoder(WIDTH, HEIGHT, FPS)
    with pytest.raises(ValueError, match="frames must be"):
        enc.encode_chunk(np.zeros((3, HEIGHT, WIDTH + 2, 3), np.uint8))
    with pytest.raises(ValueError, match="frames must be"):
        enc.encode_chunk(np.zeros((0, HEIGHT, WIDTH, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        enc.encode_chunk(np.zeros((3, HEIGHT, WIDTH, 3), np.float32))
    # Nothing was consumed: the next good chunk still starts the timeline at frame 0.
    assert enc.encode_chunk(moving_frames(9, HEIGHT, WIDTH, 0)).first_frame == 0
    with pytest.raises(ValueError, match="even"):
        H264Encoder(95, 64, FPS)


def test_closed_encoder_refuses_work() -> None:
    enc = H264Encoder(WIDTH, HEIGHT, FPS)
    enc.encode_chunk(moving_frames(9, HEIGHT, WIDTH, 0))
    enc.close()
    with pytest.raises(RuntimeError, match="closed"):
        enc.encode_chunk(moving_frames(12, HEIGHT, WIDTH, 9))
    assert enc.init_segment()  # still answerable: a late reconnect needs no encoder


def test_split_annexb_handles_both_start_codes() -> None:
    stream = b"\x00\x00\x00\x01\x67\x42\x00\x00\x01\x68\xce\x00\x00\x00\x01\x65\x88\x80\x00"
    assert split_annexb(stream) == [b"\x67\x42", b"\x68\xce", b"\x65\x88\x80"]
    assert split_annexb(b"") == []


def test_packager_rejects_missing_parameter_sets() -> None:
    with pytest.raises(ValueError):
        SegmentPackager(b"\x68\xce", b"\x67\x42\xc0\x1e", WIDTH, HEIGHT, FPS)


def test_iter_boxes_rejects_a_truncated_box() -> None:
    data = struct.pack(">I4s", 100, b"moof") + bytes(10)
    with pytest.raises(ValueError, match="bad size"):
        list(iter_boxes(data))


@needs_ffprobe
def test_a_rewound_encoder_replaces_the_withdrawn_tail(tmp_path: Path) -> None:
    """Three chunks, then a rewind to the second's start and a different chunk: the stream
    made of the first chunk and the new one decodes cleanly, with continuous timestamps,
    the new chunk's pixels where the withdrawn ones were (what a player that removed the
    withdrawn media plays)."""
    enc = H264Encoder(WIDTH, HEIGHT, FPS)
    first = enc.encode_chunk(moving_frames(9, HEIGHT, WIDTH, 0))
    enc.encode_chunk(moving_frames(12, HEIGHT, WIDTH, 9))
    enc.encode_chunk(moving_frames(12, HEIGHT, WIDTH, 21))
    enc.rewind(first.frames)
    new_frames = np.full((9, HEIGHT, WIDTH, 3), (200, 40, 40), np.uint8)  # a new shot: red
    new = enc.encode_chunk(new_frames)
    assert (new.first_frame, new.pts) == (9, 9 / FPS) and new.keyframe
    path = tmp_path / "after-cut.mp4"
    path.write_bytes(enc.init_segment() + first.data + new.data)
    probe = ffprobe(path)
    assert int(probe["streams"][0]["nb_read_frames"]) == 18
    times = [float(f["pts_time"]) for f in probe["frames"]]
    assert times == [i / FPS for i in range(18)]
    decoded = decode_rgb(path.read_bytes())
    assert np.abs(decoded[12][1].astype(int) - (200, 40, 40)).max() < 12
    with pytest.raises(ValueError):
        enc.rewind(100)
