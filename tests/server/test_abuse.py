"""Clients that try to take more than their share, against a real server: a frame flood, a
frozen socket and its takeover, prompts superseded while disconnected, a deep-nested
frame, slow prompt cleaning, and ended sessions that keep no video. Each test fails on the
server before its fix (noted per test)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import websockets

from tests.support.server import ServerProcess, StreamClient


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("abuse"),
        max_sessions=6,
        realtime_margin=50,
        max_sessions_per_client=6,
        session_grace_s=20,
        chunks_per_shot=3,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def auth(d: dict) -> dict:
    return {"Authorization": f"Bearer {d['token']}"}


def test_a_frame_flood_is_dropped_then_closed_and_others_stream_on(server):
    """5,000 pings as fast as they go: the excess over the message rate is dropped
    unanswered (one `rate_limited` notice), and past the flood limit the connection is
    closed with 4429; the session itself lives on. (Before: every ping answered, never
    closed.)"""
    d = server.create(seed=11)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.until(lambda m: m["type"] == "init")
            for i in range(5000):
                try:
                    await c.ws.send(json.dumps({"type": "ping", "ref": str(i)}))
                except websockets.ConnectionClosed:
                    break
            return await c.closed()

    st = run(go())
    pongs, errors = st.of("pong"), st.of("error")
    assert st.close_code == 4429
    assert errors[0]["code"] == "rate_limited" and not errors[0]["fatal"]
    assert errors[-1]["code"] == "rate_limited" and errors[-1]["fatal"]
    assert len(pongs) < 200  # the burst and the rate, not thousands
    assert server.metric("shotstream_errors_total", {"kind": "flood"}) >= 1
    r = httpx.get(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d))
    assert r.json()["state"] in ("waiting", "streaming")  # the session is not punished
    httpx.delete(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d))


def test_a_deeply_nested_frame_is_bad_json_and_the_stream_goes_on(server):
    """`[` x 1000 then `]` x 1000 (2 KB): a `bad_json` error, not a traceback and a closed
    connection. (Before: an unhandled RecursionError, close 1000.)"""
    d = server.create(seed=12)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.until(lambda m: m["type"] == "init")
            await c.send("[" * 1000 + "]" * 1000)
            await c.send('{"type": "ping", "ref": "r", "x": ' + "[" * 1000 + "]" * 1000 + "}")
            errs = [await c.until(lambda m: m["type"] == "error") for _ in range(2)]
            await c.send({"type": "ping", "ref": "after"})
            await c.until(lambda m: m["type"] == "pong" and m.get("ref") == "after")
            await c.send({"type": "stop"})
            return errs, await c.closed()

    errs, st = run(go())
    assert [e["code"] for e in errs] == ["bad_json", "bad_json"]
    assert not any(e["fatal"] for e in errs)
    assert st.of("ended")[0]["reason"] == "stopped"


def test_a_resume_takes_over_a_frozen_connection_and_nothing_is_lost(server):
    """A client stops reading (frozen, its socket open) after chunk 2; a second client with
    the same token resumes with last_seq=2: it is taken at once, the frozen one is told it
    was replaced, and the resumed stream goes on from chunk 3 with no gap although the
    server kept sending into the frozen socket. (Before: refused with 4009 until the
    server noticed, and what was sent meanwhile lost.)"""
    d = server.create(seed=13)
    url = f"{d['stream_url']}?token={d['token']}"

    async def go():
        frozen = await websockets.connect(url, max_size=None)
        last = -1
        while last < 2:
            msg = json.loads(await frozen.recv())
            if msg["type"] in ("init", "chunk"):
                await frozen.recv()
            if msg["type"] == "chunk":
                last = msg["seq"]
        await asyncio.sleep(3.0)  # frozen: the server keeps sending into its socket
        async with StreamClient(f"{url}&last_seq={last}", None) as c:
            hello = await c.until(lambda m: m["type"] == "hello")
            await c.chunks(4)
            await c.send({"type": "stop"})
            st = await c.closed()
        frozen.transport.abort()
        return last, hello, st

    last, hello, st = run(go())
    seqs = [c.message["seq"] for c in st.chunks]
    assert hello["next_seq"] == last + 1 == seqs[0]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_prompts_superseded_while_disconnected_are_still_answered(server):
    """While no stream is connected: cut A, cut B (supersedes A), queue C. On reconnect A
    is reported `prompt_dropped`, B and C are shown. (Before: A's `prompt_dropped` was
    thrown away with the dead connection's replies.)"""
    d = server.create(seed=14)
    base = f"{server.base}/v1/sessions/{d['session_id']}"

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
        ids = {}
        for name, mode in (("A", "cut"), ("B", "cut"), ("C", "queue")):
            r = httpx.post(
                f"{base}/prompts", json={"prompt": f"shot {name}", "mode": mode}, headers=auth(d)
            )
            assert r.status_code == 202
            ids[name] = r.json()["shot_id"]
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.until(lambda m: m["type"] == "shot" and m["shot_id"] == ids["C"], 180)
            await c.send({"type": "stop"})
            return ids, await c.closed()

    ids, st = run(go(), 240)
    dropped = {m["shot_id"] for m in st.of("prompt_dropped")}
    shown = {m["shot_id"] for m in st.of("shot")}
    assert ids["A"] in dropped and ids["A"] not in shown
    assert {ids["B"], ids["C"]} <= shown


MOJIBAKE = ("Ã©Ã¨Ã  â€œ " * 800)[:8000]


def test_prompt_cleaning_does_not_block_the_event_loop(server):
    """A create with 16 shots of 8,000 characters of mojibake (ftfy is slow on it) while
    /healthz is polled: health checks are answered while the captions are cleaned, not
    after. (Before: the cleaning ran on the event loop and /healthz waited for it.)"""
    stop, answered = threading.Event(), []
    created: list[float] = []

    def poll():
        with httpx.Client(timeout=30) as h:
            while not stop.is_set():
                h.get(f"{server.base}/healthz")
                answered.append(time.monotonic())

    body = {"prompt": MOJIBAKE, "shots": [MOJIBAKE] * 16, "seed": 15}
    t = threading.Thread(target=poll)
    t.start()
    try:
        while not answered:  # the poller is running
            time.sleep(0.01)
        sent = time.monotonic()
        r = httpx.post(f"{server.base}/v1/sessions", json=body, timeout=120)
        created.append(time.monotonic())
    finally:
        stop.set()
        t.join()
    assert r.status_code == 201, r.text
    during = [a for a in answered if sent < a < created[0]]
    assert len(during) >= 3, f"{len(during)} health checks answered while the create ran"
    d = r.json()
    httpx.delete(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d))


def test_ended_sessions_keep_no_video(server):
    """Sessions that streamed and ended hold no segments (the gauge of outbox bytes goes
    back to zero). (Before: each ended session kept its last chunks, ~150 KB, up to 1,000
    sessions.)"""
    ds = [server.create(seed=20 + i) for i in range(3)]
    held = []

    async def go():
        for d in ds:
            async with StreamClient(d["stream_url"], d["token"]) as c:
                await c.chunks(3)
                held.append(server.metric("shotstream_outbox_bytes"))  # kept for a resume
                await c.send({"type": "stop"})
                await c.closed()

    run(go())
    assert all(h > 0 for h in held)
    assert server.wait_metric("shotstream_outbox_bytes", 0) == 0
    for d in ds:  # the ended sessions still answer a late GET
        r = httpx.get(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d))
        assert r.status_code == 200 and r.json()["state"] == "ended"
        assert r.json()["frames_sent"] > 0
