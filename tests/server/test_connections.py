"""Slow and silent connections against a real server (server/connections.py): sockets that
connect and never complete a request are closed, by the request deadline or, past the
connection cap, oldest first, so under a small open-file limit the server still answers
`/readyz`, creates sessions and streams."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from pathlib import Path

import httpx

from server.connections import FD_RESERVE
from tests.support.server import ServerProcess, StreamClient

OPEN_FILES = 256
FLOOD = 300  # more sockets than the server has descriptors


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def flood(port: int, n: int) -> list[socket.socket]:
    """`n` connections, every other one with a request line cut short, the rest silent."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:
            s.sendall(b"GET /readyz HTT")
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], want: int, guard_s: float = 60.0) -> set[int]:
    """Indexes of the sockets the server has closed (end of stream, or reset), waiting (a
    hang guard) until at least `want` are; none of them got a byte of a response."""
    closed: set[int] = set()
    deadline = time.monotonic() + guard_s
    while len(closed) < want and time.monotonic() < deadline:
        live = [s for i, s in enumerate(socks) if i not in closed]
        readable, _, _ = select.select(live, [], [], 0.2)
        for s in readable:
            try:
                data = s.recv(1024)
            except ConnectionResetError:
                data = b""
            assert data == b"", data
            closed.add(socks.index(s))
    return closed


def stream_one_chunk(srv: ServerProcess) -> None:
    d = srv.create(seed=1)

    async def go():
        async with StreamClient(d["stream_url"], d["token"]) as c:
            await c.chunks(1)
            await c.send({"type": "stop"})
            return await c.closed()

    assert run(go()).of("ended")[-1]["reason"] == "stopped"


def test_a_flood_of_unfinished_requests_cannot_use_up_the_servers_descriptors(tmp_path):
    """Before: past the open-file limit the server could accept nothing (`/readyz` failed)
    and the sockets stayed open for as long as their clients liked. The request deadline
    here is far off, so only the connection cap can make room."""
    srv = ServerProcess(
        tmp_path, open_files=OPEN_FILES, http_request_timeout_s=600, realtime_margin=50
    ).wait_ready()
    socks: list[socket.socket] = []
    try:
        [limit] = [
            e["max_connections"] for e in srv.log_events() if e["event"] == "connection limit"
        ]
        assert limit == OPEN_FILES - FD_RESERVE  # descriptors kept for the server's own files
        socks = flood(srv.port, FLOOD)
        assert httpx.get(srv.base + "/readyz", timeout=60).status_code == 200
        stream_one_chunk(srv)
        # The longest waiting went first: the flood's first sockets, as many as it was over.
        closed = closed_by_server(socks, FLOOD - limit)
        assert set(range(FLOOD - limit)) <= closed
        assert len(list(Path(f"/proc/{srv.proc.pid}/fd").iterdir())) < OPEN_FILES
        evicted = srv.metric("shotstream_connections_closed_total", {"reason": "over_limit"})
        assert evicted >= FLOOD - limit
    finally:
        for s in socks:
            s.close()
        assert srv.stop() == 0, srv.log()[-3000:]


def test_requests_that_never_complete_are_closed_and_streams_are_not(tmp_path):
    """Each request must arrive whole within http_request_timeout_s (here 1 s): silent
    sockets, cut request lines and unfinished headers or bodies are closed (before: never),
    while a stream connected before them all, a request that did arrive, goes on."""
    srv = ServerProcess(tmp_path, http_request_timeout_s=1, realtime_margin=50).wait_ready()
    socks: list[socket.socket] = []
    unfinished = (
        b"GET /readyz HTTP/1.1\r\nHost: x\r\n",
        b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n{",
    )
    try:
        d = srv.create(seed=2)

        async def go():
            async with StreamClient(d["stream_url"], d["token"]) as c:
                await c.chunks(1)
                socks.extend(flood(srv.port, 6))
                for head in unfinished:
                    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
                    s.sendall(head)
                    socks.append(s)
                closed = closed_by_server(socks, len(socks))  # over 1 s after the stream began
                assert closed == set(range(len(socks)))
                got = await c.chunks(2)  # and it goes on
                await c.send({"type": "stop"})
                return got, await c.closed()

        got, st = run(go())
        assert len(got) >= 2
        assert st.of("ended")[-1]["reason"] == "stopped"
        timeouts = srv.metric("shotstream_connections_closed_total", {"reason": "request_timeout"})
        assert timeouts >= len(socks)
        with httpx.Client(base_url=srv.base) as client:  # one kept-alive connection
            assert all(client.get("/readyz").status_code == 200 for _ in range(3))
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        assert srv.stop() == 0, srv.log()[-3000:]


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(tmp_path):
    """Streams are never closed to make room: with both allowed connections streaming, a
    new request is answered 503 `over_capacity` (and served once a stream has ended)."""
    srv = ServerProcess(tmp_path, max_connections=2, realtime_margin=50).wait_ready()
    try:
        a, b = srv.create(seed=3), srv.create(seed=4)

        async def go():
            async with StreamClient(a["stream_url"], a["token"]) as ca:
                async with StreamClient(b["stream_url"], b["token"]) as cb:
                    await ca.chunks(1)
                    await cb.chunks(1)
                    async with httpx.AsyncClient(base_url=srv.base) as http:
                        busy = await http.get("/readyz")
                    await cb.send({"type": "stop"})
                    await cb.closed()
                await ca.chunks(1)  # the other stream went on
                await ca.send({"type": "stop"})
                await ca.closed()
            return busy

        busy = run(go())
        assert busy.status_code == 503 and busy.json()["code"] == "over_capacity"
        assert busy.headers["retry-after"] == "5"
        assert httpx.get(srv.base + "/readyz", timeout=30).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
