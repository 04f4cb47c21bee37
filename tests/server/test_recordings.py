"""Recordings (docs/design/protocol.md §16) against real servers (tiny preset, CPU): the
MP4 a session's owner or a viewer downloads is a standard file (ffprobe, ffmpeg) holding
every frame the owner was sent and kept, after an instant cut too, with the right duration
and a chapter per shot; the timeline says the same in JSON and WebVTT; a full disk, a write
that fails half-way and the disk budget stop the recording and nothing else; a retention
sweep deletes it while a download goes on; a crashed process's recordings are removed at
the next start."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from clients.media import FragmentWriter
from server.media import iter_boxes
from tests.support.server import ServerProcess, StreamClient

FPS = 16
GLOBAL = "a red circle on a blue background"
FIRST = "wide shot, the circle moves left"
CUT = "close-up shot, the circle turns green"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec")
    srv = ServerProcess(
        tmp,
        chunks_per_shot=4,
        max_sessions=3,
        realtime_margin=50,
        max_sessions_per_client=8,
        fault_injection=True,
        recordings_dir=tmp / "recordings",
        recording_retention_s=3,
        stream_send_buffer_bytes=16384,
    ).wait_ready()
    srv.recordings = tmp / "recordings"
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Exception in ASGI application" not in srv.log()
    assert not any(srv.recordings.iterdir()), list(srv.recordings.iterdir())  # removed at exit


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def get(server, sid: str, what: str, token: str) -> httpx.Response:
    return httpx.get(f"{server.base}/v1/sessions/{sid}/{what}", headers=auth(token), timeout=60)


def probe(path: Path) -> dict:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_chapters",
            "-show_format",
            "-show_streams",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr == "", out.stderr
    return json.loads(out.stdout)


def video_stream(info: dict) -> dict:
    (v,) = [s for s in info["streams"] if s["codec_type"] == "video"]
    return v


def decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), format="mp4") as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def ffmpeg_decodes(path: Path) -> None:
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def ranges_are_served(server, sid: str, token: str, whole: httpx.Response) -> None:
    """One byte range is answered 206 with exactly those bytes (players seek, downloads
    resume); a range past the end 416; an If-Range naming other bytes gets the whole file;
    a header that is not one bytes range is ignored; HEAD gives the headers alone."""
    body, size, etag = whole.content, len(whole.content), whole.headers["etag"]
    assert whole.headers["accept-ranges"] == "bytes" and etag
    url = f"{server.base}/v1/sessions/{sid}/recording.mp4"

    def ask(**headers: str) -> httpx.Response:
        return httpx.get(url, headers={**auth(token), **headers}, timeout=60)

    for spec, (a, b) in {
        "bytes=0-99": (0, 99),
        f"bytes={size - 10}-": (size - 10, size - 1),
        "bytes=-7": (size - 7, size - 1),
        f"bytes=100-{size + 500}": (100, size - 1),
    }.items():
        r = ask(Range=spec)
        assert r.status_code == 206, (spec, r.status_code)
        assert r.headers["content-range"] == f"bytes {a}-{b}/{size}", spec
        assert r.content == body[a : b + 1], spec
    r = ask(Range=f"bytes={size}-")
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert ask(Range="bytes=0-1", **{"If-Range": etag}).status_code == 206
    stale = ask(Range="bytes=0-1", **{"If-Range": '"older"'})
    assert stale.status_code == 200 and stale.content == body
    for ignored in ("bytes=0-1,5-9", "items=0-3", "bytes=9-2"):
        r = ask(Range=ignored)
        assert r.status_code == 200 and r.content == body, ignored
    head = httpx.head(url, headers=auth(token), timeout=60)  # the headers alone
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(size) and head.headers["etag"] == etag
    head = httpx.head(url, headers={**auth(token), "Range": "bytes=-7"}, timeout=60)
    assert (
        head.status_code == 206
        and head.headers["content-range"] == f"bytes {size - 7}-{size - 1}/{size}"
    )


def instance_folder(server) -> Path:
    (folder,) = [p for p in server.recordings.iterdir() if p.is_dir()]
    return folder


def test_the_recording_is_a_standard_mp4_of_what_the_owner_saw_with_a_chapter_per_shot(
    server, tmp_path
):
    d = server.create(prompt=GLOBAL, shots=[FIRST], seed=11)
    sid = d["session_id"]
    link = httpx.post(
        f"{server.base}/v1/sessions/{sid}/viewers", headers=auth(d["token"]), timeout=30
    ).json()

    async def go():
        owner = StreamClient(f"{d['stream_url']}?token={d['token']}&features=withdraw", None)
        viewer = StreamClient(f"{link['stream_url']}?token={link['token']}&features=withdraw", None)
        await owner.__aenter__()
        await viewer.__aenter__()
        await owner.chunks(3)
        # a cut at the start of the video: the owner holds unplayed chunks past it
        await owner.send({"type": "playhead", "pts": 0.1})
        await owner.send({"type": "prompt", "prompt": CUT, "mode": "cut"})
        ack = await owner.until(lambda m: m["type"] == "prompt_ack")
        target = ack["starts_at_seq"] + 5  # into the shot after the cut's, too
        await asyncio.gather(
            *(
                c.until(lambda m: m["type"] == "chunk" and m["seq"] >= target)
                for c in (owner, viewer)
            )
        )
        mid = await asyncio.to_thread(get, server, sid, "recording.mp4", d["token"])
        await owner.send({"type": "stop"})
        return ack, mid, await owner.closed(), await viewer.closed()

    ack, mid, owner, viewer = asyncio.run(asyncio.wait_for(go(), 180))
    withdraws = owner.of("withdraw")
    assert len(withdraws) == 1 and withdraws[0]["seqs"], withdraws  # the cut withdrew video

    # what the owner's player ended with: its segments, cut back as the withdraw said
    held = io.BytesIO()
    writer = FragmentWriter(held)
    writer.write_init(owner.init)
    cut_at = owner.messages.index(withdraws[0])
    before = [c for c in owner.chunks if owner.messages.index(c.message) < cut_at]
    after = [c for c in owner.chunks if owner.messages.index(c.message) > cut_at]
    for c in before:
        writer.write_segment(c.data, c.message["first_frame"], c.message["frames"])
    writer.withdraw(round(withdraws[0]["pts"] * FPS))
    for c in after:
        writer.write_segment(c.data, c.message["first_frame"], c.message["frames"])
    seen = decode(held.getvalue())

    # the recording: downloaded with the watch link's token after the end
    r = get(server, sid, "recording.mp4", link["token"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.headers["x-recording-state"] == "complete"
    path = tmp_path / "recording.mp4"
    path.write_bytes(r.content)
    ranges_are_served(server, sid, d["token"], r)
    kinds = [b.kind for b in iter_boxes(r.content)]
    assert kinds.index("moov") < kinds.index("mdat") and "moof" not in kinds  # index first
    info = probe(path)
    v = video_stream(info)
    assert int(v["nb_read_frames"]) == len(seen)
    assert abs(float(info["format"]["duration"]) - len(seen) / FPS) < 0.01
    ffmpeg_decodes(path)
    assert np.array_equal(decode(r.content), seen)  # every frame, as the owner saw it

    # the timeline: shots, prompts, modes, seq ranges and times; chapters the same
    tl = get(server, sid, "timeline.json", d["token"]).json()
    assert tl["state"] == "complete" and tl["incomplete_reason"] is None
    assert tl["frames"] == len(seen) and tl["caption"] == GLOBAL and tl["end_reason"] == "stopped"
    shots = tl["shots"]
    assert shots[0]["prompt"] == FIRST and shots[0]["mode"] == "queue" and shots[0]["start"] == 0
    cut_shot = next(x for x in shots if x["shot_id"] == ack["shot_id"])
    assert cut_shot["prompt"] == CUT and cut_shot["mode"] == "cut"
    assert cut_shot["first_seq"] == ack["starts_at_seq"]
    assert abs(cut_shot["start"] - withdraws[0]["pts"]) < 1e-6
    assert shots[-1]["mode"] == "continue" and shots[-1]["prompt"] == CUT
    for a, b in zip(shots, shots[1:], strict=False):  # one after the other, no gap
        assert a["end"] == b["start"] and a["last_seq"] < b["first_seq"]
    assert shots[-1]["end"] == len(seen) / FPS
    chapters = info["chapters"]
    assert [c["tags"]["title"] for c in chapters] == [
        f"Shot {x['shot']}: {x['prompt']}" for x in shots
    ]
    assert [round(float(c["start_time"]), 2) for c in chapters] == [
        round(x["start"], 2) for x in shots
    ]
    vtt = get(server, sid, "timeline.vtt", link["token"])
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n") and vtt.text.count(" --> ") == len(shots)
    assert f"Shot {cut_shot['shot']}: {CUT}" in vtt.text

    # the download during the session: what had been sent by then, a prefix of the whole
    assert mid.status_code == 200 and mid.headers["x-recording-state"] == "recording"
    early = decode(mid.content)
    assert 0 < len(early) <= len(seen) and np.array_equal(early, seen[: len(early)])

    # the viewer, from the chunk it joined at, ends with the same video
    vheld = io.BytesIO()
    vw = FragmentWriter(vheld)
    vw.write_init(viewer.init)
    for m in viewer.messages:
        if m["type"] == "chunk":
            c = next(x for x in viewer.chunks if x.message is m)
            vw.write_segment(c.data, m["first_frame"], m["frames"])
        elif m["type"] == "withdraw":
            vw.withdraw(round(m["pts"] * FPS))
    mine = decode(vheld.getvalue())
    first = viewer.chunks[0].message["first_frame"]
    assert np.array_equal(mine, seen[first : first + len(mine)]) and len(mine) == len(seen) - first

    # a watch link's token reads the recording; a wrong one does not
    r = get(server, sid, "timeline.json", "nope")
    assert r.status_code == 404 and r.json()["code"] == "unknown_session"


def test_a_full_disk_or_a_failed_write_stops_the_recording_not_the_stream(server, tmp_path):
    incomplete = server.metric("shotstream_recordings_incomplete_total", {"reason": "disk_full"})
    d = server.create(seed=12)
    sid = d["session_id"]

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(2)
            r = await asyncio.to_thread(
                httpx.post,
                f"{server.base}/v1/debug/faults",
                json={"kind": "partial", "session_id": sid},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            at = len(c.stream.chunks)
            await c.chunks(4)  # the stream goes on after the failed write
            await c.send({"type": "stop"})
            return at, await c.closed()

    at, st = asyncio.run(asyncio.wait_for(go(), 120))
    assert st.of("ended") == [{"type": "ended", "reason": "stopped"}]
    assert len(st.chunks) >= at + 4
    tl = get(server, sid, "timeline.json", d["token"]).json()
    assert tl["state"] == "incomplete" and tl["incomplete_reason"] == "disk_full"
    status = httpx.get(f"{server.base}/v1/sessions/{sid}", headers=auth(d["token"])).json()
    assert status["recording"] == "incomplete" and status["state"] == "ended"
    # the chunks written before the failure, whole: the half-written one was cut off
    n = tl["chunks"]
    assert at <= n < len(st.chunks)
    on_disk = (instance_folder(server) / sid / "stream.mp4").read_bytes()
    assert [b.kind for b in iter_boxes(on_disk)] == ["ftyp", "moov"] + ["moof", "mdat"] * n
    assert on_disk == st.init + b"".join(c.data for c in st.chunks[:n])
    r = get(server, sid, "recording.mp4", d["token"])
    assert r.status_code == 200 and r.headers["x-recording-state"] == "incomplete"
    path = tmp_path / "partial.mp4"
    path.write_bytes(r.content)
    assert int(video_stream(probe(path))["nb_read_frames"]) == sum(
        c.message["frames"] for c in st.chunks[:n]
    )
    assert (
        server.metric("shotstream_recordings_incomplete_total", {"reason": "disk_full"})
        == incomplete + 1
    )


def small_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def test_retention_deletes_a_recording_while_a_download_of_it_goes_on(server, tmp_path):
    d = server.create(seed=13)
    sid = d["session_id"]

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(12)  # a file larger than the sockets hold
            await c.send({"type": "stop"})
            return await c.closed()

    st = asyncio.run(asyncio.wait_for(go(), 120))
    # the recording's timeline.json is written just after the stream ends, off the loop
    folder = instance_folder(server) / sid
    deadline = time.monotonic() + 30
    while not (folder / "timeline.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (folder / "stream.mp4").is_file() and (folder / "timeline.json").is_file()
    # a slow download: the request, the headers and a little of the body, then a pause
    sock = small_socket(server.port)
    sock.sendall(
        f"GET /v1/sessions/{sid}/recording.mp4 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {d['token']}\r\nConnection: close\r\n\r\n".encode()
    )
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(4096)
    head, body = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    assert length > 200_000
    deadline = time.monotonic() + 30  # retention 3 s after the end, swept every 0.75 s
    while folder.exists():
        assert time.monotonic() < deadline, "the recording was not deleted"
        time.sleep(0.1)
    # gone from disk and from the API, while the download goes on to the end
    r = get(server, sid, "recording.mp4", d["token"])
    assert r.status_code == 404 and r.json()["code"] == "no_recording"
    while len(body) < length:
        more = sock.recv(65536)
        assert more, f"the download stopped at {len(body)} of {length} bytes"
        body += more
    sock.close()
    path = tmp_path / "late.mp4"
    path.write_bytes(body)
    frames = sum(c.message["frames"] for c in st.chunks)
    assert int(video_stream(probe(path))["nb_read_frames"]) == frames
    assert server.wait_metric("shotstream_recordings", 0) == 0
    assert server.metric("shotstream_recording_bytes") == 0
    left = [p.name for p in instance_folder(server).iterdir()]
    assert left == [".lock"], left  # nothing left behind past retention
    assert (
        httpx.get(f"{server.base}/v1/sessions/{sid}", headers=auth(d["token"])).json()["recording"]
        is None
    )


def test_a_crashed_process_leaves_nothing_and_the_disk_budget_holds(tmp_path):
    base = tmp_path / "recordings"
    crashed = ServerProcess(tmp_path, realtime_margin=50, recordings_dir=base).wait_ready()
    try:
        d = crashed.create(seed=14)

        async def go():
            async with StreamClient(d["stream_url"], d["token"]) as c:
                await c.chunks(2)

        asyncio.run(asyncio.wait_for(go(), 120))
        (left,) = [p for p in base.iterdir()]
        assert (left / d["session_id"] / "stream.mp4").stat().st_size > 0
    finally:
        crashed.proc.send_signal(signal.SIGKILL)
        crashed.stop()
    assert left.exists()  # a killed process removes nothing
    budget = 60_000  # the init segment and two or three chunks
    srv = ServerProcess(
        tmp_path, realtime_margin=50, recordings_dir=base, recording_budget_bytes=budget
    ).wait_ready()
    try:
        assert not left.exists()  # the next start removed it
        d = srv.create(seed=15)

        async def stream():
            async with StreamClient(d["stream_url"], d["token"]) as c:
                await c.chunks(6)  # streams on past the budget
                await c.send({"type": "stop"})
                return await c.closed()

        st = asyncio.run(asyncio.wait_for(stream(), 120))
        assert len(st.chunks) >= 6 and st.of("ended")
        tl = get(srv, d["session_id"], "timeline.json", d["token"]).json()
        assert tl["state"] == "incomplete" and tl["incomplete_reason"] == "budget"
        (mine,) = [p for p in base.iterdir()]
        size = (mine / d["session_id"] / "stream.mp4").stat().st_size
        assert 0 < size <= budget and 0 < tl["chunks"] < len(st.chunks)
        assert srv.metric("shotstream_recordings_incomplete_total", {"reason": "budget"}) == 1
    finally:
        assert srv.stop() == 0
    assert not any(base.iterdir())
