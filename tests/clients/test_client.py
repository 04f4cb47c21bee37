"""The client library against real servers: every error reply maps to its exception, retry
honours Retry-After, prompts over the WebSocket return their ack, a dropped connection is
resumed, and importing the client never imports torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from clients.client import (
    Chunk,
    Conflict,
    ConnectionLost,
    Ended,
    Hello,
    Init,
    InvalidRequest,
    NotConnected,
    NotFound,
    Overloaded,
    RateLimited,
    Reconnected,
    ReconnectPolicy,
    RetryPolicy,
    SessionFailed,
    Shot,
    ShotStreamClient,
    ShotStreamError,
    Unauthorized,
)
from tests.clients.conftest import API_KEY, run
from tests.support.server import REPO, ffprobe_frames


def test_importing_the_clients_never_imports_torch_or_the_model():
    code = (
        "import sys, clients.client, clients.cli, clients.load, clients.media, clients.stats\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] in "
        "('torch', 'model', 'cache') or m.startswith('server.') and m != 'server.protocol')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_rest_error_replies_map_to_exceptions(server):
    async def go():
        async with ShotStreamClient(server.base, api_key="wrong-key") as bad:
            with pytest.raises(Unauthorized) as e401:
                await bad.create_session("a red circle")
        async with ShotStreamClient(server.base, api_key=API_KEY) as client:
            with pytest.raises(InvalidRequest) as e422:
                await client.create_session("   ")
            with pytest.raises(InvalidRequest) as too_long:
                await client.create_session("x" * 8001)
            with pytest.raises(NotFound) as e404:
                await client.attach("r0.no-such-session", "some-token").status()
            with pytest.raises(NotFound) as ws404:  # the stream refuses with a fatal error
                await client.attach("r0.no-such-session", "some-token").connect()
            session = await client.create_session("a red circle", seed=1)
            assert (await session.status()).state == "waiting"
            await session.delete()
            with pytest.raises(Conflict) as e409:  # a prompt for an ended session
                await session.prompt("close-up")
            return e401.value, e422.value, too_long.value, e404.value, ws404.value, e409.value

    e401, e422, too_long, e404, ws404, e409 = run(go())
    assert (e401.status, e401.code) == (401, "unauthorized") and "API key" in e401.message
    assert e422.status == 422 and "prompt" in e422.message and "empty" in e422.message
    assert too_long.code == "prompt_too_long" and "8000" in too_long.message
    assert (e404.status, e404.code) == (404, "unknown_session")
    assert ws404.status is None and ws404.code == "unknown_session"
    assert (e409.status, e409.code) == (409, "invalid_state") and "ended" in e409.message
    assert all(isinstance(e, ShotStreamError) for e in (e401, e422, e404, e409))


def test_admission_refusals_carry_retry_after(limits_server):
    other = {"X-Forwarded-For": "10.1.2.3"}  # another client address, past the loopback proxy

    async def go():
        async with (
            ShotStreamClient(limits_server.base) as client,
            ShotStreamClient(limits_server.base, headers=other) as client2,
        ):
            first = await client.create_session("a red circle", seed=1)
            try:
                with pytest.raises(RateLimited) as quota:  # this client's one session is open
                    await client.create_session("a blue square")
                with pytest.raises(Overloaded) as full:  # another client: the server is full
                    await client2.create_session("a blue square")
                t0 = time.monotonic()
                with pytest.raises(Overloaded):  # retrying would overrun max_wait_s: no wait
                    await client2.create_session("a blue square", retry=RetryPolicy(max_wait_s=0.5))
                waited = time.monotonic() - t0
            finally:
                await first.delete()
            return quota.value, full.value, waited

    quota, full, waited = run(go())
    assert (quota.status, quota.code) == (429, "rate_limited") and quota.retry_after >= 1
    assert (full.status, full.code) == (503, "over_capacity") and full.retry_after >= 1
    assert waited < 0.5


def test_retry_waits_for_retry_after_then_succeeds(limits_server):
    retries: list[tuple[int, float, float]] = []

    async def go():
        async with ShotStreamClient(limits_server.base) as client:
            # A session nobody watches holds the only slot until its 2 s grace runs out.
            await client.create_session("a red circle", seed=1)
            policy = RetryPolicy(
                on_retry=lambda e, d: retries.append((e.status, d, time.monotonic()))
            )
            session = await client.create_session("a blue square", seed=2, retry=policy)
            done = time.monotonic()
            await session.delete()
            return done

    done = run(go())
    assert retries and retries[0][0] == 429 and retries[0][1] >= 1
    # Each retry slept what Retry-After said before trying again.
    for (_, delay, at), nxt in zip(retries, [r[2] for r in retries[1:]] + [done], strict=True):
        assert nxt - at >= delay - 0.05


def test_prompts_and_controls_over_the_websocket(server):
    async def go():
        async with ShotStreamClient(server.base, api_key=API_KEY) as client:
            session = await client.create_session("a red circle", shots=["wide shot"], seed=3)
            with pytest.raises(NotConnected):
                await session.pause()
            events, ack, refusals = [], None, []
            async with session:
                async for ev in session.stream():
                    events.append(ev)
                    if isinstance(ev, Chunk) and ack is None:
                        # Sent from inside the loop: the ack comes back, no deadlock.
                        ack = await session.prompt("close-up shot, the circle moves up")
                        with pytest.raises(InvalidRequest) as bad:
                            await session.prompt("x" * 8001)
                        with pytest.raises(Conflict) as not_paused:
                            await session.resume()
                        await session.pause()
                        await session.resume()
                        refusals = [bad.value, not_paused.value]
                        rtt = await session.ping()
                    if isinstance(ev, Chunk) and ev.seq == ack.starts_at_seq:
                        await session.stop()
            return session, ack, events, refusals, rtt

    session, ack, events, (bad, not_paused), rtt = run(go())
    assert bad.code == "prompt_too_long" and bad.status is None
    assert not_paused.code == "invalid_state" and "not paused" in not_paused.message
    assert 0 < rtt < 5
    shot = next(
        e.message for e in events if isinstance(e, Shot) and e.message.shot_id == ack.shot_id
    )
    assert shot.starts_at_seq == ack.starts_at_seq and shot.prompt.startswith("close-up")
    first = next(e for e in events if isinstance(e, Chunk) and e.seq == ack.starts_at_seq)
    assert first.shot_id == ack.shot_id and first.frames == 9
    assert isinstance(events[-1], Ended) and events[-1].reason == "stopped"
    # The prompts went over the stream, not REST.
    assert f"/v1/sessions/{session.session_id}/prompts" not in server.log()


def test_reconnect_after_an_abrupt_drop_resumes_the_stream(server, tmp_path):
    async def go():
        async with ShotStreamClient(server.base, api_key=API_KEY) as client:
            session = await client.create_session("a red circle", seed=4)
            events = []
            async with session:
                async for ev in session.stream():
                    events.append(ev)
                    chunks = [e for e in events if isinstance(e, Chunk)]
                    if len(chunks) == 2 and not any(isinstance(e, Reconnected) for e in events):
                        session._ws.transport.abort()  # the peer vanishes: no close frame
                    if len(chunks) == 4:
                        await session.stop()
            return session, events

    session, events = run(go())
    assert session.grace_s == 5  # the server's session_grace_s: the window to reconnect in
    kinds = [type(e).__name__ for e in events]
    at = kinds.index("Reconnected")
    assert kinds[at : at + 3] == ["Reconnected", "Hello", "Init"]
    assert kinds[:2] == ["Hello", "Init"] and session.reconnects == 1
    chunks = [e for e in events if isinstance(e, Chunk)]
    seqs = [c.seq for c in chunks]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0  # increasing, never repeated
    before = [e.seq for e in events[:at] if isinstance(e, Chunk)]
    after = [e.seq for e in events[at:] if isinstance(e, Chunk)]
    assert events[at].last_seq == before[-1] and after and after[0] > before[-1]
    inits = [e for e in events if isinstance(e, Init)]
    assert inits[1].repeat and inits[1].data == inits[0].data
    # The decode times continue across the reconnect: one init + every segment decodes.
    path = tmp_path / "resumed.mp4"
    path.write_bytes(inits[0].data + b"".join(c.data for c in chunks))
    frames = ffprobe_frames(path)
    assert len(frames) == sum(c.frames for c in chunks)
    pts = [float(f["pts_time"]) for f in frames]
    assert pts == sorted(pts)
    assert isinstance(events[-1], Ended)


def test_unresumable_drops_and_fatal_errors_raise(server):
    async def go():
        no_retry = ReconnectPolicy(enabled=False)
        async with (
            ShotStreamClient(server.base, api_key=API_KEY) as client,
            ShotStreamClient(server.base, api_key=API_KEY, reconnect=no_retry) as once,
        ):
            session = await once.create_session("a red circle", seed=5)
            with pytest.raises(ConnectionLost) as not_resumed:
                async for ev in session.stream():
                    if isinstance(ev, Init):
                        session._ws.transport.abort()
            await session.delete()

            session = await client.create_session("a red circle", seed=6)
            with pytest.raises(ConnectionLost) as gone:  # it ended while we were away
                async for ev in session.stream():
                    if isinstance(ev, Init):
                        session._ws.transport.abort()
                        await session.delete()

            session = await client.create_session("a red circle", seed=7)
            with pytest.raises(SessionFailed) as failed:
                async for ev in session.stream():
                    if isinstance(ev, Hello):
                        r = httpx.post(
                            f"{server.base}/v1/debug/faults",
                            json={"session_id": session.session_id, "kind": "exception"},
                        )
                        assert r.status_code == 200
            status = await session.status()
            return not_resumed.value, gone.value, failed.value, status

    not_resumed, gone, failed, status = run(go())
    assert "dropped" in not_resumed.message
    assert "cannot be resumed" in gone.message and gone.code == "unknown_session"
    assert failed.code == "session_failed" and "injected" in failed.message
    assert status.state == "failed"


def test_events_wait_for_the_consumer_not_a_background_reader(server):
    """Frames are read only when someone needs them, so the server's outbox stays the only
    buffer: a consumer that stops reading gets no more queued events than it asked for."""

    async def go():
        async with ShotStreamClient(server.base, api_key=API_KEY) as client:
            session = await client.create_session("a red circle", seed=7)
            async with session:
                await session.connect()
                await asyncio.sleep(1.0)  # nobody reads: nothing is pulled off the socket
                buffered = len(session._events)
                await session.stop()
                tail = [ev async for ev in session.stream()]
            return buffered, tail

    buffered, tail = run(go())
    assert buffered == 1  # only the hello read by connect()
    assert isinstance(tail[-1], Ended)
