"""No client can slow the others: two honest viewers stream through one server for the same
time twice, first alone, then beside one abusive client of its own session that reconnects
after every chunk, floods its socket with frames, and freezes with its socket open. The
honest viewers' stalls and the server's deadline misses are compared between the two
phases of one run (counts, not timings).

Before the fixes this was lost three ways: a reconnect restarted the session's playout
clock (the abuser ran at about 2.5x real time and was scheduled first on every new
connection), a frame flood was answered frame by frame and never closed, and a frozen
socket blocked its own session's resume."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests.support.server import ServerProcess, play_in_real_time

PHASE_S = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("fair"),
        max_sessions=3,
        realtime_margin=50,
        max_sessions_per_client=8,
        lead_chunks=3,
        session_grace_s=30,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0


async def abuser(url: str, until: float) -> dict[str, int]:
    """Reconnects after every chunk for a third of the time, floods for a moment, then
    connects and freezes (reads nothing) with its socket open."""
    seen = {"chunks": 0, "reconnects": 0, "flood_close": 0}
    last = None
    third = (until - time.monotonic()) / 3
    storm_end = time.monotonic() + third
    while time.monotonic() < storm_end:
        resume = url if last is None else f"{url}&last_seq={last}"
        async with websockets.connect(resume, max_size=None) as ws:
            seen["reconnects"] += 1
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] in ("init", "chunk"):
                    await ws.recv()
                if msg["type"] == "chunk":
                    last, seen["chunks"] = msg["seq"], seen["chunks"] + 1
                    break
    async with websockets.connect(f"{url}&last_seq={last}", max_size=None) as ws:
        try:
            for i in range(20_000):
                await ws.send(json.dumps({"type": "ping", "ref": str(i)}))
            await asyncio.wait_for(ws.wait_closed(), 30)
        except websockets.ConnectionClosed:
            pass
        seen["flood_close"] = ws.close_code or 0
    frozen = await websockets.connect(f"{url}&last_seq={last}", max_size=None, max_queue=1)
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    frozen.transport.abort()
    return seen


def test_an_abusive_client_does_not_slow_honest_viewers(server):
    def phase(with_abuser: bool):
        honest_sessions = [server.create(seed=s) for s in (1, 2)]
        bad = server.create(seed=3) if with_abuser else None
        misses_before = server.metric("shotstream_deadline_misses_total")

        async def go():
            until = time.monotonic() + PHASE_S
            tasks = [
                play_in_real_time(f"{d['stream_url']}?token={d['token']}", until)
                for d in honest_sessions
            ]
            if bad is not None:
                tasks.append(abuser(f"{bad['stream_url']}?token={bad['token']}", until))
            return await asyncio.gather(*tasks)

        results = asyncio.run(go())
        misses = server.metric("shotstream_deadline_misses_total") - misses_before
        for d in [*honest_sessions, *([bad] if bad else [])]:
            server.delete(d)
        return results, misses

    (alone_a, alone_b), misses_alone = phase(with_abuser=False)
    (with_a, with_b, seen), misses_with = phase(with_abuser=True)

    assert seen["reconnects"] >= 3 and seen["flood_close"] == 4429
    # the abuser got no more than real time while storming: chunks <= its share + its lead
    assert seen["chunks"] <= (PHASE_S / 3) / 0.75 + 3 + 2
    stalls_alone = alone_a.misses + alone_b.misses
    stalls_with = with_a.misses + with_b.misses
    # the honest viewers got their video (a phase's worth each, both times)
    for p in (alone_a, alone_b, with_a, with_b):
        assert p.received_s >= PHASE_S / 2
    # one stall of slack for scheduling noise on a shared 2-core host
    assert stalls_with <= stalls_alone + 1, (stalls_alone, stalls_with)
    assert misses_with <= misses_alone + 1, (misses_alone, misses_with)
