"""Scale-out on loopback: three tiny-preset replicas behind the real nginx (Debian package)
running the shipped docker/nginx/shotstream.conf.template, with a DNS server standing in for
Kubernetes' (replica `shotstream-N` is `shotstream-N.replicas.test` at 127.0.0.N+2, and
`pool.replicas.test` names all three, as the Service of ready pods does).

One scenario, in order, because a drained replica does not come back: sessions fill every
replica and the next creation gets 503 + Retry-After, unless it asks to wait: then it is
queued (202) only once every replica was found full, and stays on the replica that queued
it, where it starts when a slot frees; creation falls over from a full replica; each
session's stream, prompts, GET and DELETE, its watch links and viewers' stream, and its
recording and timeline reach its owner; SIGTERM drains one replica while the others stream
on; the survivors free everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter

import httpx
import pytest

from tests.support.proxy import DOMAIN, POOL, Names, Nginx, Replica, dns
from tests.support.server import StreamClient, free_port
from tests.support.watchdog import run_within

PER_REPLICA = 2  # max_sessions of each replica
DRAIN_GRACE_S = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    names = Names()
    port = free_port()  # one port on every replica's address, like a container port
    with dns(names) as dns_port:
        replicas = [
            Replica(
                tmp,
                f"127.0.0.{2 + i}",
                port,
                f"shotstream-{i}",
                max_sessions=PER_REPLICA,
                realtime_margin=50,
                session_grace_s=300,
                drain_grace_s=DRAIN_GRACE_S,
            )
            for i in range(3)
        ]
        proxy = None
        try:
            for r in replicas:
                names.table[f"{r.id}.{DOMAIN}"] = [r.host]
            names.table[POOL] = [r.host for r in replicas]
            proxy = Nginx(tmp, dns_port, port).wait_up()
            for r in replicas:
                r.wait_ready()
            yield proxy, {r.id: r for r in replicas}
        finally:
            for r in replicas:
                r.stop()
            if proxy is not None:
                proxy.stop()


def owner(session_id: str) -> str:
    return session_id.split(".", 1)[0]


def auth(d: dict) -> dict:
    return {"Authorization": f"Bearer {d['token']}"}


class Reader:
    """Reads one stream through the proxy in the background, stamping each message."""

    def __init__(self, d: dict):
        self.client = StreamClient(d["stream_url"], d["token"])
        self.stamped: list[tuple[float, dict]] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> Reader:
        await self.client.__aenter__()
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while (msg := await self.client.next(timeout=120)) is not None:
            self.stamped.append((time.monotonic(), msg))

    def chunks(self, after: float = 0.0) -> list[dict]:
        return [m for t, m in self.stamped if m["type"] == "chunk" and t > after]

    async def wait(self, pred, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert self.task is not None and not self.task.done(), (
                f"stream closed ({self.client.stream.close_code}) while waiting for {what}; "
                f"last messages {[m for _, m in self.stamped][-3:]}"
            )
            assert time.monotonic() < deadline, f"no {what} in {timeout}s"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        with contextlib.suppress(Exception):
            await self.client.__aexit__()


@pytest.mark.timeout(360)
def test_sessions_spread_stick_to_their_owner_and_survive_a_drain(cluster):
    proxy, replicas = cluster
    run_within(scenario(proxy, replicas), 270)


async def scenario(proxy: Nginx, replicas: dict[str, Replica]) -> None:
    readers: list[Reader] = []
    async with httpx.AsyncClient(base_url=proxy.base, timeout=30) as http:
        posts = 0  # creation requests answered so far

        async def create(**extra) -> httpx.Response:
            nonlocal posts
            r = await http.post("/v1/sessions", json={"prompt": "a red circle on blue", **extra})
            posts += 1
            return r

        def tried(path: str) -> list[dict]:
            """The proxy's log lines of `path`; for creations, once every answered one is
            there (nginx writes a line after its answer went out, so it can lag behind)."""

            def lines() -> list[dict]:
                return [q for q in proxy.requests() if q["path"] == path]

            if path == "/v1/sessions":
                _until(lambda: len(lines()) >= posts, timeout=10)
            return lines()

        try:
            # -- creation fills every replica, then 503 + Retry-After ------------------------
            sessions: list[dict] = []
            for _ in range(PER_REPLICA * len(replicas)):
                r = await create()
                assert r.status_code == 201, r.text
                sessions.append(r.json())
            placed = Counter(owner(d["session_id"]) for d in sessions)
            assert placed == {rid: PER_REPLICA for rid in replicas}, placed
            for rid, rep in replicas.items():
                cap = httpx.get(rep.base + "/v1/capacity", timeout=10).json()
                assert cap == {
                    "replica_id": rid,
                    "ready": True,
                    "draining": False,
                    "capacity": PER_REPLICA,
                    "sessions": PER_REPLICA,
                    "free_slots": 0,
                }
            full = await create()
            assert full.status_code == 503, full.text
            assert full.json()["code"] == "over_capacity"
            assert int(full.headers["Retry-After"]) >= 1
            last = tried("/v1/sessions")[-1]
            # every replica was asked, twice: for a slot, then for a place in a waiting room
            # (this request did not ask to wait, so each said 503 again)
            assert last["upstream_status"] == "503, 503, 503 : 503, 503, 503"

            # -- one that asks to wait is queued, on the replica that queues it ----------------
            r = await create(wait=True)
            assert r.status_code == 202, r.text
            queued = r.json()
            assert queued["state"] == "queued" and queued["queue_position"] == 1
            first_pass, second_pass = tried("/v1/sessions")[-1]["upstream_status"].split(" : ")
            assert first_pass == "503, 503, 503" and second_pass.endswith("202")
            q_rid = owner(queued["session_id"])
            r = await http.get(f"/v1/sessions/{queued['session_id']}", headers=auth(queued))
            assert r.status_code == 200 and r.json()["state"] == "queued", r.text
            qr = await Reader(queued).start()
            readers.append(qr)
            await qr.wait(
                lambda: any(m["type"] == "queued" for _, m in qr.stamped), "its place in line"
            )
            # a slot frees on its replica: it starts there and streams, through the proxy
            freed = next(d for d in sessions if owner(d["session_id"]) == q_rid)
            r = await http.delete(f"/v1/sessions/{freed['session_id']}", headers=auth(freed))
            assert r.status_code == 204, r.text
            await qr.wait(lambda: len(qr.chunks()) >= 1, "the queued session's first chunk")
            kinds = [m["type"] for _, m in qr.stamped]
            assert kinds[0] == "queued" and "hello" in kinds
            await qr.close()
            readers.remove(qr)
            sessions[sessions.index(freed)] = queued
            queued_gone = freed

            # -- a freed slot is found behind full replicas -----------------------------------
            by_owner = {
                rid: [d for d in sessions if owner(d["session_id"]) == rid] for rid in replicas
            }
            deleted: list[dict] = []
            for rid in list(replicas) * 4:  # rounds until a creation fell over (random start)
                if any(q["upstream_status"].endswith("503, 201") for q in tried("/v1/sessions")):
                    break
                gone = by_owner[rid].pop()
                deleted.append(gone)
                r = await http.delete(f"/v1/sessions/{gone['session_id']}", headers=auth(gone))
                assert r.status_code == 204, r.text
                r = await create()
                assert r.status_code == 201, r.text
                assert owner(r.json()["session_id"]) == rid  # the only replica with room
                by_owner[rid].append(r.json())
            falls = [q for q in tried("/v1/sessions") if q["upstream_status"].endswith("503, 201")]
            assert falls, "no creation was retried past a full replica"

            # -- each session's routes and stream reach its owner --------------------------------
            watched = {rid: ds[0] for rid, ds in by_owner.items()}
            viewer_ids: dict[str, str] = {}
            for d in watched.values():
                assert d["stream_url"].startswith(proxy.base.replace("http", "ws", 1))
                readers.append(await Reader(d).start())
            for (rid, d), rd in zip(watched.items(), readers, strict=True):
                await rd.wait(lambda rd=rd: len(rd.chunks()) >= 1, f"a chunk on {rid}")
                hello = rd.stamped[0][1]
                assert hello["type"] == "hello" and hello["session_id"] == d["session_id"]
                sid = d["session_id"]
                r = await http.post(
                    f"/v1/sessions/{sid}/prompts",
                    headers=auth(d),
                    json={"prompt": "the circle turns green", "mode": "cut"},
                )
                assert r.status_code == 202, r.text
                shot_id = r.json()["shot_id"]
                await rd.wait(
                    lambda rd=rd, shot_id=shot_id: any(
                        m["type"] == "shot" and m["shot_id"] == shot_id for _, m in rd.stamped
                    ),
                    f"the new shot on {rid}",
                )
                r = await http.get(f"/v1/sessions/{sid}", headers=auth(d))
                assert r.status_code == 200 and r.json()["state"] == "streaming", r.text
                # its watch links, their viewers' stream and its recording: the owner too
                r = await http.post(f"/v1/sessions/{sid}/viewers", headers=auth(d))
                assert r.status_code == 201, r.text
                link = r.json()
                assert link["stream_url"].startswith(proxy.base.replace("http", "ws", 1))
                viewer = await Reader(link).start()
                await viewer.wait(
                    lambda v=viewer: len(v.chunks()) >= 1, f"a viewer's chunk on {rid}"
                )
                assert viewer.stamped[0][1]["role"] == "viewer"
                await viewer.close()
                for what, token in (
                    ("recording.mp4", d["token"]),
                    ("timeline.json", link["token"]),
                    ("timeline.vtt", d["token"]),
                ):
                    r = await http.get(
                        f"/v1/sessions/{sid}/{what}", headers={"Authorization": f"Bearer {token}"}
                    )
                    assert r.status_code == 200, (what, r.text)
                assert r.text.startswith("WEBVTT")
                r = await http.delete(
                    f"/v1/sessions/{sid}/viewers/{link['viewer_id']}", headers=auth(d)
                )
                assert r.status_code == 204, r.text
                viewer_ids[sid] = link["viewer_id"]
            # a session id names its replica: another replica's id with this token is unknown
            d0 = watched["shotstream-0"]
            forged = "shotstream-1." + d0["session_id"].split(".", 1)[1]
            r = await http.get(f"/v1/sessions/{forged}", headers=auth(d0))
            assert r.status_code == 404 and r.json()["code"] == "unknown_session", r.text
            r = await http.get("/v1/sessions/no-such-replica.abc123", headers=auth(d0))
            assert r.status_code == 502 and r.json()["code"] == "replica_unavailable", r.text

            # -- SIGTERM drains one replica; the others stream on ---------------------------------
            a, b, c = (replicas[f"shotstream-{i}"] for i in range(3))
            ra, rb, rc = readers
            spare = by_owner[a.id][1]  # make room on a: a new session has somewhere to go
            r = await http.delete(f"/v1/sessions/{spare['session_id']}", headers=auth(spare))
            assert r.status_code == 204, r.text
            b.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(
                lambda: _until(lambda: httpx.get(b.base + "/readyz", timeout=5).status_code == 503)
            )
            cap = httpx.get(b.base + "/v1/capacity", timeout=10).json()
            assert cap["draining"] and not cap["ready"] and cap["free_slots"] == 0, cap
            r = await create()
            assert r.status_code == 201, r.text
            assert owner(r.json()["session_id"]) == a.id  # not the draining b, not the full c
            late = r.json()
            await rb.wait(lambda: rb.task.done(), "the drained stream to close", DRAIN_GRACE_S + 60)
            assert rb.client.stream.close_code == 1001
            assert [m for _, m in rb.stamped if m["type"] == "ended"] == [
                {"type": "ended", "reason": "draining"}
            ]
            assert await asyncio.to_thread(b.proc.wait, 60) == 0
            t_gone = time.monotonic()
            ended = {
                e["session_id"]: e["reason"]
                for e in b.log_events()
                if e.get("event") == "session ended"
            }
            # its live sessions ended by the drain; any deleted earlier ended as deleted: the
            # one deleted to let the queued session in (on whichever replica queued it) and
            # those of the freed-slot search (how many rounds depends on nginx's random start)
            want = {d["session_id"]: "draining" for d in by_owner[b.id]}
            want |= {
                d["session_id"]: "deleted"
                for d in (*deleted, queued_gone)
                if owner(d["session_id"]) == b.id
            }
            assert ended == want
            for rd in (ra, rc):  # chunks kept coming, in order, after b was gone
                await rd.wait(
                    lambda rd=rd: len(rd.chunks(after=t_gone)) >= 2, "chunks after the drain"
                )
                seqs = [m["seq"] for m in rd.chunks()]
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
                assert rd.client.stream.close_code is None
            # a lost replica's sessions are gone; creation skips it (connection refused)
            d_b = watched[b.id]
            r = await http.get(f"/v1/sessions/{d_b['session_id']}", headers=auth(d_b))
            assert r.status_code == 502 and r.json()["code"] == "replica_unavailable", r.text
            spare = by_owner[c.id][1]
            r = await http.delete(f"/v1/sessions/{spare['session_id']}", headers=auth(spare))
            assert r.status_code == 204, r.text
            r = await create()
            assert r.status_code == 201 and owner(r.json()["session_id"]) == c.id, r.text
            by_owner[c.id][1] = r.json()

            # -- nothing leaks on the survivors ----------------------------------------------------
            for rd in readers:
                await rd.close()
            for d in (watched[a.id], late, *by_owner[c.id]):
                r = await http.delete(f"/v1/sessions/{d['session_id']}", headers=auth(d))
                assert r.status_code == 204, r.text
            for rep in (a, c):
                assert await asyncio.to_thread(rep.wait_metric, "shotstream_pool_bytes", 0) == 0
                cap = httpx.get(rep.base + "/v1/capacity", timeout=10).json()
                assert cap["sessions"] == 0 and cap["free_slots"] == PER_REPLICA, cap
                assert rep.metric("shotstream_active_sessions") == 0
                assert rep.metric("shotstream_waiting_sessions") == 0

            # -- the proxy's log: every request of a session went to its owner, only -------------
            for d in (*sessions, *(x for ds in by_owner.values() for x in ds), late, queued_gone):
                rep = replicas[owner(d["session_id"])]
                mine = [
                    q
                    for q in proxy.requests()
                    if q["path"].startswith(f"/v1/sessions/{d['session_id']}")
                ]
                assert all(q["upstream_addr"] == f"{rep.host}:{rep.port}" for q in mine), mine
            streams = {q["path"] for q in proxy.requests() if q["path"].endswith("/stream")}
            assert streams == {
                f"/v1/sessions/{d['session_id']}/stream" for d in (*watched.values(), queued)
            }
            # the new routes reached the owner (the catch-all would have answered 404 itself)
            for d in watched.values():
                sid = d["session_id"]
                answered = {
                    q["path"].removeprefix(f"/v1/sessions/{sid}"): q["status"]
                    for q in proxy.requests()
                    if q["path"].startswith(f"/v1/sessions/{sid}/")
                }
                assert {
                    "/viewers": 201,
                    "/watch": 101,
                    "/recording.mp4": 200,
                    "/timeline.json": 200,
                    "/timeline.vtt": 200,
                    f"/viewers/{viewer_ids[sid]}": 204,
                }.items() <= answered.items(), answered
        finally:
            for rd in readers:
                await rd.close()


def _until(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
