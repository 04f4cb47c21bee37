"""Readiness, graceful shutdown and a crashed engine."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime, timedelta

import httpx

from tests.support.server import ServerProcess, StreamClient


def test_sigterm_drains_streams_and_exits_zero(tmp_path):
    srv = ServerProcess(tmp_path, drain_grace_s=1, realtime_margin=50, max_sessions=4).wait_ready()
    ds = [srv.create(seed=i) for i in range(2)]

    async def go():
        clients = [StreamClient(d["stream_url"], d["token"]) for d in ds]
        for c in clients:
            await c.__aenter__()
        await asyncio.gather(*(c.chunks(1) for c in clients))
        srv.proc.send_signal(signal.SIGTERM)
        # while draining: not ready, no admission; the streams keep going up to the grace
        deadline = time.monotonic() + 5
        while httpx.get(srv.base + "/readyz").status_code == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert httpx.get(srv.base + "/readyz").status_code == 503
        r = httpx.post(srv.base + "/v1/sessions", json={"prompt": "late"})
        assert (
            r.status_code == 503 and r.json()["code"] == "draining" and "Retry-After" in r.headers
        )
        assert httpx.get(srv.base + "/healthz").status_code == 200
        return [await c.closed() for c in clients]

    streams = asyncio.run(go())
    assert srv.stop() == 0
    for st in streams:
        assert st.of("ended") == [{"type": "ended", "reason": "draining"}] and st.close_code == 1001
    stopped = [e for e in srv.log_events() if e.get("event") == "stopped"]
    assert stopped and stopped[-1]["pool_bytes"] == 0 and stopped[-1]["open_sessions"] == 0


def test_a_session_never_connected_does_not_hold_the_drain(tmp_path):
    """With a grace far longer than any stop timeout, a drain with only never-connected
    sessions ends them at once and exits 0 (not killed at stop's 60 s)."""
    srv = ServerProcess(tmp_path, drain_grace_s=600, realtime_margin=50).wait_ready()
    sid = srv.create(seed=3)["session_id"]
    assert srv.stop(timeout=60) == 0
    ended = [e for e in srv.log_events() if e.get("event") == "session ended"]
    assert [(e["session_id"], e["reason"]) for e in ended] == [(sid, "draining")]


def test_engine_crash_reports_not_ready_and_fails_sessions(tmp_path):
    srv = ServerProcess(tmp_path, fault_injection=True).wait_ready()
    d = srv.create(seed=1)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            httpx.post(srv.base + "/v1/debug/faults", json={"kind": "engine"})
            err = await c.until(lambda m: m["type"] == "error")
            return err, await c.closed()

    err, st = asyncio.run(go())
    assert err["fatal"] and err["code"] == "internal" and st.close_code == 4500
    r = httpx.get(srv.base + "/readyz")
    assert r.status_code == 503 and "engine" in r.json()["reason"]
    r = httpx.get(srv.base + "/healthz")  # liveness fails too: a restart is the only cure
    assert r.status_code == 503 and r.json()["reason"] == "engine failed"
    assert httpx.post(srv.base + "/v1/sessions", json={"prompt": "p"}).status_code == 503
    assert srv.metric("shotstream_errors_total", {"kind": "engine"}) == 1
    assert srv.wait_metric("shotstream_pool_bytes", 0) == 0
    assert srv.stop() == 0


def test_session_lifetime_is_enforced_while_streaming(tmp_path):
    """session_max_s is a hard limit: a connected (even paused) stream does not extend it,
    and the 201 reply's `expires_at` is that limit, counted from the session's creation."""
    srv = ServerProcess(tmp_path, session_max_s=4, realtime_margin=50).wait_ready()
    d = srv.create(seed=2)
    status = httpx.get(
        f"{srv.base}/v1/sessions/{d['session_id']}",
        headers={"Authorization": f"Bearer {d['token']}"},
    ).json()
    created, expires = (datetime.fromisoformat(t) for t in (status["created_at"], d["expires_at"]))
    assert expires - created == timedelta(seconds=4)  # not the idle grace (30 s)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            await c.send({"type": "pause"})
            return await c.closed(timeout=30)

    t0 = time.monotonic()
    st = asyncio.run(go())
    assert st.of("ended")[-1]["reason"] == "expired" and time.monotonic() - t0 < 20
    assert srv.metric("shotstream_sessions_ended_total", {"reason": "expired"}) == 1
    assert srv.wait_metric("shotstream_pool_bytes", 0) == 0
    assert srv.stop() == 0
