"""Faults on the client side of a real server: a client that vanishes at every point of the
stream, and a reader that stops reading. Nothing is lost: a resumed connection says where it
starts (`hello.next_seq`), carries every seq from there, and shows acknowledged prompts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import httpx
import pytest
import websockets

from tests.support.server import ServerProcess, StreamClient, ffprobe_frames, reconnect, recv_within


@pytest.fixture
def server(edge_server):
    return edge_server


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def status(server: ServerProcess, d: dict) -> dict:
    r = httpx.get(
        f"{server.base}/v1/sessions/{d['session_id']}",
        headers={"Authorization": f"Bearer {d['token']}"},
    )
    assert r.status_code == 200, r.text
    return r.json()


async def recv_json(ws, timeout: float = 60) -> dict:
    """The next JSON message on a raw connection; binary frames are skipped."""
    while True:
        raw = await recv_within(ws, timeout)
        if isinstance(raw, str):
            return json.loads(raw)


PROMPT = "close-up shot, the circle moves up"


class RawStream:
    """A WebSocket client on a plain socket with a small receive buffer and no reading of
    its own: while the test does not call `recv`, nothing leaves the kernel's buffer, so the
    server's sends block as a real stalled reader's would."""

    def __init__(self, port: int, path: str):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            part = self.sock.recv(n - len(out))
            assert part, "connection closed"
            out += part
        return out

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + body)

    def recv(self) -> dict:
        """The next JSON message (binary frames skipped; pings answered)."""
        self.sock.settimeout(60)
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload, opcode = self._exact(n), b0 & 0x0F
            if opcode == 0x9:
                self.send(0xA, payload)
            elif opcode == 0x8:
                raise AssertionError(f"closed: {payload[:2].hex()} {payload[2:]!r}")
            elif opcode == 0x1:
                return json.loads(payload)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("point", ["before-hello", "mid-init", "mid-segment", "during-prompt"])
def test_client_vanishes_then_resumes_with_nothing_lost(server, point, tmp_path):
    """The client's TCP connection is aborted (no close frame) at one point of the stream;
    the session survives, and a reconnect that names its last whole chunk gets every seq
    after it, from a keyframe, with a fresh init segment."""
    d = server.create(seed=hash(point) % 1000)
    url = f"{d['stream_url']}?token={d['token']}"

    async def go():
        last = -1  # the last chunk received whole
        ws = await websockets.connect(url, max_size=None)
        if point == "mid-init":
            assert (await recv_json(ws))["type"] == "hello"
            assert (await recv_json(ws))["type"] == "init"  # its binary frame is never read
        elif point == "mid-segment":
            while True:
                msg = await recv_json(ws)
                if msg["type"] == "chunk" and msg["seq"] == 2:
                    break  # announced; its media segment is never read
                if msg["type"] == "chunk":
                    last = msg["seq"]
        elif point == "during-prompt":
            while (msg := await recv_json(ws))["type"] != "chunk":
                pass
            last = msg["seq"]
            await ws.send(json.dumps({"type": "prompt", "prompt": PROMPT}))  # no ack read
        ws.transport.abort()
        c = await reconnect(f"{url}&last_seq={last}")
        try:
            hello = c.stream.messages[0]
            if point == "during-prompt":
                shot = await c.until(lambda m: m["type"] == "shot" and m["prompt"] == PROMPT)
                await c.until(lambda m: m["type"] == "chunk" and m["seq"] >= shot["starts_at_seq"])
            await c.chunks(3)
            await c.send({"type": "stop"})
            return last, hello, await c.closed()
        finally:
            await c.__aexit__()

    last, hello, st = run(go())
    seqs = [c.message["seq"] for c in st.chunks]
    assert hello["next_seq"] == last + 1 and seqs[0] == last + 1
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
    assert st.of("ended") == [{"type": "ended", "reason": "stopped"}]
    if point == "during-prompt":  # the unacknowledged prompt was not lost either
        shot = next(m for m in st.of("shot") if m["prompt"] == PROMPT)
        first = next(c.message for c in st.chunks if c.message["seq"] == shot["starts_at_seq"])
        assert first["shot_id"] == shot["shot_id"]
    path = tmp_path / "resumed.mp4"
    path.write_bytes(st.video())
    frames = ffprobe_frames(path)
    assert len(frames) == sum(c.message["frames"] for c in st.chunks) and frames[0]["key_frame"]
    assert server.wait_metric("shotstream_pool_bytes", 0) == 0


def test_a_resume_does_not_resend_what_the_client_names_as_held(server):
    """A dropped connection can get a chunk out whole before its sender takes it off the
    outbox; a reconnect naming that chunk as its last starts after it. Staged without the
    race: a session not yet watched prepares its lead (chunks 0 and 1) in the outbox, and
    the first connection names chunk 0 as held."""
    package = ("shotstream_verb_duration_seconds_count", {"verb": "package"})
    before = server.metric(*package)
    applied = server.metric("shotstream_prompts_applied_total")
    d = server.create(seed=91)
    assert server.wait_metric(package[0], before + 2, labels=package[1]) == before + 2

    async def go():
        c = await reconnect(f"{d['stream_url']}?token={d['token']}&last_seq=0")
        try:
            await c.chunks(4)
            await c.send({"type": "stop"})
            return c.stream.messages[0], await c.closed()
        finally:
            await c.__aexit__()

    hello, st = run(go())
    seqs = [c.message["seq"] for c in st.chunks]
    assert hello["next_seq"] == 1 and seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4
    # Chunk 0 counts as delivered (the client's), so it does not hold a place in the outbox.
    assert status(server, d)["frames_sent"] > sum(c.message["frames"] for c in st.chunks)
    # ... and the session's first prompt, which chunk 0 showed, counts as applied.
    assert server.metric("shotstream_prompts_applied_total") == applied + 1
    # The recording holds what the client holds: chunk 0 too, and its shot's prompt.
    tl = httpx.get(
        f"{server.base}/v1/sessions/{d['session_id']}/timeline.json",
        headers={"Authorization": f"Bearer {d['token']}"},
    ).json()
    assert tl["chunks"] == 1 + len(seqs) and tl["shots"][0]["first_seq"] == 0
    assert tl["shots"][0]["mode"] == "queue"


def test_a_reader_that_stops_reading_pauses_only_its_own_session(server):
    """A client that stops reading (its socket buffers fill) holds at most the outbox: its
    generation stops while another session streams on; when it reads again it gets every
    seq from 0 and its generation resumes."""
    a, b = server.create(seed=71), server.create(seed=72)

    async def go():
        stuck = RawStream(server.port, f"/v1/sessions/{a['session_id']}/stream?token={a['token']}")
        async with StreamClient(b["stream_url"], b["token"]) as cb:
            # A's planned chunks stop growing while B streams on: the outbox bound holds.
            deadline = time.monotonic() + 90
            while True:
                before = status(server, a)["chunk_seq"]
                await cb.chunks(3)
                after = status(server, a)["chunk_seq"]
                if after == before:
                    break
                assert time.monotonic() < deadline, "a reader that never reads was never paused"
            b_during = len(cb.stream.chunks)
            await cb.chunks(3)  # B is not held back by A
            assert status(server, a)["chunk_seq"] == after  # still paused
            assert status(server, a)["state"] == "streaming"  # paused by the bound, not ended
            # A reads again: every seq from 0, then new chunks past the pause.
            seqs, ended = [], None
            while not seqs or seqs[-1] < after + 2:
                msg = stuck.recv()
                if msg["type"] == "chunk":
                    seqs.append(msg["seq"])
            stuck.send(0x1, json.dumps({"type": "stop"}).encode())
            while ended is None:
                msg = stuck.recv()
                ended = msg if msg["type"] == "ended" else None
            stuck.close()
            await cb.send({"type": "stop"})
            await cb.closed()
            return b_during, after, seqs

    b_during, paused_at, seqs = run(go())
    assert b_during >= 3
    assert seqs == list(range(len(seqs))) and seqs[-1] >= paused_at + 2
    assert server.wait_metric("shotstream_pool_bytes", 0) == 0


def test_a_frame_over_the_transport_limit_closes_only_that_connection(server):
    """A text frame over the transport's frame limit (1 MiB) closes the connection with
    1009; the session stays resumable and the server serves on."""
    d = server.create(seed=81)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            await c.send("x" * (2 << 20))
            st = await c.closed()
        c2 = await reconnect(f"{d['stream_url']}?token={d['token']}")
        try:
            await c2.chunks(1)
            await c2.send({"type": "stop"})
            return st, await c2.closed()
        finally:
            await c2.__aexit__()

    st, st2 = run(go())
    assert st.close_code == 1009
    assert st2.of("ended")[0]["reason"] == "stopped"
    assert httpx.get(server.base + "/readyz").status_code == 200
