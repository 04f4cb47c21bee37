"""End to end on a real server (tiny preset, CPU, 127.0.0.1): streams, prompts, isolation,
and every exit path returning the pool to zero."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.server import ServerProcess, StreamClient, ffprobe_frames, reconnect

FPS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("srv"),
        chunks_per_shot=3,
        max_sessions=4,
        realtime_margin=50,
        session_grace_s=2,
        fault_injection=True,
        max_sessions_per_client=8,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def run(coro):
    return asyncio.run(coro)


def test_stream_with_midstream_cut_decodes_to_the_announced_frames(server, tmp_path):
    d = server.create(shots=["wide shot, the circle moves left"], seed=5)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            hello = await c.until(lambda m: m["type"] == "hello")
            assert (
                hello["protocol"] == 1
                and hello["fps"] == FPS
                and hello["mime"].startswith("video/mp4")
            )
            await c.chunks(2)
            await c.send({"type": "prompt", "prompt": "close-up shot, the circle moves up"})
            ack = await c.until(lambda m: m["type"] == "prompt_ack")
            await c.until(lambda m: m["type"] == "chunk" and m["seq"] >= ack["starts_at_seq"] + 1)
            await c.send({"type": "stop"})
            return ack, await c.closed()

    ack, st = run(go())
    seqs = [c.message["seq"] for c in st.chunks]
    assert seqs == list(range(len(seqs)))  # from 0, never skipping or repeating
    first_new = next(c.message for c in st.chunks if c.message["seq"] == ack["starts_at_seq"])
    assert first_new["shot_id"] == ack["shot_id"] and first_new["shot"] == 1
    assert all(c.message["shot"] == 0 for c in st.chunks if c.message["seq"] < ack["starts_at_seq"])
    shots = st.of("shot")
    assert [s["starts_at_seq"] for s in shots] == [0, ack["starts_at_seq"]]
    assert (
        shots[1]["shot_id"] == ack["shot_id"]
        and shots[1]["prompt"] == "close-up shot, the circle moves up"
    )
    # the shot message comes before the chunk that starts it
    order = [(m["type"], m.get("seq", m.get("starts_at_seq"))) for m in st.messages]
    assert order.index(("shot", ack["starts_at_seq"])) < order.index(
        ("chunk", ack["starts_at_seq"])
    )
    assert [c.message["frames"] for c in st.chunks][:2] == [9, 12]
    assert first_new["frames"] == 9  # a new shot decodes from a cleared VAE cache
    assert st.of("ended") == [{"type": "ended", "reason": "stopped"}] and st.close_code == 1000

    path = tmp_path / "stream.mp4"
    path.write_bytes(st.video())
    frames = ffprobe_frames(path)
    announced = sum(c.message["frames"] for c in st.chunks)
    assert len(frames) == announced
    pts = [float(f["pts_time"]) for f in frames]
    assert all(abs((b - a) - 1 / FPS) < 1e-6 for a, b in zip(pts, pts[1:], strict=False))
    keyframes = [i for i, f in enumerate(frames) if f["key_frame"] == 1]
    assert keyframes == [c.message["first_frame"] for c in st.chunks]  # every chunk starts with one
    for c in st.chunks:
        assert abs(c.message["pts"] - c.message["first_frame"] / FPS) < 1e-9
        assert set(c.message["timings"]) >= {
            "denoise_ms",
            "refresh_ms",
            "decode_ms",
            "encode_ms",
            "queue_ms",
        }


def test_shot_continues_then_queued_prompt_starts_after_it(server):
    d = server.create(shots=["wide shot, the circle stays still"], seed=1)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            r = httpx.post(
                f"{server.base}/v1/sessions/{d['session_id']}/prompts",
                json={"prompt": "close-up shot, the circle moves down", "mode": "queue"},
                headers={"Authorization": f"Bearer {d['token']}"},
            )
            assert r.status_code == 202, r.text
            acc = r.json()
            await c.until(lambda m: m["type"] == "chunk" and m["seq"] >= acc["starts_at_seq"] + 3)
            await c.send({"type": "stop"})
            return acc, await c.closed()

    acc, st = run(go())
    assert acc["starts_at_seq"] == 3  # after the first shot's 3 chunks
    assert any(m["type"] == "prompt_ack" and m["shot_id"] == acc["shot_id"] for m in st.messages)
    shots = st.of("shot")
    assert shots[1]["shot_id"] == acc["shot_id"] and shots[1]["starts_at_seq"] == 3
    # with no prompt queued, the shot that ends continues as a new shot of the same prompt
    assert shots[2]["starts_at_seq"] == 6 and shots[2]["prompt"] == shots[1]["prompt"]
    assert shots[2]["shot_id"] != shots[1]["shot_id"]


def test_two_sessions_isolated_and_one_failure_leaves_the_other(server):
    a = server.create(seed=11)
    b = server.create(seed=12)

    async def go():
        async with (
            StreamClient(a["stream_url"], a["token"]) as ca,
            StreamClient(b["stream_url"], b["token"]) as cb,
        ):
            await asyncio.gather(ca.chunks(2), cb.chunks(2))
            assert (
                ca.stream.chunks[0].data != cb.stream.chunks[0].data
            )  # seeds differ: bytes differ
            r = httpx.post(
                f"{server.base}/v1/debug/faults",
                json={"session_id": a["session_id"], "kind": "exception"},
            )
            assert r.status_code == 200
            err = await ca.until(lambda m: m["type"] == "error")
            sa = await ca.closed()
            n = len(cb.stream.chunks)
            await cb.chunks(3)  # b keeps streaming after a failed
            assert len(cb.stream.chunks) >= n + 3
            await cb.send({"type": "stop"})
            return err, sa, await cb.closed()

    err, sa, sb = run(go())
    assert err["fatal"] is True and err["code"] == "session_failed" and "injected" in err["message"]
    assert sa.close_code == 4500
    assert sb.of("ended")[0]["reason"] == "stopped"
    st = httpx.get(
        f"{server.base}/v1/sessions/{a['session_id']}",
        headers={"Authorization": f"Bearer {a['token']}"},
    )
    assert st.json()["state"] == "failed" and "injected" in st.json()["error"]
    assert server.wait_metric("shotstream_pool_bytes", 0) == 0


def test_oom_in_one_session_fails_it_cleanly(server):
    a = server.create(seed=21)
    b = server.create(seed=22)

    async def go():
        async with (
            StreamClient(a["stream_url"], a["token"]) as ca,
            StreamClient(b["stream_url"], b["token"]) as cb,
        ):
            await asyncio.gather(ca.chunks(1), cb.chunks(1))
            httpx.post(
                f"{server.base}/v1/debug/faults",
                json={"session_id": a["session_id"], "kind": "oom"},
            )
            err = await ca.until(lambda m: m["type"] == "error")
            await ca.closed()
            await cb.chunks(2)
            await cb.send({"type": "stop"})
            await cb.closed()
            return err, ca.stream

    err, sa = run(go())
    assert err["code"] == "out_of_memory" and err["fatal"] and sa.close_code == 4500
    assert server.metric("shotstream_errors_total", {"kind": "oom"}) >= 1
    assert server.wait_metric("shotstream_pool_bytes", 0) == 0


@pytest.mark.parametrize("how", ["disconnect", "delete"])
def test_pool_returns_to_zero(server, how):
    d = server.create(seed=31)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            assert server.metric("shotstream_pool_bytes") > 0
            if how == "delete":
                r = httpx.delete(
                    f"{server.base}/v1/sessions/{d['session_id']}",
                    headers={"Authorization": f"Bearer {d['token']}"},
                )
                assert r.status_code == 204
                return await c.closed()
            c.ws.transport.abort()  # no close handshake: the peer just vanishes
        return None

    st = run(go())
    if how == "delete":
        assert st.of("ended")[0]["reason"] == "deleted"
    else:  # abrupt disconnect mid-stream: the idle grace (2 s) ends and frees it
        assert (
            server.wait_metric("shotstream_sessions_ended_total", 1, labels={"reason": "idle"}) >= 1
        )
    assert server.wait_metric("shotstream_pool_bytes", 0) == 0
    st = httpx.get(
        f"{server.base}/v1/sessions/{d['session_id']}",
        headers={"Authorization": f"Bearer {d['token']}"},
    )
    assert st.json()["state"] == "ended"


def test_reconnect_resumes_from_the_next_keyframe(server, tmp_path):
    d = server.create(seed=41)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            first = await c.chunks(2)
        # (until the server has seen the first connection close it answers 4009)
        c2 = await reconnect(f"{d['stream_url']}?token={d['token']}")
        try:
            hello = c2.stream.of("hello")[0]
            again = await c2.chunks(2)
            await c2.send({"type": "stop"})
            await c2.closed()
            return first, hello, again, c2.stream
        finally:
            await c2.__aexit__()

    first, hello, again, st = run(go())
    assert hello["session_id"] == d["session_id"] and st.init
    assert again[0].message["seq"] > first[-1].message["seq"]  # continues, never repeats
    seqs = [c.message["seq"] for c in again]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    path = tmp_path / "resumed.mp4"
    path.write_bytes(st.video())  # a fresh init + segments from a keyframe on decode
    frames = ffprobe_frames(path)
    assert (
        len(frames) == sum(c.message["frames"] for c in st.chunks) and frames[0]["key_frame"] == 1
    )


def test_resume_replays_from_the_clients_last_seq_and_reacks_waiting_prompts(server):
    """A client that lost the tail of a dropped connection names its last chunk: the server
    sends the kept chunks after it again, says where the connection starts, and repeats the
    acks of prompts still waiting (they may have been lost too)."""
    d = server.create(seed=51)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            got = await c.chunks(3)
            # two queued shots: the first may start before the reconnect (a tiny chunk
            # takes a fraction of its playout time); the second waits behind its 3 chunks
            for ref in ("q0", "q1"):
                await c.send(
                    {"type": "prompt", "prompt": "close-up shot", "mode": "queue", "ref": ref}
                )
            ack = await c.until(lambda m: m["type"] == "prompt_ack" and m.get("ref") == "q1")
            c.ws.transport.abort()
        last = got[0].message["seq"]  # pretend chunks after the first never arrived
        await asyncio.sleep(
            0.5
        )  # the server notices the vanished peer (it sends into a dead socket)
        async with StreamClient(
            f"{d['stream_url']}?token={d['token']}&last_seq={last}", None
        ) as c2:
            hello = await c2.until(lambda m: m["type"] == "hello")
            reack = await c2.until(
                lambda m: m["type"] == "prompt_ack" and m["shot_id"] == ack["shot_id"]
            )
            again = await c2.chunks(2)
            await c2.send({"type": "stop"})
            await c2.closed()
            return ack, last, hello, reack, again

    ack, last, hello, reack, again = run(go())
    assert ack["ref"] == "q1"
    assert hello["next_seq"] == last + 1
    assert again[0].message["seq"] == last + 1  # replayed, not lost
    assert reack["shot_id"] == ack["shot_id"] and reack["starts_at_seq"] == ack["starts_at_seq"]


def test_pause_and_resume_over_rest(server):
    d = server.create(seed=61)
    url, hdr = (
        f"{server.base}/v1/sessions/{d['session_id']}",
        {"Authorization": f"Bearer {d['token']}"},
    )

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            assert httpx.post(url + "/pause", headers=hdr).status_code == 204
            assert httpx.get(url, headers=hdr).json()["state"] == "paused"
            r = httpx.post(url + "/pause", headers=hdr)  # pausing twice is harmless
            assert r.status_code == 204
            assert httpx.post(url + "/resume", headers=hdr).status_code == 204
            assert httpx.get(url, headers=hdr).json()["state"] == "streaming"
            r = httpx.post(url + "/resume", headers=hdr)
            assert r.status_code == 409 and r.json()["code"] == "invalid_state"
            await c.chunks(1)  # generation resumed
            await c.send({"type": "stop"})
            await c.closed()

    run(go())
    assert httpx.post(url + "/pause", headers=hdr).status_code == 409  # ended
