"""Render the Grafana dashboard's main panels from a real scrape: docs/dashboard.png.

Grafana cannot run here, so this plays its part: it starts a tiny-preset server and a real
Prometheus scraping it every second (with docker/prometheus/alerts.yml loaded), drives a
short scenario (two concurrent streams, shot prompts mid-stream, a session refused for
capacity, one deleted, one left to go idle, a bad client message), then runs each panel's
own PromQL from docker/grafana/dashboards/shotstream.json over the run (`query_range`,
`$__rate_interval` = --rate) and draws the panels with matplotlib.

    python -m bench.dashboard_snapshot [--out docs/dashboard.png] [--rate 10s]

Prints one JSON line: the run's length, what the client received, and per panel how many
series came back. Needs the Debian `prometheus` package and matplotlib (dev extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.prometheus import prometheus, wait_scraped_after
from tests.support.server import REPO, ServerProcess, StreamClient

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "shotstream.json"
MAIN_PANELS = [
    "Sessions",
    "Real-time factor",
    "Time to first frame",
    "Inter-chunk gap",
    "Prompt to visible",
    "Per-verb duration p95 (stacked)",
    "Deadline misses",
    "Sessions created and refused",
    "Sessions ended by reason",
    "Chunks and frames per second",
    "Session state by kind",
    "Errors by kind",
]


async def scenario(srv: ServerProcess) -> dict:
    """Two streams with prompts, a refusal, a delete, an idle end, a bad message."""
    a = srv.create(shots=["wide shot, a red circle on blue"], seed=1)
    got = {"chunks": 0, "frames": 0}

    async def watch(c: StreamClient, n: int) -> None:
        await c.chunks(n, timeout=300)
        got["chunks"] += n

    async with StreamClient(a["stream_url"], a["token"]) as ca:
        await watch(ca, 4)
        b = srv.create(shots=["close-up shot, a green square"], seed=2)
        async with StreamClient(b["stream_url"], b["token"]) as cb:
            await asyncio.gather(watch(ca, 2), watch(cb, 3))
            # a third session while two stream: refused for capacity (max_sessions=2)
            r = httpx.post(srv.base + "/v1/sessions", json={"prompt": "a third viewer"}, timeout=30)
            assert r.status_code == 503, r.text
            await ca.send({"type": "prompt", "prompt": "aerial shot, the circle shrinks"})
            await cb.send({"type": "prompt", "prompt": "the square spins", "mode": "queue"})
            await cb.send("not json")  # a bad message: an error event, the stream goes on
            await asyncio.gather(watch(ca, 4), watch(cb, 4))
            await ca.send({"type": "stop"})
            await ca.closed()
            await watch(cb, 3)
        # b's viewer left without a word: the session ends as idle after the grace period
    got["frames"] = sum(c.message["frames"] for c in ca.stream.chunks + cb.stream.chunks)
    d = srv.create(prompt="a session deleted before anyone watched")
    await asyncio.sleep(2)
    httpx.delete(
        f"{srv.base}/v1/sessions/{d['session_id']}",
        headers={"Authorization": f"Bearer {d['token']}"},
        timeout=30,
    )
    srv.wait_metric("shotstream_sessions_ended_total", 1, timeout=60, labels={"reason": "idle"})
    srv.wait_metric("shotstream_pool_bytes", 0, timeout=60)
    return got


def query_range(prom: str, expr: str, start: float, end: float, rate: str) -> list[dict]:
    q = expr.replace("$__rate_interval", rate).replace("$instance", ".*")
    r = httpx.get(
        prom + "/api/v1/query_range",
        params={"query": q, "start": start, "end": end, "step": 1},
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    for key, val in labels.items():
        fmt = fmt.replace("{{" + key + "}}", val)
    return fmt


def draw(panels: list[dict], series: dict[str, list], start: float, out: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    plt.rcParams.update(
        {
            "figure.facecolor": "#111217",
            "axes.facecolor": "#181b1f",
            "axes.edgecolor": "#2c3235",
            "axes.labelcolor": "#ccccdc",
            "text.color": "#ccccdc",
            "xtick.color": "#8e8e99",
            "ytick.color": "#8e8e99",
            "grid.color": "#2c3235",
            "font.size": 8,
            "axes.prop_cycle": plt.cycler(
                color=[
                    "#73bf69",
                    "#f2cc0c",
                    "#5794f2",
                    "#ff9830",
                    "#f2495c",
                    "#b877d9",
                    "#8ab8ff",
                    "#fade2a",
                ]
            ),
        }
    )
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 2.9))
    for ax, panel in zip(axes.flat, panels, strict=False):
        unit = panel["fieldConfig"]["defaults"]["unit"]
        stacked = panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        lines = series[panel["title"]]
        if len(lines) > 1:  # like a legend that hides series with only zeros
            lines = [x for x in lines if any(v != 0 and not math.isnan(v) for v in x[2])] or [
                ("all zero", lines[0][1], [0.0] * len(lines[0][1]))
            ]
        base = None
        top_value = 0.0
        for name, ts, vs in lines:
            xs = [t - start for t in ts]
            if stacked:
                prev = base if base is not None and len(base) == len(vs) else [0.0] * len(vs)
                top = [p + (0.0 if math.isnan(v) else v) for p, v in zip(prev, vs, strict=True)]
                ax.fill_between(xs, prev, top, alpha=0.45, label=name, linewidth=0.8)
                base = top
                top_value = max([top_value, *top])
            else:
                ax.plot(xs, vs, label=name, linewidth=1.2)
                top_value = max([top_value, *(v for v in vs if not math.isnan(v))])
        ax.set_title(panel["title"], loc="left", fontsize=9, fontweight="bold")
        ax.grid(True, linewidth=0.5)
        ax.set_ylim(0, top_value * 1.45 if top_value > 0 else 1.0)  # room for the legend
        if unit in ("s", "bytes", "Bps"):
            ax.yaxis.set_major_formatter(
                EngFormatter(unit={"s": "s", "bytes": "B", "Bps": "B/s"}[unit])
            )
        if lines:
            ax.legend(loc="upper left", fontsize=6.5, frameon=False, ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("seconds", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("ShotStream dashboard — " + note, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    ap.add_argument("--rate", default="10s", help="what $__rate_interval stands for")
    ap.add_argument("--all", action="store_true", help="every panel, not only the main ones")
    args = ap.parse_args()

    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] == "timeseries"]
    if not args.all:
        panels = [p for title in MAIN_PANELS for p in panels if p["title"] == title]
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(
            Path(tmp), chunks_per_shot=3, max_sessions=2, realtime_margin=50, session_grace_s=3
        ).wait_ready()
        try:
            with prometheus(Path(tmp), f"127.0.0.1:{srv.port}") as prom:
                time.sleep(3)  # a few scrapes of the idle server first
                start = time.time()
                got = asyncio.run(scenario(srv))
                time.sleep(5)
                end = time.time()
                wait_scraped_after(prom, end)
                series = {}
                for p in panels:
                    lines = []
                    for t in p["targets"]:
                        for res in query_range(prom, t["expr"], start - 3, end, args.rate):
                            ts = [float(x) for x, _ in res["values"]]
                            vs = [float(v) for _, v in res["values"]]
                            lines.append((legend(t["legendFormat"], res["metric"]), ts, vs))
                    series[p["title"]] = lines
        finally:
            srv.stop()
    note = f"tiny preset on CPU, {end - start:.0f} s run, Prometheus scrape 1 s, $__rate_interval = {args.rate}"
    draw(panels, series, start, args.out, note)
    print(
        json.dumps(
            {
                "bench": "dashboard_snapshot",
                "out": str(args.out),
                "seconds": round(end - start, 1),
                **got,
                "series": {k: len(v) for k, v in series.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
