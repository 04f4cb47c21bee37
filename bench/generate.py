"""Time the whole generator per verb over shots x chunks: text, context, prefill (per shot)
and denoise, decode, refresh (per chunk), with FPS against the real-time budget.

    python -m bench.generate --preset tiny
    python -m bench.generate --preset wan2.1-1.3b --device cuda --save h100
    python -m bench.generate --preset wan2.1-1.3b --weights weights/ --save h100-real

Random weights unless --weights (speed does not depend on them). Every shot has its own
prompt, so the text encoder really runs at each shot start. The first --warmup shots are
not counted. Prints one JSON line; the per-session bytes are the pool's breakdown at its
peak (KV cache, streaming-decoder state, frames kept for context).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench.common import emit, environment, sync
from bench.random_weights import random_preset
from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import get_preset
from model.fp8 import quantize_dit_linears
from model.generator import ShotStreamGenerator, load_model, resolve_device

SHOT_VERBS = ("text", "context", "prefill")
CHUNK_VERBS = ("denoise", "decode", "refresh")
GLOBAL_CAPTION = (
    "A lighthouse keeper lives alone on a windy island in the North Sea. Grey waves, "
    "low clouds, a red and white tower. The video plays at normal speed."
)
SHOTS = (
    "wide shot of the island at dawn, the lamp still turning",
    "close-up of the keeper's weathered hands winding the clockwork",
    "medium shot of the keeper climbing the spiral staircase",
    "over-the-shoulder shot of the keeper looking out at a passing ship",
    "aerial shot circling the tower as the storm arrives",
    "close-up of the lamp's lens catching the last light of day",
)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def _profile_chunk(
    gen: ShotStreamGenerator, device: torch.device, out_dir: str, top: int = 15
) -> dict:
    """Trace one steady chunk (a shot's second one or later) with torch.profiler; write the
    trace and return the ops with the most self time (device time on CUDA, else host)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    gen.start_shot("profiled shot")
    if gen.cfg.chunks_per_shot > 1:
        gen.next_chunk()  # the shot's first chunk is shorter: trace a steady one
    with profile(activities=activities, record_shapes=False) as prof:
        gen.next_chunk()
        sync(device)
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path / "chunk_trace.json"))
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    return {
        "trace": str(path / "chunk_trace.json"),
        "clock": "device" if device.type == "cuda" else "host",
        "total_self_ms": round(total / 1e3, 3),
        "top_ops": [
            {
                "op": e.key,
                "self_ms": round(getattr(e, attr) / 1e3, 3),
                "share": round(getattr(e, attr) / total, 4),
                "calls": e.count,
            }
            for e in events[:top]
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--weights", default=None, help="weights folder (default: random weights)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--shots", type=int, default=3, help="shots measured (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="shots run first and not counted")
    ap.add_argument("--chunks", type=int, default=None, help="chunks per shot (default: preset's)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: a shared 2-core host; 0 = torch default)",
    )
    ap.add_argument("--save", default=None, help="append the JSON line to bench/results/NAME.jsonl")
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also trace one more steady chunk with torch.profiler: DIR/chunk_trace.json "
        "(chrome://tracing, Perfetto) and the top ops in the JSON line",
    )
    ap.add_argument(
        "--chunk-graphs",
        action="store_true",
        help="replay each chunk's DiT passes as a CUDA graph (model/graphs.py)",
    )
    ap.add_argument(
        "--fp8", action="store_true", help="the DiT blocks' linear layers in FP8 (model/fp8.py)"
    )
    ap.add_argument(
        "--group-rows",
        action="store_true",
        help="batched sessions: one attention call per group in step",
    )
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if args.shots < 1 or args.warmup < 0:
        ap.error("--shots must be at least 1 and --warmup at least 0")
    emit(run(args), args.save)


def run(args: argparse.Namespace, on_chunk=None) -> dict:
    """The measurement: returns the JSON row. `on_chunk(chunk, generator)` sees every chunk
    as it is made, with its tensors in `generator.trace` (bench/device checks the first)."""
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    if args.chunks:
        cfg = cfg.replace(chunks_per_shot=args.chunks)
    if not args.weights:  # speed does not depend on the weights, nor on the tokenizer
        cfg = random_preset(cfg.name).replace(chunks_per_shot=cfg.chunks_per_shot)
    device = resolve_device(args.device)

    t0 = time.perf_counter()
    # Random weights are initialised on the device: the host would take minutes for umT5-xxl.
    with torch.device(device) if not args.weights else contextlib.nullcontext():
        model = load_model(cfg, args.weights, str(device), args.dtype, args.attention)
    model.use_chunk_graphs(args.chunk_graphs)
    model.dit.group_rows = args.group_rows
    if args.fp8:
        quantize_dit_linears(model.dit)
    load_s = time.perf_counter() - t0
    pool = StatePool(KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, device)
    lease = pool.acquire("bench")
    # with a callback, the generator keeps each chunk's x0 and pixels for it (views, no copy)
    gen = ShotStreamGenerator(
        model, lease, GLOBAL_CAPTION, seed=0, trace={} if on_chunk is not None else None
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    shot_ms: dict[str, list[float]] = {v: [] for v in SHOT_VERBS}
    chunk_ms: dict[str, list[float]] = {v: [] for v in CHUNK_VERBS}
    # a shot's first chunk decodes 9 frames, later ones 12
    decode_first: list[float] = []
    decode_later: list[float] = []
    start_wall, chunk_wall, steady_wall = [], [], []
    first_frame_ms = []  # shot start + its first chunk: what a cut costs before new frames
    frames = 0
    peak_bytes, peak_breakdown = 0, {}
    total_shots = args.warmup + args.shots
    t_measured = 0.0
    with torch.inference_mode():
        for s in range(total_shots):
            counted = s >= args.warmup
            if s == args.warmup:
                sync(device)
                t_measured = time.perf_counter()
            text = f"{SHOTS[s % len(SHOTS)]} (take {s})"  # distinct: no caption cache hits
            t = time.perf_counter()
            start = gen.start_shot(text)  # synchronises before returning
            start_ms = (time.perf_counter() - t) * 1e3
            for b in range(cfg.chunks_per_shot):
                t = time.perf_counter()
                chunk = gen.next_chunk()  # ends in the chunk's host copy: a sync
                wall = (time.perf_counter() - t) * 1e3
                if on_chunk is not None:
                    on_chunk(chunk, gen)
                if lease.nbytes > peak_bytes:
                    peak_bytes, peak_breakdown = lease.nbytes, pool.breakdown()
                if not counted:
                    continue
                frames += chunk.frames.shape[0]
                chunk_wall.append(wall)
                if b:
                    steady_wall.append(wall)
                else:
                    first_frame_ms.append(start_ms + wall)
                for v in CHUNK_VERBS:
                    chunk_ms[v].append(chunk.timings.get(f"{v}_ms", 0.0))
                (decode_later if b else decode_first).append(chunk.timings["decode_ms"])
            if counted:
                start_wall.append(start_ms)
                for v in SHOT_VERBS:
                    shot_ms[v].append(start.timings.get(f"{v}_ms", 0.0))
        sync(device)
        measured_s = time.perf_counter() - t_measured
        profile = _profile_chunk(gen, device, args.profile) if args.profile else None
    pool.release(lease)

    steady_frames = cfg.chunk_frames * cfg.vae.temporal_stride
    budget_ms = 1e3 * steady_frames / cfg.fps
    fps = frames / measured_s if measured_s else 0.0
    steady_ms = _mean(steady_wall)
    row = {
        "bench": "generate",
        "preset": cfg.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": model.attention_backend,
        "weights": "random" if not model.real_weights else "real",
        "chunk_graphs": args.chunk_graphs,
        "group_rows": args.group_rows,
        "fp8": args.fp8,
        **environment(device),
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "shots": args.shots,
        "warmup_shots": args.warmup,
        "chunks_per_shot": cfg.chunks_per_shot,
        "frames": frames,
        "seconds": round(measured_s, 3),
        "fps": round(fps, 2),
        "target_fps": cfg.fps,
        "realtime_factor": round(fps / cfg.fps, 3),  # >= 1 keeps up, shot starts included
        "realtime_budget_ms": round(budget_ms, 1),  # a steady chunk's playing time
        "steady_chunk_ms": steady_ms,
        "budget_ratio": round(steady_ms / budget_ms, 3) if steady_ms else None,  # < 1 keeps up
        "chunk_ms_mean": _mean(chunk_wall),
        "shot_start_ms": _mean(start_wall),
        "first_frame_ms": _mean(first_frame_ms),  # shot start + its first chunk
        "verb_ms": {
            **{v: _mean(shot_ms[v]) for v in SHOT_VERBS},  # per shot start
            **{v: _mean(chunk_ms[v]) for v in CHUNK_VERBS},  # per chunk
        },
        "decode_ms_first_chunk": _mean(decode_first),
        "decode_ms_later_chunk": _mean(decode_later),
        "session_bytes": peak_bytes,
        "session_bytes_by_kind": peak_breakdown,
        "kv_bytes_model": cfg.kv_bytes_per_session(model.dtype),
    }
    if device.type == "cuda":
        row["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if profile is not None:
        row["profile"] = profile
    return row


if __name__ == "__main__":
    main()
