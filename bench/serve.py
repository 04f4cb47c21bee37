"""The whole server under load: a real `shotstream serve` process, N streaming sessions from
the load generator (clients/load.py), and what the server's own metrics say about it.

    python -m bench.serve --preset tiny --sessions 1,2,4 --duration 20
    python -m bench.serve --preset tiny --sessions 4 --admit-all --compare max_batch=1 --compare max_batch=4
    python -m bench.serve --preset demo --sessions 1 --prompt-every 3 --duration 60 \
        --compare instant_cuts=0 --compare instant_cuts=1   # prompt-to-visible at the player
    python -m bench.serve --server http://127.0.0.1:8000 --sessions 2   # a server you started
    python -m bench.serve --preset wan2.1-1.3b --device cuda --sessions 1,2,3,4 --save h100

One JSON line per case (a setting variant x a session count): the clients' view (TTFF,
inter-chunk gaps, deadline misses against a real-time player, prompt-to-visible, refusals),
the server's (chunks generated, its deadline misses, real-time factor, admission capacity,
the measured chunk cost) and the server's own overhead per chunk (H.264 encode + fMP4 mux +
socket sends) as a fraction of the model's time and of the chunk's real-time budget
(target: under 5 % of the budget), then one summary line with each case's throughput as a
ratio of the first case's. On a CPU only those ratios mean anything; absolute figures are
for a GPU, recorded with the device name (`--save NAME` appends to bench/results/NAME.jsonl).

Each case gets a fresh server, so one case's cache or admission history does not leak into
the next. Random weights unless --weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import emit, git_commit
from clients.load import LoadConfig, run_load

REPO = Path(__file__).resolve().parents[1]
SERVER_COUNTERS = (
    "shotstream_chunks_generated_total",
    "shotstream_frames_sent_total",
    "shotstream_deadline_misses_total",
    "shotstream_sessions_refused_total",
    "shotstream_prompts_applied_total",
    "shotstream_prompts_dropped_total",
)
SERVER_GAUGES = (
    "shotstream_realtime_factor",
    "shotstream_capacity_sessions",
    "shotstream_chunk_cost_seconds",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(
    settings: dict[str, str],
    log_dir: Path,
    ready_timeout: float = 600.0,
    module: str = "server.cli",
) -> Iterator[str]:
    """A `shotstream serve` process on a free loopback port with `settings`; yields its URL
    once /readyz answers, and stops it with SIGTERM (drain) afterwards. `module` runs the
    CLI (bench.random_weights: any preset with random weights)."""
    port = _free_port()
    args = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    log = open(log_dir / f"server-{port}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server exited {proc.returncode}; end of {log.name}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {ready_timeout:.0f} s; log: {log.name}")
            time.sleep(0.25)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def scrape(base: str) -> dict[str, float]:
    """The server's counters (summed over labels) and gauges by family name, and the
    seconds spent per verb (`verb:NAME`, model verbs and packaging) and in socket sends."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in SERVER_COUNTERS or s.name in SERVER_GAUGES:
                out[s.name] = out.get(s.name, 0.0) + s.value
            elif s.name == "shotstream_verb_duration_seconds_sum":
                out["verb:" + s.labels["verb"]] = s.value
            elif s.name == "shotstream_ws_send_seconds_sum":
                out["ws_send"] = s.value
    return out


def overhead(
    before: dict[str, float], after: dict[str, float], chunks: float, chunk_s: float
) -> dict[str, float | None]:
    """The server's own work per chunk (packaging: H.264 encode + fMP4 mux, and the socket
    sends) against the model's (every model verb), and against a chunk's real-time budget."""

    def spent(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    model_s = sum(spent(k) for k in after if k.startswith("verb:") and k != "verb:package")
    server_s = spent("verb:package") + spent("ws_send")
    if not chunks:
        return {
            "model_ms_per_chunk": None,
            "server_ms_per_chunk": None,
            "server_vs_model": None,
            "server_vs_budget": None,
        }
    per_chunk = server_s / chunks
    return {
        "model_ms_per_chunk": round(1e3 * model_s / chunks, 3),
        "server_ms_per_chunk": round(1e3 * per_chunk, 3),
        "server_vs_model": round(server_s / model_s, 4) if model_s else None,
        "server_vs_budget": round(per_chunk / chunk_s, 4),  # target: under 0.05
    }


def model_info(base: str) -> dict:
    r = httpx.get(base + "/v1/models", timeout=10).json()
    keys = (
        "preset",
        "device",
        "dtype",
        "attention",
        "real_weights",
        "width",
        "height",
        "fps",
        "chunk_frames",
    )
    return {k: r.get(k) for k in keys}


CLIENT_OPTIONS = ("instant_cuts",)  # --compare keys that choose the clients', not the server's


async def one_case(
    base: str, sessions: int, info: dict, args: argparse.Namespace, instant_cuts: bool = False
) -> dict:
    before = scrape(base)
    load = await run_load(
        LoadConfig(
            server=base,
            sessions=sessions,
            duration_s=args.duration,
            prompt_every_s=args.prompt_every,
            seed=args.seed,
            ramp_s=args.ramp,
            retry_refused=False,
            api_key=args.api_key,
            instant_cuts=instant_cuts,
        )
    )
    after = scrape(base)
    delta = {
        k.removeprefix("shotstream_").removesuffix("_total"): after.get(k, 0) - before.get(k, 0)
        for k in SERVER_COUNTERS
    }
    gauges = {k.removeprefix("shotstream_"): after.get(k) for k in SERVER_GAUGES}
    wall = load["wall_s"]
    chunk_s = info["chunk_frames"] / info["fps"]
    return {
        "sessions": sessions,
        "client": load,
        "server": {**delta, **gauges},
        "overhead": overhead(before, after, delta["chunks_generated"], chunk_s),
        # video seconds delivered per wall second, all sessions together
        "throughput_video_s_per_s": round(load["video_s"] / wall, 4) if wall else None,
        "chunks_per_s": round(delta["chunks_generated"] / wall, 4) if wall else None,
    }


def parse_variant(text: str) -> dict[str, str]:
    """`max_batch=1,lead_chunks=3` -> {"max_batch": "1", "lead_chunks": "3"}."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected setting=value, got {part!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--server", help="benchmark this running server instead of starting one")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--weights", help="real weights folder (speed does not depend on them)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="any preset with random weights and a file-less tokenizer "
        "(bench/random_weights.py), e.g. wan2.1-1.3b on a GPU without weights",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the server's default)")
    p.add_argument("--sessions", default="1,2", help="comma-separated session counts")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per case")
    p.add_argument("--prompt-every", type=float, default=6.0, help="mean s between prompts")
    p.add_argument("--ramp", type=float, default=0.0, help="spread session starts over s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument(
        "--admit-all",
        action="store_true",
        help="admit every session past the real-time capacity (throughput scaling; expect deadline misses)",
    )
    p.add_argument(
        "--compare",
        action="append",
        type=parse_variant,
        default=[],
        help="a settings variant, e.g. max_batch=1 (repeat; each is its own case)",
    )
    p.add_argument("--save", help="also append the lines to bench/results/NAME.jsonl")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.sessions.split(",") if n.strip()]
    variants = args.compare or [{}]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for variant in variants:
            client = {k: variant[k] for k in CLIENT_OPTIONS if k in variant}
            server_variant = {k: v for k, v in variant.items() if k not in CLIENT_OPTIONS}
            instant = client.get("instant_cuts", "0") not in ("0", "false", "off", "")
            for n in counts:
                if args.server:
                    base_ctx: contextlib.AbstractContextManager[str] = contextlib.nullcontext(
                        args.server
                    )
                else:
                    settings = {
                        "preset": args.preset,
                        "device": args.device,
                        "log_level": "warning",
                        "max_sessions_per_client": str(max(n, 1)),
                        **({"weights": args.weights} if args.weights else {}),
                        **({"threads": str(args.threads)} if args.threads else {}),
                        **(
                            {"realtime_margin": "1000", "max_sessions": str(n)}
                            if args.admit_all
                            else {}
                        ),
                        **server_variant,
                    }
                    module = "bench.random_weights" if args.random_weights else "server.cli"
                    base_ctx = launched(settings, Path(tmp), module=module)
                with base_ctx as base:
                    info = model_info(base)
                    row = asyncio.run(one_case(base, n, info, args, instant))
                row = {
                    "bench": "serve",
                    "variant": variant,
                    "commit": git_commit(),
                    "model": info,
                    **row,
                }
                emit(row, args.save)
                rows.append(row)
    first = rows[0]["throughput_video_s_per_s"] or None
    emit(
        {
            "bench": "serve-summary",
            "cases": [
                {
                    "variant": r["variant"],
                    "sessions": r["sessions"],
                    "throughput_ratio": round(r["throughput_video_s_per_s"] / first, 3)
                    if first
                    else None,
                    "client_deadline_misses": r["client"]["deadline_misses"],
                    "prompt_to_visible_p50_s": r["client"]["prompt_to_visible_s"]["p50"],
                    "server_vs_budget": r["overhead"]["server_vs_budget"],
                    "refused": r["client"]["sessions_refused"],
                }
                for r in rows
            ],
        },
        args.save,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
