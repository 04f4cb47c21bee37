"""Watch links (docs/design/protocol.md §15) against a real server (tiny preset, CPU): the
owner mints a link, any number of viewers watch the same stream from the chunk they joined
(byte-identical segments, encoded once), they can read but never change the session, links
are revoked and expire, every limit is answered with a clear error, and a stalled or slow
viewer never slows the owner (deadline misses and stalls compared in one run)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time

import av
import httpx
import pytest
import websockets

from clients.media import FragmentWriter
from server.media import decode_frame
from tests.support.server import ServerProcess, StreamClient, play_in_real_time, recv_within

PHASE_S = 14.0
FPS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("viewers"),
        chunks_per_shot=3,
        max_sessions=3,
        realtime_margin=50,
        max_sessions_per_client=8,
        max_viewers_per_session=3,
        max_viewer_links=2,
        viewer_queue_chunks=2,
        viewer_stall_s=6,
        stream_send_buffer_bytes=16384,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Exception in ASGI application" not in srv.log()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def mint(server, d: dict, **body) -> httpx.Response:
    return httpx.post(
        f"{server.base}/v1/sessions/{d['session_id']}/viewers",
        json=body or None,
        headers=auth(d["token"]),
        timeout=30,
    )


def watch_url(link: dict, features: str = "") -> str:
    return f"{link['stream_url']}?token={link['token']}" + (
        f"&features={features}" if features else ""
    )


def test_viewers_get_the_owners_segments_from_the_chunk_they_joined(server):
    d = server.create(shots=["wide shot, the circle moves left"], seed=5)
    r = mint(server, d)
    assert r.status_code == 201, r.text
    link = r.json()
    assert link["watch_url"].endswith(f"/?watch={d['session_id']}#token={link['token']}")
    assert link["stream_url"].endswith(f"/v1/sessions/{d['session_id']}/watch")

    async def go():
        early = StreamClient(watch_url(link), None)  # before the owner ever connected
        await early.__aenter__()
        early_hello = await early.until(lambda m: m["type"] == "hello")
        owner = StreamClient(f"{d['stream_url']}?token={d['token']}&features=viewers", None)
        await owner.__aenter__()
        await owner.chunks(2)
        late = [StreamClient(watch_url(link), None) for _ in range(2)]
        for v in late:
            await v.__aenter__()
            await v.until(lambda m: m["type"] == "hello")
        # a fourth viewer is over this session's limit (3)
        extra = StreamClient(watch_url(link), None)
        await extra.__aenter__()
        refused = await extra.next()
        await extra.closed()
        # a viewer cannot change the session
        await late[0].send({"type": "prompt", "prompt": "a blue square", "ref": "v1"})
        await late[0].send({"type": "stop", "ref": "v2"})
        await owner.send({"type": "prompt", "prompt": "close-up, the circle turns green"})
        ack = await owner.until(lambda m: m["type"] == "prompt_ack")
        target = ack["starts_at_seq"] + 1
        everyone = [owner, early, *late]
        await asyncio.gather(
            *(c.until(lambda m, c=c: m["type"] == "chunk" and m["seq"] >= target) for c in everyone)
        )
        await owner.send({"type": "stop"})
        streams = [await c.closed() for c in everyone]
        return early_hello, refused, extra.stream, ack, streams

    early_hello, refused, extra, ack, (owner, *viewers) = asyncio.run(asyncio.wait_for(go(), 180))
    assert refused["type"] == "error" and refused["code"] == "viewer_limit" and refused["fatal"]
    assert extra.close_code == 4503
    assert early_hello["role"] == "viewer" and early_hello["next_seq"] == 0
    by_seq = {c.message["seq"]: c for c in owner.chunks}
    for i, v in enumerate(viewers):
        hello = v.of("hello")[0]
        assert (
            hello["role"] == "viewer" and hello["session_id"] == owner.of("hello")[0]["session_id"]
        )
        assert v.init == owner.init
        seqs = [c.message["seq"] for c in v.chunks]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # from the join, in order
        assert seqs[0] == hello["next_seq"]
        if i > 0:
            assert seqs[0] >= 1  # joined mid-stream: the latest chunk, not the first
        for c in v.chunks:  # the same bytes the owner got, and the same announcement
            mine = by_seq[c.message["seq"]]
            assert c.data == mine.data
            assert {k: x for k, x in c.message.items() if k != "timings"} == {
                k: x for k, x in mine.message.items() if k != "timings"
            }
        shot = next(m for m in v.of("shot") if m["shot_id"] == ack["shot_id"])
        kinds = [(m["type"], m.get("seq", m.get("starts_at_seq"))) for m in v.messages]
        assert kinds.index(("shot", shot["starts_at_seq"])) < kinds.index(
            ("chunk", ack["starts_at_seq"])
        )
        assert not v.of("prompt_ack") and not v.of("prompt_dropped")  # the owner's business
        assert v.of("ended") == [{"type": "ended", "reason": "stopped"}] and v.close_code == 1000
    refusals = [m for m in viewers[1].of("error")]
    assert [(e["code"], e["fatal"], e["ref"]) for e in refusals] == [
        ("forbidden", False, "v1"),
        ("forbidden", False, "v2"),
    ]
    assert max(m["count"] for m in owner.of("viewers")) == 3  # the owner asked to be told
    assert owner.of("ended") == [{"type": "ended", "reason": "stopped"}]
    assert server.wait_metric("shotstream_viewers", 0) == 0
    assert server.metric("shotstream_viewer_bytes_sent_total") > 0


def test_a_viewer_without_instant_cuts_keeps_a_continuous_timeline_across_a_withdrawal(server):
    """The owner takes instant cuts and cuts into video a version-1 viewer already holds:
    that viewer is never sent `withdraw` and cannot remove what it holds, so the new shot is
    placed after it (the same samples, later decode times): a file of its segments plays
    without overlap. A viewer with `withdraw` gets the owner's bytes and the withdrawal."""
    d = server.create(shots=["wide shot, the circle moves left"], seed=9)
    link = mint(server, d).json()

    async def go():
        plain = StreamClient(watch_url(link), None)
        cutting = StreamClient(watch_url(link, "withdraw"), None)
        for v in (plain, cutting):
            await v.__aenter__()
            await v.until(lambda m: m["type"] == "hello")
        owner = StreamClient(f"{d['stream_url']}?token={d['token']}&features=withdraw", None)
        await owner.__aenter__()
        await owner.chunks(3)
        await plain.until(lambda m: m["type"] == "chunk" and m["seq"] >= 2)
        await owner.send({"type": "playhead", "pts": 0.1})
        await owner.send({"type": "prompt", "prompt": "close-up, the circle turns green"})
        ack = await owner.until(lambda m: m["type"] == "prompt_ack")
        target = ack["starts_at_seq"] + 2
        everyone = (owner, plain, cutting)
        await asyncio.gather(
            *(c.until(lambda m, c=c: m["type"] == "chunk" and m["seq"] >= target) for c in everyone)
        )
        await owner.send({"type": "stop"})
        return [await c.closed() for c in everyone]

    owner, plain, cutting = asyncio.run(asyncio.wait_for(go(), 180))
    (withdraw,) = owner.of("withdraw")
    gone = set(withdraw["seqs"])
    assert gone & {c.message["seq"] for c in plain.chunks}, (gone, withdraw)  # it held them

    assert not plain.of("withdraw") and not plain.of("skipped")
    end = 0
    for c in plain.chunks:  # continuous: each chunk starts where the one before ended
        m = c.message
        assert m["first_frame"] == end, [
            (x.message["seq"], x.message["first_frame"]) for x in plain.chunks
        ]
        assert decode_frame(c.data) == m["first_frame"] and m["pts"] == m["first_frame"] / FPS
        end = m["first_frame"] + m["frames"]
    shifted = [c for c in plain.chunks if c.message["seq"] >= withdraw_end(withdraw, owner)]
    assert shifted and all(c.data != by_seq(owner)[c.message["seq"]].data for c in shifted)
    held = io.BytesIO()
    writer = FragmentWriter(held)
    writer.write_init(plain.init)
    for c in plain.chunks:
        writer.write_segment(c.data, c.message["first_frame"], c.message["frames"])
    with av.open(io.BytesIO(held.getvalue()), format="mp4") as f:
        times = [fr.pts for fr in f.decode(video=0)]
    assert len(times) == end and times == sorted(set(times))  # every frame, none overlapping

    assert cutting.of("withdraw") and cutting.of("withdraw")[0]["pts"] == withdraw["pts"]
    for c in cutting.chunks:
        assert c.data == by_seq(owner)[c.message["seq"]].data


def by_seq(stream) -> dict:
    return {c.message["seq"]: c for c in stream.chunks}


def withdraw_end(withdraw: dict, owner) -> int:
    """The first seq after those the withdrawal removed: the new shot's first chunk."""
    return min(c.message["seq"] for c in owner.chunks if c.message["seq"] > max(withdraw["seqs"]))


def test_a_watch_link_reads_but_never_changes_and_is_revocable_and_expires(server):
    d = server.create(seed=6)
    sid = d["session_id"]
    a, b = mint(server, d).json(), mint(server, d, ttl_s=1.5).json()
    third = mint(server, d)
    assert third.status_code == 429 and third.json()["code"] == "viewer_limit", third.text
    base = f"{server.base}/v1/sessions/{sid}"
    got = httpx.get(base, headers=auth(a["token"]), timeout=30)
    assert got.status_code == 200 and got.json()["session_id"] == sid
    for method, path, body in (
        ("POST", "/prompts", {"prompt": "a green square"}),
        ("POST", "/pause", None),
        ("POST", "/viewers", None),
        ("GET", "/viewers", None),
        ("DELETE", "", None),
    ):
        r = httpx.request(method, base + path, json=body, headers=auth(a["token"]), timeout=30)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", (path, r.text)
    listed = httpx.get(base + "/viewers", headers=auth(d["token"]), timeout=30).json()
    assert {v["viewer_id"]: v["state"] for v in listed["viewers"]} == {
        a["viewer_id"]: "active",
        b["viewer_id"]: "active",
    }
    assert "token" not in json.dumps(listed)
    r = httpx.delete(base + "/viewers/nope", headers=auth(d["token"]), timeout=30)
    assert r.status_code == 404 and r.json()["code"] == "unknown_viewer"

    async def go():
        # a watch token on the owner's stream is refused
        wrong = StreamClient(f"{d['stream_url']}?token={a['token']}", None)
        await wrong.__aenter__()
        forbidden = await wrong.next()
        await wrong.closed()
        va = StreamClient(watch_url(a), None)
        vb = StreamClient(watch_url(b), None)
        for v in (va, vb):
            await v.__aenter__()
            await v.until(lambda m: m["type"] == "hello")
        r = await asyncio.to_thread(
            httpx.delete, f"{base}/viewers/{a['viewer_id']}", headers=auth(d["token"]), timeout=30
        )
        assert r.status_code == 204
        revoked = await va.closed()
        expired = await vb.closed(timeout=30)  # b expires 1.5 s after it was minted
        again = StreamClient(watch_url(a), None)
        await again.__aenter__()
        refused = await again.next()
        await again.closed()
        return forbidden, wrong.stream, revoked, expired, refused, again.stream

    forbidden, wrong, revoked, expired, refused, again = asyncio.run(asyncio.wait_for(go(), 60))
    assert forbidden["code"] == "forbidden" and wrong.close_code == 4003
    assert revoked.of("error")[-1]["code"] == "unauthorized" and revoked.close_code == 4001
    assert "revoked" in revoked.close_reason
    assert expired.of("error")[-1]["code"] == "unauthorized" and expired.close_code == 4001
    assert "expired" in expired.close_reason
    assert refused["code"] == "unauthorized" and "revoked" in refused["message"]
    assert again.close_code == 4001
    r = httpx.get(base, headers=auth(a["token"]), timeout=30)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    listed = httpx.get(base + "/viewers", headers=auth(d["token"]), timeout=30).json()
    assert {v["viewer_id"]: v["state"] for v in listed["viewers"]} == {
        a["viewer_id"]: "revoked",
        b["viewer_id"]: "expired",
    }
    server.delete(d)
    r = mint(server, d)
    assert r.status_code == 409 and r.json()["code"] == "invalid_state"


def small_socket(url: str) -> socket.socket:
    """A client socket with a small receive buffer, so a reader that does not read makes the
    server's sends block within a few chunks (not after megabytes of kernel buffering)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    return sock


async def stalled(url: str, until: float) -> tuple[int | None, list[dict]]:
    """A viewer that reads its hello, then nothing: the server must close it, not wait."""
    ws = await websockets.connect(url, max_size=None, max_queue=1, sock=small_socket(url))
    seen = [json.loads(await ws.recv())]
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    try:
        while True:
            raw = await recv_within(ws, 10)
            if isinstance(raw, str):
                seen.append(json.loads(raw))
    except websockets.ConnectionClosed:
        pass
    return ws.close_code, seen


async def slow(url: str, until: float) -> list[dict]:
    """A viewer that reads in bursts with long pauses: it falls behind and skips ahead."""
    ws = await websockets.connect(url, max_size=None, max_queue=1, sock=small_socket(url))
    seen: list[dict] = []
    try:
        while time.monotonic() < until:
            # Past what the socket buffers hold (about 2 s of video here), under viewer_stall_s
            await asyncio.sleep(6.0)
            burst = time.monotonic() + 1.0
            while time.monotonic() < burst:  # then read what is there, quickly
                try:
                    raw = await recv_within(ws, 0.5)
                except TimeoutError:
                    break
                if isinstance(raw, str):
                    seen.append(json.loads(raw))
    except websockets.ConnectionClosed:
        pass
    await ws.close()
    return seen


def test_a_stalled_or_slow_viewer_never_slows_the_owner(server):
    def phase(with_viewers: bool):
        d = server.create(seed=7)
        link = mint(server, d).json() if with_viewers else None
        misses_before = server.metric("shotstream_deadline_misses_total")
        skipped_before = server.metric("shotstream_viewer_chunks_skipped_total")

        async def go():
            until = time.monotonic() + PHASE_S
            tasks = [play_in_real_time(f"{d['stream_url']}?token={d['token']}", until)]
            if link is not None:
                tasks += [stalled(watch_url(link), until), slow(watch_url(link), until)]
            return await asyncio.gather(*tasks)

        results = asyncio.run(asyncio.wait_for(go(), PHASE_S + 60))
        misses = server.metric("shotstream_deadline_misses_total") - misses_before
        skipped = server.metric("shotstream_viewer_chunks_skipped_total") - skipped_before
        server.delete(d)
        return results, misses, skipped

    (alone,), misses_alone, _ = phase(with_viewers=False)
    (owner, (stall_code, stall_seen), slow_seen), misses_with, skipped = phase(with_viewers=True)
    # the owner got its video at real time both times: a phase's worth, no more stalls
    assert alone.received_s >= PHASE_S / 2 and owner.received_s >= PHASE_S / 2
    assert owner.misses <= alone.misses + 1, (alone.misses, owner.misses)
    assert misses_with <= misses_alone + 1, (misses_alone, misses_with)
    # the stalled viewer was closed as too slow (4408), the slow one skipped ahead
    assert stall_code == 4408, (stall_code, stall_seen[-3:])
    assert skipped > 0
    notes = [m for m in slow_seen if m["type"] == "skipped"]
    assert notes, [m["type"] for m in slow_seen]
    chunks = [m for m in slow_seen if m["type"] == "chunk"]
    for note in notes:  # told, then the stream goes on at the latest chunk
        after = slow_seen[slow_seen.index(note) + 1 :]
        nxt = next((m for m in after if m["type"] == "chunk"), None)
        if nxt is not None:
            assert nxt["seq"] == note["next_seq"] and max(note["seqs"]) < note["next_seq"]
    seqs = [m["seq"] for m in chunks]
    assert seqs == sorted(set(seqs))  # never twice, never backwards
    assert server.wait_metric("shotstream_viewers", 0) == 0
