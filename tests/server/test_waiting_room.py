"""The waiting room (docs/design/protocol.md §17) against a real server (tiny preset, CPU,
two slots): creations that opt in (`wait: true`) on a full server are queued (202) first
come first served, under concurrent creates too, with positions and estimates on the
stream and on GET; each starts when a slot frees, in order, and streams; past the queue's
length a 503 with Retry-After as before; past its longest wait the session ends
(`wait_timeout`); nothing stays queued after."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.server import ServerProcess, StreamClient

MAX_WAIT_S = 8.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("queue"),
        max_sessions=2,
        realtime_margin=50,
        max_sessions_per_client=8,
        queue_max_length=3,
        queue_max_wait_s=MAX_WAIT_S,
        session_grace_s=60,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Exception in ASGI application" not in srv.log()


def auth(d: dict) -> dict:
    return {"Authorization": f"Bearer {d['token']}"}


def status(server, d: dict) -> dict:
    return httpx.get(f"{server.base}/v1/sessions/{d['session_id']}", headers=auth(d)).json()


async def create_all(server, n: int, wait: bool) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
        return await asyncio.gather(
            *(
                http.post("/v1/sessions", json={"prompt": f"a red circle {i}", "wait": wait})
                for i in range(n)
            )
        )


class Queued:
    """A queued session's stream, read in the background: its `queued` messages, then the
    stream once it starts."""

    def __init__(self, d: dict):
        self.d = d
        self.client = StreamClient(d["stream_url"], d["token"])
        self.task: asyncio.Task | None = None
        self.started_at: float | None = None

    async def start(self) -> Queued:
        await self.client.__aenter__()
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while (msg := await self.client.next(timeout=120)) is not None:
            if msg["type"] == "hello" and self.started_at is None:
                self.started_at = time.monotonic()

    def of(self, kind: str) -> list[dict]:
        return self.client.stream.of(kind)

    async def wait(self, pred, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"no {what}: {self.client.stream.messages[-4:]}"
            await asyncio.sleep(0.05)


def test_queued_sessions_start_in_order_as_slots_free(server):
    running = [server.create(seed=i) for i in range(2)]
    r = httpx.post(f"{server.base}/v1/sessions", json={"prompt": "a circle"}, timeout=30)
    assert r.status_code == 503 and r.json()["code"] == "over_capacity"  # as before, no wait
    replies = asyncio.run(create_all(server, 4, wait=True))
    queued = sorted(
        (x.json() for x in replies if x.status_code == 202), key=lambda d: d["queue_position"]
    )
    full = [x for x in replies if x.status_code != 202]
    assert [d["queue_position"] for d in queued] == [1, 2, 3]
    assert all(d["state"] == "queued" for d in queued)
    assert len(full) == 1 and full[0].status_code == 503
    assert full[0].json()["code"] == "over_capacity" and "waiting room" in full[0].json()["detail"]
    assert int(full[0].headers["Retry-After"]) >= 1
    estimates = [d["estimated_wait_s"] for d in queued]
    assert all(e is not None and e >= 0 for e in estimates) and estimates == sorted(estimates)
    for d in queued:
        st = status(server, d)
        assert st["state"] == "queued" and st["queue_position"] == d["queue_position"]
    assert server.metric("shotstream_queue_length") == 3

    async def go():
        streams = [await Queued(d).start() for d in queued]
        for q, d in zip(streams, queued, strict=True):
            await q.wait(lambda q=q: q.of("queued"), "a queued message")
            first = q.of("queued")[0]
            assert first["position"] == d["queue_position"] and first["queue_length"] == 3
        # each freed slot goes to the first in line, who streams; the others move up
        order = []
        for step, gone in enumerate((running[0], running[1], queued[0])):
            before = [q.started_at for q in streams]
            await asyncio.to_thread(server.delete, gone)
            head = streams[step]
            await head.wait(lambda head=head: head.started_at is not None, "its start")
            for place, q in enumerate(streams[step + 1 :], 1):
                await q.wait(
                    lambda q=q, place=place: q.of("queued")[-1]["position"] == place, "its move"
                )
            order.append([i for i, q in enumerate(streams) if q.started_at and before[i] is None])
        for q in streams[1:]:
            await q.wait(lambda q=q: q.client.stream.chunks, "a chunk")
        results = [q.client.stream for q in streams]
        for q in streams:
            q.task.cancel()
        return order, streams, results

    order, streams, results = asyncio.run(asyncio.wait_for(go(), 180))
    assert order == [[0], [1], [2]]  # first come, first served
    third = results[2]
    positions = [m["position"] for m in third.messages if m["type"] == "queued"]
    assert positions == [3, 2, 1]
    kinds = [m["type"] for m in third.messages]
    assert kinds.index("hello") > max(i for i, k in enumerate(kinds) if k == "queued")
    assert third.chunks and third.chunks[0].message["seq"] == 0  # it streams from the start
    st = status(server, queued[2])
    assert st["state"] == "streaming" and st["queue_position"] is None
    for d in queued[1:]:
        server.delete(d)
    assert server.metric("shotstream_queue_length") == 0
    assert server.metric("shotstream_queue_wait_seconds_count") == 3
    assert server.metric("shotstream_sessions_queued_total") == 3
    assert server.wait_metric("shotstream_pool_bytes", 0) == 0


def test_a_queued_session_ends_after_its_longest_wait_or_when_deleted(server):
    running = [server.create(seed=i) for i in range(2)]
    timeouts = server.metric("shotstream_sessions_ended_total", {"reason": "wait_timeout"})
    (late, deleted) = [
        httpx.post(
            f"{server.base}/v1/sessions", json={"prompt": "a square", "wait": True}, timeout=30
        ).json()
        for _ in range(2)
    ]
    assert (late["queue_position"], deleted["queue_position"]) == (1, 2)

    async def go():
        a, b = await Queued(late).start(), await Queued(deleted).start()
        await b.wait(lambda: b.of("queued"), "a queued message")
        r = await asyncio.to_thread(
            httpx.delete,
            f"{server.base}/v1/sessions/{deleted['session_id']}",
            headers=auth(deleted),
        )
        assert r.status_code == 204
        await b.task
        await a.wait(lambda: a.task.done(), "the end of the wait", MAX_WAIT_S + 30)
        return a.client.stream, b.client.stream

    a, b = asyncio.run(asyncio.wait_for(go(), 120))
    assert b.of("ended") == [{"type": "ended", "reason": "deleted"}] and b.close_code == 1000
    assert a.of("ended") == [{"type": "ended", "reason": "wait_timeout"}] and a.close_code == 1000
    assert not a.of("hello") and {m["position"] for m in a.of("queued")} == {1}
    assert status(server, late)["state"] == "ended"
    assert (
        server.metric("shotstream_sessions_ended_total", {"reason": "wait_timeout"}) == timeouts + 1
    )
    for d in running:
        server.delete(d)
    assert server.metric("shotstream_queue_length") == 0
