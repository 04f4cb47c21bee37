"""Instant cuts end to end: a real `demo` server, the Python client asking for the
`withdraw` feature and writing the stream to a file as `shotstream-client watch` does. A
cut sent mid-stream lands just past the client's reported playhead; what the client ends
with is the video a viewer saw: the old shot up to the cut, then the new shot, counted and
decoded from the file (ffprobe, PyAV), the new colour read by the pixel probe."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time

import av
import numpy as np
import pytest

from clients.client import Chunk, ShotStreamClient, Withdraw
from clients.media import FragmentWriter
from clients.stats import Playout
from model.config import get_preset
from tests.support.server import ServerProcess
from training.probe import read_chunk

SHIPPED = get_preset("demo").bundled_weights_dir
pytestmark = pytest.mark.skipif(
    SHIPPED is None or not SHIPPED.is_dir(), reason="no shipped demo weights"
)
GLOBAL = "a red square on a blue background"
FIRST_SHOT = "wide shot, the square stays still"
CUT = "close-up shot, the square turns yellow and stays still"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("cuts"), preset="demo", max_sessions=2, realtime_margin=50
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_a_cut_replaces_the_unplayed_video_and_the_file_holds_what_a_viewer_saw(server, tmp_path):
    path = tmp_path / "watched.mp4"

    async def go():
        async with ShotStreamClient(server.base) as client:
            s = await client.create_session(
                GLOBAL, shots=[FIRST_SHOT], seed=3, features=("withdraw",)
            )
            player, first_pts, announced, withdrawn = Playout(), None, 0, []
            segments: dict[int, bytes] = {}
            cut_sent = None
            with open(path, "w+b") as f:
                writer = FragmentWriter(f)
                async for ev in s.stream():
                    if type(ev).__name__ == "Init":
                        writer.write_init(ev.data)
                    elif isinstance(ev, Chunk):
                        m = ev.message
                        writer.write_segment(ev.data, m.first_frame, m.frames)
                        segments[m.seq] = ev.data
                        announced += m.frames
                        first_pts = m.pts if first_pts is None else first_pts
                        player.on_chunk(time.monotonic(), m.duration)
                        await s.report_playhead(first_pts + player.played_s(time.monotonic()))
                        if m.seq == 2 and cut_sent is None:
                            await asyncio.sleep(0.3)
                            await s.report_playhead(first_pts + player.played_s(time.monotonic()))
                            cut_sent = await s.prompt(CUT, "cut")
                        if cut_sent and m.seq >= cut_sent.starts_at_seq + 1:
                            break
                    elif isinstance(ev, Withdraw):
                        w = ev.message
                        gone = writer.withdraw(round(w.pts * 16))
                        withdrawn.append((w, gone))
                        player.withdraw(gone / 16)
                await s.stop()
            return cut_sent, withdrawn, announced, segments

    ack, withdrawn, announced, segments = asyncio.run(asyncio.wait_for(go(), 120))
    assert len(withdrawn) == 1, withdrawn
    w, gone = withdrawn[0]
    assert gone > 0 and w.shot_id == ack.shot_id
    cut = round(w.pts * 16)
    # ffprobe reads the file cleanly, with every frame announced but the withdrawn ones
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stderr == ""
    frames = decode(path)
    assert int(json.loads(probe.stdout)["streams"][0]["nb_read_frames"]) == len(frames)
    assert len(frames) == announced - gone
    # from the cut point on, the file is the new shot: its first chunk, decoded on its own
    init = path.read_bytes()[: path.read_bytes().index(b"moof") - 4]
    with av.open(io.BytesIO(init + segments[ack.starts_at_seq]), format="mp4") as c:
        new = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(frames[cut : cut + len(new)], new)
    # and the pixel probe reads the cut's colour there, the old one just before it
    assert read_chunk(new).colour == "yellow", read_chunk(new)
    assert read_chunk(frames[max(0, cut - 9) : cut]).colour == "red"


def test_a_resume_across_a_withdrawal_is_told_again_and_goes_on_from_the_cut(server):
    """The client's connection dies right after the `withdraw` arrived, before the client
    acted on it: resuming with the last chunk it holds (a withdrawn one), it is told again
    what was withdrawn, before the new shot's first chunk, and the stream goes on from the
    cut. An impossible playhead is refused with an error, not believed; one within the media
    the resuming player holds is believed before the new connection sent any."""
    import websockets

    d = server.create(prompt=GLOBAL, shots=[FIRST_SHOT], seed=4)
    url = f"{d['stream_url']}?token={d['token']}&features=withdraw"

    async def read(ws):
        msg = json.loads(await ws.recv())
        if msg["type"] in ("init", "chunk"):
            await ws.recv()
        return msg

    async def go():
        ws = await websockets.connect(url, max_size=None)
        last = -1
        while last < 2:
            msg = await read(ws)
            if msg["type"] == "hello":
                assert msg["features"] == ["withdraw"]
            last = msg["seq"] if msg["type"] == "chunk" else last
        await ws.send(json.dumps({"type": "playhead", "pts": 1e6}))  # never sent that far
        while (msg := await read(ws))["type"] != "error":
            last = msg["seq"] if msg["type"] == "chunk" else last
        bad = msg
        await ws.send(json.dumps({"type": "playhead", "pts": 0.1}))
        await ws.send(json.dumps({"type": "prompt", "prompt": CUT, "mode": "cut"}))
        while (msg := await read(ws))["type"] != "withdraw":
            last = msg["seq"] if msg["type"] == "chunk" else last
        first_w = msg
        ws.transport.abort()  # gone before acting on it
        resumed = await websockets.connect(f"{url}&last_seq={last}", max_size=None)
        # the player plays on what it holds: a playhead before this connection sent anything
        await resumed.send(json.dumps({"type": "playhead", "pts": 0.1}))
        seen = []
        while not (
            seen and seen[-1]["type"] == "chunk" and seen[-1]["shot_id"] == first_w["shot_id"]
        ):
            seen.append(await read(resumed))
        await resumed.send(json.dumps({"type": "stop"}))
        await resumed.close()
        return bad, last, first_w, seen

    bad, last, first_w, seen = asyncio.run(asyncio.wait_for(go(), 120))
    assert bad["code"] == "bad_playhead" and not bad["fatal"]
    assert first_w["seqs"] and min(first_w["seqs"]) <= last  # it held withdrawn video
    kinds = [m["type"] for m in seen]
    assert seen[0]["type"] == "hello" and seen[0]["next_seq"] > last
    assert [m for m in seen if m["type"] == "withdraw"] == [first_w]  # told again
    assert not [m for m in seen if m["type"] == "error"], seen  # the playhead was believed
    assert kinds.index("withdraw") < kinds.index("shot") < len(kinds) - 1
    shot = next(m for m in seen if m["type"] == "shot")
    assert shot["prompt"] == CUT and seen[-1]["seq"] == shot["starts_at_seq"]
    assert abs(seen[-1]["pts"] - first_w["pts"]) < 1e-9
