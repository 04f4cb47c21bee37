"""Writes docker/grafana/dashboards/shotstream.json, the provisioned Grafana dashboard.

The panels are listed here as data, so the JSON is never edited by hand:

    python docker/grafana/dashboard.py           # rewrite the JSON
    python docker/grafana/dashboard.py --check   # exit 1 if the JSON is stale

tests/docker checks that the JSON is up to date, that every metric its queries name is one
the server exports, that every exported metric has a panel, and that Prometheus accepts
every query. bench/dashboard_snapshot.py renders the panels from a real scrape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "shotstream.json"
DS = {"type": "prometheus", "uid": "shotstream-prometheus"}  # provisioning/datasources
SEL = '{instance=~"$instance"}'
RATE = "$__rate_interval"


def sel(extra: str = "") -> str:
    """The instance selector, with more matchers if given."""
    return SEL if not extra else SEL[:-1] + "," + extra + "}"


def quantile(q: float, hist: str, by: str = "") -> str:
    keys = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({q}, sum by ({keys}) (rate({hist}_bucket{SEL}[{RATE}])))"


def per_minute(counter: str, by: str = "", extra: str = "") -> str:
    agg = f"sum by ({by})" if by else "sum"
    return f"60 * {agg} (rate({counter}{sel(extra)}[{RATE}]))"


def latency(hist: str) -> list[tuple[str, str]]:
    return [(quantile(0.5, hist), "p50"), (quantile(0.95, hist), "p95")]


# Rows of panels, three to a line: (title, description, unit, stacked, [(expr, legend)]).
# Units are Grafana's: s, bytes, Bps, short.
# A table: one line per panel field reads better than the formatter's layout.
# fmt: off
ROWS: list[tuple[str, list[tuple[str, str, str, bool, list[tuple[str, str]]]]]] = [
    ("Sessions and real time", [
        ("Sessions", "Streaming (a stream connected) and waiting (none connected) sessions, "
         "and how many this replica can keep real time.", "short", False, [
            (f"sum(shotstream_active_sessions{SEL})", "streaming"),
            (f"sum(shotstream_waiting_sessions{SEL})", "waiting"),
            (f"sum(shotstream_capacity_sessions{SEL})", "capacity"),
        ]),
        ("Free slots", "Real-time session slots free for new sessions (0 while warming up "
         "or draining).", "short", False, [
            (f"sum(shotstream_free_slots{SEL})", "free slots"),
        ]),
        ("Real-time factor", "Video seconds produced per wall second (30 s window). Each "
         "streaming session needs 1.0: below the 'needed' line, viewers stall.", "short", False, [
            (f"sum(shotstream_realtime_factor{SEL})", "produced"),
            (f"sum(shotstream_active_sessions{SEL})", "needed"),
        ]),
    ]),
    ("Replicas: each and in total", [
        ("Sessions by replica", "Sessions alive (streaming or waiting) on each replica, and "
         "in all. Sessions never move: a replica keeps its own until they end.", "short", False, [
            (f"sum by (instance) (shotstream_active_sessions{SEL}) + "
             f"sum by (instance) (shotstream_waiting_sessions{SEL})", "{{instance}}"),
            (f"sum(shotstream_active_sessions{SEL}) + sum(shotstream_waiting_sessions{SEL})",
             "total"),
        ]),
        ("Free slots by replica", "Real-time slots each replica would admit now (0 while "
         "warming up or draining), and in all: what the proxy can still place.", "short",
         False, [
            (f"sum by (instance) (shotstream_free_slots{SEL})", "{{instance}}"),
            (f"sum(shotstream_free_slots{SEL})", "total"),
        ]),
        ("Real-time factor by replica", "Video seconds produced per wall second on each "
         "replica; each of its streaming sessions needs 1.0.", "short", False, [
            (f"sum by (instance) (shotstream_realtime_factor{SEL})", "{{instance}}"),
            (f"sum(shotstream_realtime_factor{SEL})", "total produced"),
            (f"sum(shotstream_active_sessions{SEL})", "total needed"),
        ]),
        ("Deadline misses by replica", "Chunks that reached their viewer late, per minute, "
         "on each replica and in all.", "short", False, [
            (per_minute("shotstream_deadline_misses_total", "instance"), "{{instance}}"),
            (per_minute("shotstream_deadline_misses_total"), "total"),
        ]),
        ("Refused sessions by replica", "Creations each replica refused, per minute, any "
         "reason. Behind the proxy a refusal is retried on another replica: clients get a "
         "503 only when every replica refuses at once.", "short", False, [
            (per_minute("shotstream_sessions_refused_total", "instance"), "{{instance}}"),
            (per_minute("shotstream_sessions_refused_total"), "total"),
        ]),
    ]),
    ("Latency", [
        ("Time to first frame", "Stream connection to its first chunk sent.", "s", False,
         latency("shotstream_time_to_first_frame_seconds")),
        ("Inter-chunk gap", "Time between consecutive chunks of one stream; real time needs "
         "it at or under a chunk's playout time.", "s", False,
         latency("shotstream_inter_chunk_gap_seconds")),
        ("Prompt to visible", "A shot prompt received to the first chunk of its shot sent.",
         "s", False, latency("shotstream_prompt_to_visible_seconds")),
        ("Per-verb duration p95 (stacked)", "Hot-path verbs per chunk (denoise, refresh, "
         "decode, package) and per shot start (text, context, prefill).", "s", True, [
            (quantile(0.95, "shotstream_verb_duration_seconds", "verb"), "{{verb}}"),
        ]),
        ("Chunk cost", "Worker seconds per chunk (moving average), the capacity estimate's "
         "input.", "s", False, [
            (f"max(shotstream_chunk_cost_seconds{SEL})", "worker s / chunk"),
        ]),
        ("WebSocket send time", "Time to send one chunk (message and segment): a slow reader "
         "or network shows here.", "s", False, latency("shotstream_ws_send_seconds")),
    ]),
    ("Flow", [
        ("Deadline misses", "Chunks that reached their viewer after the player ran dry, per "
         "minute.", "short", False, [
            (per_minute("shotstream_deadline_misses_total"), "misses / min"),
        ]),
        ("Sessions created and refused", "Per minute; refused by reason (capacity, quota, "
         "draining, not_ready, queue_full).", "short", False, [
            (per_minute("shotstream_sessions_created_total"), "created"),
            (per_minute("shotstream_sessions_refused_total", "reason"), "refused: {{reason}}"),
        ]),
        ("Sessions ended by reason", "Per minute: deleted, stopped, idle, expired, failed, "
         "draining, shutdown, wait_timeout.", "short", True, [
            (per_minute("shotstream_sessions_ended_total", "reason"), "{{reason}}"),
        ]),
        ("Prompts", "Shot prompts received, shown (applied) and dropped, per minute.", "short",
         False, [
            (per_minute("shotstream_prompts_received_total"), "received"),
            (per_minute("shotstream_prompts_applied_total"), "applied"),
            (per_minute("shotstream_prompts_dropped_total", "reason"), "dropped: {{reason}}"),
        ]),
        ("Chunks and frames per second", "Generated by the engine and sent to viewers.",
         "short", False, [
            (f"sum(rate(shotstream_chunks_generated_total{SEL}[{RATE}]))", "chunks generated"),
            (f"sum(rate(shotstream_frames_generated_total{SEL}[{RATE}]))", "frames generated"),
            (f"sum(rate(shotstream_frames_sent_total{SEL}[{RATE}]))", "frames sent"),
        ]),
        ("Bytes sent", "Media bytes (init and segments) sent per second.", "Bps", False, [
            (f"sum(rate(shotstream_bytes_sent_total{SEL}[{RATE}]))", "sent"),
        ]),
        ("Instant cuts", "Chunks and frames per minute withdrawn by cuts at a viewer's "
         "playhead before they were played (sent or not).", "short", False, [
            (per_minute("shotstream_chunks_withdrawn_total"), "chunks withdrawn"),
            (per_minute("shotstream_frames_withdrawn_total"), "frames withdrawn"),
        ]),
    ]),
    ("Viewers, recordings and the waiting room", [
        ("Viewers", "Viewer connections of watch links, all sessions, and the most on one "
         "session. Viewers cost no generation: each segment is encoded once.", "short", False, [
            (f"sum(shotstream_viewers{SEL})", "viewers"),
            (f"max(shotstream_viewers_max_per_session{SEL})", "most on one session"),
        ]),
        ("Fan-out", "Bytes per second sent to viewers (the same segments the owners get), "
         "and chunks per minute skipped by viewers that fell behind (they jump to the "
         "latest chunk).", "short", False, [
            (f"sum(rate(shotstream_viewer_bytes_sent_total{SEL}[{RATE}]))", "bytes / s"),
            (per_minute("shotstream_viewer_chunks_skipped_total"), "skipped chunks / min"),
        ]),
        ("Waiting room", "Sessions waiting for a slot (created with wait while the "
         "replica was full), and sessions queued per minute.", "short", False, [
            (f"sum(shotstream_queue_length{SEL})", "waiting"),
            (per_minute("shotstream_sessions_queued_total"), "queued / min"),
        ]),
        ("Wait in the waiting room", "How long sessions waited before they started "
         "(those that timed out are in 'Sessions ended by reason': wait_timeout).", "s",
         False, latency("shotstream_queue_wait_seconds")),
        ("Recordings", "Recordings kept on disk, and the disk they use (segments and cached "
         "MP4s) against recording_budget_bytes.", "bytes", False, [
            (f"sum(shotstream_recording_bytes{SEL})", "disk used"),
        ]),
        ("Recordings kept and stopped", "Recordings on disk (deleted recording_retention_s "
         "after their session), and recordings stopped early per minute, by reason: "
         "disk_full, budget, write_error (their streams went on).", "short", False, [
            (f"sum(shotstream_recordings{SEL})", "kept"),
            (per_minute("shotstream_recordings_incomplete_total", "reason"),
             "stopped: {{reason}}"),
        ]),
    ]),
    ("Memory and errors", [
        ("Session state by kind", "Per-session device state in use: KV cache, decoder "
         "state, frame store (stacked); 0 when no session is open.", "bytes", True, [
            (f"sum by (kind) (shotstream_cache_bytes{SEL})", "{{kind}}"),
        ]),
        ("Pool and GPU memory", "All per-session state, and CUDA memory allocated and "
         "reserved by the process (CUDA only).", "bytes", False, [
            (f"sum(shotstream_pool_bytes{SEL})", "session pool"),
            (f"sum by (kind) (shotstream_gpu_memory_bytes{SEL})", "GPU {{kind}}"),
            (f"sum(shotstream_outbox_bytes{SEL})", "video held for streams (host)"),
        ]),
        ("Errors by kind", "Per minute: step, oom, encode, engine, slow_reader, flood, "
         "slow_viewer, viewer_limit, client_*.", "short", True, [
            (per_minute("shotstream_errors_total", "kind"), "{{kind}}"),
        ]),
        ("Connections closed", "HTTP connections closed per minute before a complete "
         "request: request_timeout (slowloris) and over_limit (max_connections).", "short",
         True, [
            (per_minute("shotstream_connections_closed_total", "reason"), "{{reason}}"),
        ]),
    ]),
]
# fmt: on


def timeseries(
    pid: int,
    x: int,
    y: int,
    title: str,
    description: str,
    unit: str,
    stacked: bool,
    queries: list[tuple[str, str]],
) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 40 if stacked else 10,
                    "showPoints": "never",
                    "spanNulls": True,
                    "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def build_panel(pid: int, y: int) -> dict:
    return {
        "id": pid,
        "type": "table",
        "title": "Build",
        "description": "Version, preset, device, torch, attention backend, dtype and weights of each replica.",
        "datasource": DS,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 4},
        "targets": [
            {
                "refId": "A",
                "datasource": DS,
                "expr": f"shotstream_build_info{SEL}",
                "instant": True,
                "format": "table",
            }
        ],
        "transformations": [
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
            }
        ],
    }


def dashboard() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, spec in enumerate(row):
            panels.append(timeseries(pid, 8 * (i % 3), y + 8 * (i // 3), *spec))
            pid += 1
        y += 8 * ((len(row) + 2) // 3)
    panels.append(build_panel(pid, y))
    return {
        "uid": "shotstream",
        "title": "ShotStream",
        "description": "Real-time multi-shot video streaming: sessions, latency, flow, memory.",
        "tags": ["shotstream"],
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "label": "replica",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(shotstream_build_info, instance)",
                    "query": {
                        "query": "label_values(shotstream_build_info, instance)",
                        "refId": "instance",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        stale = not OUT.is_file() or OUT.read_text() != text
        print(
            f"{OUT}: {'stale: run python docker/grafana/dashboard.py' if stale else 'up to date'}"
        )
        sys.exit(int(stale))
    OUT.write_text(text)
    print(f"wrote {OUT}")
