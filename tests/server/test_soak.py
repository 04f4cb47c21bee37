"""Load and churn against a real server, with memory read before and after.

Two runs, each in two sizes: the brief size in the default suite, the long size marked
`slow` for `make soak`, which prints each run's figures as one JSON line.

- At the admission limit: the load generator asks for more sessions than the server
  admits, with prompts at random times; the excess is refused with a Retry-After and
  retried until the run ends. Afterwards no session is left and the pool is empty.
- Churn: sessions created, streamed, prompted and ended in pairs, 100+ in the long run.
  The server's resident memory after a warm-up and after the run stays flat (one leaked
  session's device state alone is ~9 MiB on the tiny preset).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from clients.client import Chunk, ShotStreamClient
from clients.load import LoadConfig, run_load
from tests.support.server import ServerProcess

MIB = 2**20
ADMITTED = 2  # max_sessions of the server under test


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("soak"),
        max_sessions=ADMITTED,
        max_sessions_per_client=64,
        realtime_margin=50,
        chunks_per_shot=3,
        session_grace_s=2,
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    log = srv.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log


def settled(server: ServerProcess) -> dict:
    """Wait until no session is left, then read what the server holds."""
    server.wait_metric("shotstream_active_sessions", 0)
    server.wait_metric("shotstream_waiting_sessions", 0)
    server.wait_metric("shotstream_pool_bytes", 0)
    return {"rss_mib": round(rss_bytes(server.proc.pid) / MIB, 1)}


@pytest.mark.parametrize(
    "duration_s",
    [pytest.param(20, id="brief"), pytest.param(240, id="soak", marks=pytest.mark.slow)],
)
def test_held_at_the_admission_limit_then_nothing_left(server, duration_s):
    before = settled(server)
    cfg = LoadConfig(
        server=server.base,
        sessions=ADMITTED + 2,
        duration_s=duration_s,
        prompt_every_s=3.0,
        seed=duration_s,
        ramp_s=1.0,
    )
    result = asyncio.run(run_load(cfg))
    after = settled(server)
    figures = {"run": "admission_limit", **result, "server_before": before, "server_after": after}
    print(json.dumps(figures))
    # exactly the admitted sessions streamed; the others were refused, told when to retry
    assert result["sessions_started"] == ADMITTED, figures
    assert result["sessions_refused"] >= 2 and set(result["refused_by_status"]) == {"503"}
    assert result["retry_after_s"]["min"] >= 1
    assert result["errors"] == {} and result["chunks"] > 0
    # every prompt acknowledged was shown or reported dropped (the run may end first)
    assert result["prompts_sent"] > 0
    assert result["prompts_visible"] + result["prompts_dropped"] <= result["prompts_sent"]


async def _one_session(client: ShotStreamClient, i: int) -> int:
    """Create, stream to the first chunk, prompt, stream one more chunk, stop."""
    session = await client.create_session(
        f"churn caption {i}", shots=["wide shot"], seed=i, retry=True
    )
    chunks = 0
    async with session:
        await session.connect()
        async for ev in session.stream():
            if isinstance(ev, Chunk):
                chunks += 1
                if chunks == 1:
                    await session.prompt(f"close-up shot {i}", "cut")
                if chunks == 2:
                    break
        await session.stop()
        async with asyncio.timeout(10):
            while await session.next_event() is not None:
                pass
    return chunks


@pytest.mark.parametrize(
    "sessions", [pytest.param(24, id="brief"), pytest.param(120, id="soak", marks=pytest.mark.slow)]
)
def test_churn_of_sessions_leaves_memory_flat(server, sessions):
    async def churn(n: int, start: int) -> int:
        async with ShotStreamClient(server.base) as client:
            got = 0
            for i in range(start, start + n, ADMITTED):
                got += sum(
                    await asyncio.gather(*(_one_session(client, j) for j in range(i, i + ADMITTED)))
                )
            return got

    warm = 8
    asyncio.run(churn(warm, 0))  # allocator pools, caches and lazy imports reach their size
    before = settled(server)
    t0 = time.monotonic()
    chunks = asyncio.run(churn(sessions, warm))
    after = settled(server)
    growth = after["rss_mib"] - before["rss_mib"]
    figures = {
        "run": "churn",
        "sessions": sessions,
        "chunks": chunks,
        "wall_s": round(time.monotonic() - t0, 1),
        "server_before": before,
        "server_after": after,
        "rss_growth_mib": round(growth, 1),
    }
    print(json.dumps(figures))
    assert chunks == 2 * sessions
    # a leaked session (its ~9 MiB of caches and decoder state, or its encoder and buffers)
    # would grow RSS by that much per session
    assert growth < 48, figures


@pytest.mark.slow
def test_hostile_mix_beside_honest_load(tmp_path):
    """`make soak` only: two honest load-generator sessions for 180 s beside an abusive
    client that cycles, for the whole run, through a reconnect storm, a frame flood and a
    frozen socket on a session of its own (tests/server/test_fairness.py's abuser, again
    and again). The honest sessions are served, the abuser's floods are closed, and
    nothing is left afterwards: no session, no device state, no video held."""
    from tests.server.test_fairness import abuser

    srv = ServerProcess(
        tmp_path,
        max_sessions=3,
        realtime_margin=50,
        max_sessions_per_client=64,
        lead_chunks=3,
        session_grace_s=5,
        chunks_per_shot=3,
    ).wait_ready()
    duration = 180.0
    try:

        async def abuse(until: float) -> list[dict]:
            rounds = []
            while time.monotonic() < until - 20:
                d = await asyncio.to_thread(srv.create, seed=len(rounds))
                url = f"{d['stream_url']}?token={d['token']}"
                rounds.append(await abuser(url, time.monotonic() + 15))
                await asyncio.to_thread(srv.delete, d)
            return rounds

        async def go():
            until = time.monotonic() + duration
            cfg = LoadConfig(
                server=srv.base, sessions=2, duration_s=duration, prompt_every_s=4.0, seed=7
            )
            return await asyncio.gather(run_load(cfg), abuse(until))

        result, rounds = asyncio.run(go())
        after = settled(srv)
        held = srv.wait_metric("shotstream_outbox_bytes", 0)
        figures = {
            "run": "hostile_mix",
            **result,
            "abuse_rounds": len(rounds),
            "abuser_chunks": sum(r["chunks"] for r in rounds),
            "flood_closes": sum(r["flood_close"] == 4429 for r in rounds),
            "server_deadline_misses": srv.metric("shotstream_deadline_misses_total"),
            "server_after": after,
            "outbox_bytes_after": held,
        }
        print(json.dumps(figures))
        assert result["sessions_started"] == 2 and result["errors"] == {}, figures
        assert all(r["flood_close"] == 4429 for r in rounds) and rounds
        assert held == 0
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log
