"""The load generator: a short run against a real server returns the documented numbers,
and it refuses non-loopback servers and unbounded runs."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from clients.load import LoadConfig, is_loopback, run_load
from tests.clients.conftest import API_KEY
from tests.support.server import REPO

KEYS = {
    "sessions_started",
    "sessions_refused",
    "refused_by_status",
    "retry_after_s",
    "chunks",
    "frames",
    "video_s",
    "ttff_s",
    "inter_chunk_gap_s",
    "deadline_misses",
    "stalled_s",
    "prompts_sent",
    "prompts_visible",
    "prompts_dropped",
    "prompt_to_visible_s",
    "reconnects",
    "errors",
    "wall_s",
}


def test_short_load_run_reports_sane_numbers(server):
    cfg = LoadConfig(
        server=server.base, sessions=2, duration_s=6, prompt_every_s=1.5, seed=1, api_key=API_KEY
    )
    result = asyncio.run(run_load(cfg))
    assert set(result) >= KEYS
    assert result["errors"] == {} and result["sessions_refused"] == 0
    assert result["sessions_started"] == 2 and result["chunks"] > 0
    assert result["frames"] >= 9 * result["chunks"] and result["video_s"] > 0
    assert 0 < result["ttff_s"]["p50"] <= result["ttff_s"]["p95"]
    gaps = result["inter_chunk_gap_s"]
    if result["chunks"] > 2:
        assert 0 < gaps["p50"] <= gaps["p95"] <= gaps["p99"]
    assert result["prompts_sent"] >= result["prompts_visible"]
    assert 5.5 < result["wall_s"] < 30
    assert server.wait_metric("shotstream_active_sessions", 0) == 0  # both stopped


def test_load_refuses_remote_servers_and_unbounded_runs():
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1")
    assert is_loopback("http://[::1]:8000") and not is_loopback("http://10.1.2.3:8000")
    for bad in (
        LoadConfig(server="http://10.1.2.3:8000"),
        LoadConfig(sessions=0),
        LoadConfig(sessions=10_000),
        LoadConfig(duration_s=0),
        LoadConfig(duration_s=1e6),
    ):
        with pytest.raises(ValueError):
            bad.validate()
    LoadConfig(server="http://10.1.2.3:8000", allow_remote=True).validate()
    r = subprocess.run(
        [sys.executable, "-m", "clients.load", "--server", "http://10.1.2.3:8000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "loopback" in r.stderr and not r.stdout


def test_load_reports_refusals_with_their_retry_after(limits_server):
    cfg = LoadConfig(server=limits_server.base, sessions=2, duration_s=3, prompt_every_s=0)
    result = asyncio.run(run_load(cfg))
    # One session per client: the second is refused (and retried after each Retry-After,
    # which may fit in the run once) until the run ends.
    assert result["sessions_started"] == 1 and result["errors"] == {}, result
    refused = result["refused_by_status"]
    assert set(refused) == {"429"} and result["sessions_refused"] == refused["429"] >= 1
    assert result["retry_after_s"]["min"] >= 1 and result["chunks"] > 0


def test_two_creates_at_once_cannot_both_take_the_last_slot(limits_server):
    """One slot, one session per client: of two requests sent together, one is admitted and
    the other refused, though both arrive while the first's captions are still checked."""

    async def go():
        async with httpx.AsyncClient(base_url=limits_server.base, timeout=30) as http:
            body = {"prompt": "a red circle on a blue background"}
            rs = await asyncio.gather(*(http.post("/v1/sessions", json=body) for _ in range(2)))
            for r in rs:
                if r.status_code == 201:
                    d = r.json()
                    auth = {"Authorization": f"Bearer {d['token']}"}
                    await http.delete(f"/v1/sessions/{d['session_id']}", headers=auth)
            return sorted(r.status_code for r in rs)

    for _ in range(3):
        codes = asyncio.run(go())
        assert codes[0] == 201 and codes[1] in (429, 503), codes
