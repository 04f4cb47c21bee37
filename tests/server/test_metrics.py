"""/metrics after a real tiny-preset stream: the exposition passes `promtool check metrics`,
its values agree with what the client received, the dashboard and alert rules name only
metrics the server exports (and Prometheus accepts every dashboard query), and the JSON
logs carry the session id and never a token."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import re
import shutil
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import VERBS
from tests.support.engine import engine_metrics
from tests.support.prometheus import ALERTS, prometheus, wait_scraped_after
from tests.support.server import REPO, ServerProcess, Stream, StreamClient

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "shotstream.json"
SHOTS = ["wide shot, a red circle on blue", "close-up shot, the circle turns green"]
CHUNKS = 4  # two shots of two chunks, then the session pauses (on_shot_end=pause)
METRIC_NAME = re.compile(r"\bshotstream_[a-zA-Z0-9_]*[a-zA-Z0-9]")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # a missing system package is a setup error, not a pass
        pytest.fail(f"{tool} not found: run ./.ci/system-deps (Debian package prometheus)")
    return path


@dataclass
class Run:
    text: str  # the /metrics exposition once the session has ended and been freed
    samples: dict[tuple[str, frozenset], float]
    stream: Stream
    session_id: str
    token: str
    connect_to_first_chunk: float  # client-side bounds on the server's latencies
    create_to_shot_visible: list[float]
    log: str  # the server's log up to the scrape
    prometheus: str  # base URL of a Prometheus that scraped the server every second


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("metrics")
    srv = ServerProcess(
        tmp, chunks_per_shot=2, on_shot_end="pause", realtime_margin=50
    ).wait_ready()
    try:
        with prometheus(tmp, f"127.0.0.1:{srv.port}") as prom:
            t_create = time.monotonic()
            d = srv.create(shots=SHOTS, seed=3)

            async def go():
                t0 = time.monotonic()
                async with StreamClient(d["stream_url"], d["token"]) as c:
                    visible = []
                    while len(c.stream.chunks) < CHUNKS:
                        msg = await c.until(lambda m: m["type"] == "chunk")
                        if len(c.stream.chunks) == 1:
                            first = time.monotonic() - t0
                        if msg["seq"] in (0, 2):  # the first chunk of each shot
                            visible.append(time.monotonic() - t_create)
                    await c.send({"type": "stop"})
                    return first, visible, await c.closed()

            first, visible, stream = asyncio.run(go())
            assert srv.wait_metric("shotstream_pool_bytes", 0) == 0
            text = httpx.get(srv.base + "/metrics", timeout=10).text
            # Prometheus holds the final values too, in two scrapes at least (rate() needs two;
            # a scrape can time out while a busy CPU generates, so count the ones after the run)
            wait_scraped_after(prom, time.time())
            wait_scraped_after(prom, time.time())
            yield Run(
                text,
                parse(text),
                stream,
                d["session_id"],
                d["token"],
                first,
                visible,
                srv.log(),
                prom,
            )
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


# -- the exposition -------------------------------------------------------------------------
def test_promtool_check_metrics_passes(run):
    out = subprocess.run(
        [need("promtool"), "check", "metrics"], input=run.text, capture_output=True, text=True
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
    # no `*_created` series beside every counter and histogram
    assert not [name for name, _ in run.samples if name.endswith("_created")]


def test_histograms_are_cumulative_and_complete(run):
    buckets: dict[tuple[str, frozenset], list[tuple[float, float]]] = defaultdict(list)
    for (name, labels), v in run.samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            rest = frozenset((k, x) for k, x in labels if k != "le")
            buckets[(name.removesuffix("_bucket"), rest)].append((float(le), v))
    # ttff, gap, prompt-to-visible, send, queue wait; per verb
    assert len(buckets) == 5 + len(VERBS)
    for (base, labels), series in buckets.items():
        series.sort()
        counts = [c for _, c in series]
        assert counts == sorted(counts), base
        assert series[-1][0] == float("inf")
        assert counts[-1] == run.samples[(base + "_count", labels)], base


# -- values agree with the client ---------------------------------------------------------
def test_frame_chunk_and_byte_counters_equal_what_the_client_received(run):
    s, st = run.samples, run.stream
    frames = sum(c.message["frames"] for c in st.chunks)
    assert len(st.chunks) == CHUNKS and frames == 9 + 12 + 9 + 12  # a shot's first chunk: 9
    assert value(s, "shotstream_frames_sent_total") == frames
    assert value(s, "shotstream_frames_generated_total") == frames
    assert value(s, "shotstream_chunks_generated_total") == CHUNKS
    media = len(st.init) + sum(len(c.data) for c in st.chunks)
    assert value(s, "shotstream_bytes_sent_total") == media
    assert value(s, "shotstream_ws_send_seconds_count") == CHUNKS


def test_session_and_prompt_counters(run):
    s = run.samples
    assert value(s, "shotstream_sessions_created_total") == 1
    ended = {
        dict(k)["reason"]: v for (n, k), v in s.items() if n == "shotstream_sessions_ended_total"
    }
    assert ended["stopped"] == 1 and sum(ended.values()) == 1
    assert set(ended) >= {"deleted", "idle", "expired", "failed", "draining"}  # exported at 0
    refused = {
        dict(k)["reason"]: v for (n, k), v in s.items() if n == "shotstream_sessions_refused_total"
    }
    assert refused == {"capacity": 0, "quota": 0, "draining": 0, "not_ready": 0, "queue_full": 0}
    assert value(s, "shotstream_prompts_received_total") == len(SHOTS)
    assert value(s, "shotstream_prompts_applied_total") == len(SHOTS)
    dropped = [v for (n, _), v in s.items() if n == "shotstream_prompts_dropped_total"]
    assert dropped and sum(dropped) == 0
    assert run.stream.of("ended") == [{"type": "ended", "reason": "stopped"}]
    errors = [v for (n, _), v in s.items() if n == "shotstream_errors_total"]
    assert errors and sum(errors) == 0


def test_latency_histograms_within_what_the_client_measured(run):
    s = run.samples
    assert value(s, "shotstream_time_to_first_frame_seconds_count") == 1
    ttff = value(s, "shotstream_time_to_first_frame_seconds_sum")
    assert 0 < ttff <= run.connect_to_first_chunk
    assert value(s, "shotstream_inter_chunk_gap_seconds_count") == CHUNKS - 1
    assert value(s, "shotstream_prompt_to_visible_seconds_count") == len(SHOTS)
    p2v = value(s, "shotstream_prompt_to_visible_seconds_sum")
    assert 0 < p2v <= sum(run.create_to_shot_visible)
    # the first chunk cannot be late: its delivery starts the player's clock
    assert 0 <= value(s, "shotstream_deadline_misses_total") <= CHUNKS - 1


def test_every_verb_is_timed(run):
    count = {v: value(run.samples, "shotstream_verb_duration_seconds_count", verb=v) for v in VERBS}
    assert count["denoise"] == count["decode"] == count["package"] == CHUNKS
    assert count["text"] == count["prefill"] == len(SHOTS)  # once per shot start
    assert count["context"] == len(SHOTS) - 1  # the first shot has no earlier shot to read
    assert count["refresh"] >= len(SHOTS)


def test_gauges_after_the_session_ended(run):
    s = run.samples
    assert value(s, "shotstream_active_sessions") == value(s, "shotstream_waiting_sessions") == 0
    assert value(s, "shotstream_pool_bytes") == 0
    kinds = {dict(k)["kind"]: v for (n, k), v in s.items() if n == "shotstream_cache_bytes"}
    assert set(kinds) >= {"kv", "decoder"} and all(v == 0 for v in kinds.values())
    assert value(s, "shotstream_realtime_factor") > 0
    assert value(s, "shotstream_chunk_cost_seconds") > 0
    assert value(s, "shotstream_free_slots") == value(s, "shotstream_capacity_sessions") >= 1


def test_build_info(run):
    (labels,) = [dict(k) for (n, k), _ in run.samples.items() if n == "shotstream_build_info"]
    assert labels["version"] == importlib.metadata.version("shotstream")
    assert labels["preset"] == "tiny" and labels["device"] == "cpu"
    assert labels["torch"] == torch.__version__ and labels["attention"]


def test_gpu_memory_gauge_on_cuda():
    """The engine's gauges with a runner that reports CUDA memory (no GPU needed)."""
    runner = SimpleNamespace(
        pool=SimpleNamespace(breakdown=lambda: {"kv": 0, "decoder": 0}, bytes_in_use=0),
        memory_stats=lambda: {"allocated": 3 << 30, "reserved": 4 << 30},
        bytes_per_session=lambda: 1 << 30,
        free_device_bytes=lambda: 8 << 30,
    )
    metrics = engine_metrics(runner)
    samples = parse(metrics.render().decode())
    assert value(samples, "shotstream_gpu_memory_bytes", kind="allocated") == 3 << 30
    assert value(samples, "shotstream_gpu_memory_bytes", kind="reserved") == 4 << 30


# -- the dashboard and alert rules name what the server exports ----------------------------
def exported_names(run) -> set[str]:
    names = {name for name, _ in run.samples}
    names.add("shotstream_gpu_memory_bytes")  # CUDA only: see test_gpu_memory_gauge_on_cuda
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def test_dashboard_and_alerts_name_only_exported_metrics(run):
    names = exported_names(run)
    for where, expr in dashboard_queries() + alert_queries():
        used = set(METRIC_NAME.findall(expr))
        assert used or expr.startswith("up{"), f"{where}: no shotstream metric in {expr!r}"
        assert used <= names, f"{where}: {sorted(used - names)} not exported"


def test_every_exported_metric_has_a_panel(run):
    families = {fam.name for fam in text_string_to_metric_families(run.text)}
    families.add("shotstream_gpu_memory_bytes")
    shown = set()
    for _, expr in dashboard_queries():
        for name in METRIC_NAME.findall(expr):
            shown.add(re.sub(r"_(bucket|sum|count|total|info)$", "", name))
    assert {f.removesuffix("_total").removesuffix("_info") for f in families} <= shown


def test_prometheus_accepts_and_answers_every_dashboard_query(run):
    exported = {name for name, _ in run.samples}
    for title, expr in dashboard_queries():
        q = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        r = httpx.get(run.prometheus + "/api/v1/query", params={"query": q}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "success", (title, q, r.text)
        if set(METRIC_NAME.findall(expr)) <= exported:  # GPU memory is absent on CPU
            assert r.json()["data"]["result"], f"{title}: no data for {q}"
    # the frames counter as Prometheus stored it from the last scrape
    r = httpx.get(
        run.prometheus + "/api/v1/query", params={"query": "shotstream_frames_sent_total"}
    ).json()
    assert float(r["data"]["result"][0]["value"][1]) == value(
        run.samples, "shotstream_frames_sent_total"
    )


def test_prometheus_evaluates_the_alert_rules_without_error(run):
    deadline = time.monotonic() + 30
    while True:
        groups = httpx.get(run.prometheus + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and not any(r["lastEvaluation"].startswith("0001") for r in rules):
            break  # every rule evaluated at least once
        assert time.monotonic() < deadline, "rules never evaluated"
        time.sleep(0.2)
    assert {r["name"] for r in rules} == {name for name, _ in alert_queries()}
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    # a short stream fires nothing (late chunks on a slow CPU at most make an alert pending)
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == [], firing


# -- structured logs ------------------------------------------------------------------------
def test_logs_one_json_object_per_event_with_the_session_id(run):
    text = run.log
    # every line is one JSON object (uvicorn's and ours alike, the start banner too)
    events = [json.loads(line) for line in text.splitlines()]
    assert all({"ts", "level", "logger", "event"} <= set(e) for e in events)
    mine = [e["event"] for e in events if e.get("session_id") == run.session_id]
    for event in ("session created", "stream connected", "session ended"):
        assert event in mine, f"no {event!r} line with the session id"
    ended = next(e for e in events if e["event"] == "session ended")
    assert ended["reason"] == "stopped"
    # uvicorn's request line for the stream names the session, not the token
    ws = [e for e in events if "/stream" in e["event"] and "WebSocket" in e["event"]]
    assert ws and all(e["session_id"] == run.session_id for e in ws)
    assert run.token not in text and "token=[redacted]" in text


def test_log_level_comes_from_the_setting(monkeypatch):
    from server.logs import setup_logging
    from server.settings import Settings

    monkeypatch.setenv("SHOTSTREAM_LOG_LEVEL", "warning")
    names = ("shotstream", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {
        n: (
            logging.getLogger(n).handlers[:],
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
        )
        for n in names
    }
    try:
        setup_logging(Settings().log_level)
        sessions = logging.getLogger("shotstream.sessions")
        assert not sessions.isEnabledFor(logging.INFO) and sessions.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)
        setup_logging("debug")
        assert sessions.isEnabledFor(logging.DEBUG)
    finally:
        for n, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
