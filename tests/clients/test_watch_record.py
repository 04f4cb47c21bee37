"""Watch links, recordings and the waiting room through the Python client and
`shotstream-client` on a real server: `watch <watch link>` writes someone else's stream to an
MP4 from the chunk it joined and leaves the session running; `record <watch link>` saves the
recording and its timeline; a session created with `wait=True` on a full server yields its
places in line, then streams."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import httpx

from clients.client import Chunk, Hello, Queued, ShotStreamClient, parse_watch_url
from tests.clients.conftest import API_KEY, run
from tests.support.server import REPO, StreamClient, ffprobe_frames


def client_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args], cwd=REPO, capture_output=True, timeout=timeout
    )


def test_parse_watch_url_takes_every_form_of_a_link():
    page = parse_watch_url("https://video.example/?watch=r0.abc#token=t0k")
    assert page.base_url == "https://video.example" and page.session_id == "r0.abc"
    assert page.token == "t0k"
    assert page.stream_url == "wss://video.example/v1/sessions/r0.abc/watch"
    ws = parse_watch_url("ws://127.0.0.1:8000/v1/sessions/r0.abc/watch?token=t0k")
    assert (ws.base_url, ws.session_id, ws.token) == ("http://127.0.0.1:8000", "r0.abc", "t0k")
    rest = parse_watch_url("http://h:1/prefix/v1/sessions/r0.abc/recording.mp4")
    assert rest.base_url == "http://h:1/prefix" and rest.token is None
    assert rest.stream_url == "ws://h:1/prefix/v1/sessions/r0.abc/watch"


class Owner:
    """The session's owner, reading its stream on a thread until told to stop (it paces
    the session: viewers get what it is sent)."""

    def __init__(self, d: dict):
        self.d, self.chunks = d, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        async with StreamClient(self.d["stream_url"], self.d["token"]) as c:
            while not self.stop.is_set():
                msg = await c.next(timeout=30)
                if msg is None:
                    return
                if msg["type"] == "chunk":
                    self.chunks.append(msg)
            await c.send({"type": "stop"})
            # chunks the server got out before it read the stop count too (the recording has them)
            self.chunks = [ch.message for ch in (await c.closed()).chunks]

    def end(self) -> None:
        self.stop.set()
        self.thread.join(60)


def test_watch_a_watch_link_then_record_the_session(server, tmp_path):
    headers = {"X-API-Key": API_KEY}
    d = httpx.post(
        server.base + "/v1/sessions", json={"prompt": "a red circle", "seed": 8}, headers=headers
    ).json()
    sid, auth = d["session_id"], {"Authorization": f"Bearer {d['token']}"}
    link = httpx.post(f"{server.base}/v1/sessions/{sid}/viewers", headers=auth).json()
    owner = Owner(d)
    try:
        out, report = tmp_path / "theirs.mp4", tmp_path / "theirs.json"
        r = client_cli(
            "watch", link["watch_url"], "--chunks", "4", "--out", str(out), "--report", str(report)
        )
        assert r.returncode == 0, r.stderr.decode()
        assert b"watching session" in r.stderr
        rep = json.loads(report.read_text())
        seqs = [c["seq"] for c in rep["chunks"]]
        assert len(seqs) == 4 and seqs == list(range(seqs[0], seqs[0] + 4))
        frames = ffprobe_frames(out)
        assert len(frames) == rep["frames"] and frames[0]["key_frame"] == 1
        assert rep["ended"] is None  # it left; the session goes on
        st = httpx.get(f"{server.base}/v1/sessions/{sid}", headers=auth).json()
        assert st["state"] == "streaming"
    finally:
        owner.end()
    rec, timeline = tmp_path / "recording.mp4", tmp_path / "timeline.json"
    r = client_cli("record", link["watch_url"], "--out", str(rec), "--timeline", str(timeline))
    assert r.returncode == 0, r.stderr.decode()
    tl = json.loads(timeline.read_text())
    assert tl["state"] == "complete" and tl["chunks"] == len(owner.chunks)
    assert len(ffprobe_frames(rec)) == tl["frames"] == sum(c["frames"] for c in owner.chunks)
    assert f"{tl['chunks']} chunks" in r.stderr.decode()
    assert not (tmp_path / "recording.mp4.partial").exists()
    # a watch link cannot do what the owner does
    r = client_cli("record", f"{server.base}/v1/sessions/{sid}", "--token", "wrong", "--out", "x")
    assert r.returncode == 1 and b"unknown_session" in r.stderr


def test_a_session_created_with_wait_yields_its_place_then_streams(server):
    async def go():
        async with ShotStreamClient(server.base, api_key=API_KEY) as client:
            full = []
            while True:  # fill every slot
                try:
                    full.append(await client.create_session("a grey square"))
                except Exception as exc:  # the 503 that says the server is full
                    assert getattr(exc, "status", None) == 503, exc
                    break
            try:
                queued = await client.create_session("a blue triangle", wait=True)
                assert queued.info.state == "queued" and queued.info.queue_position == 1
                events = []
                async for ev in queued.stream():
                    events.append(ev)
                    if isinstance(ev, Queued) and len(events) == 1:
                        await full.pop(0).delete()  # a slot frees
                    if isinstance(ev, Chunk):
                        break
                await queued.stop()
                await queued.close()
                return events
            finally:
                for s in full:
                    await s.delete()

    events = run(go())
    kinds = [type(e).__name__ for e in events]
    assert isinstance(events[0], Queued) and events[0].message.position == 1
    assert kinds.index("Hello") > 0 and isinstance(events[-1], Chunk)
    assert all(isinstance(e, Queued) for e in events[: kinds.index("Hello")])
    assert isinstance(events[kinds.index("Hello")], Hello)
