"""Time the DiT verbs per chunk: prefill, denoise (all steps) and refresh, for a preset.

    python -m bench.dit_chunk --preset tiny
    python -m bench.dit_chunk --preset wan2.1-1.3b --device cuda --dtype bfloat16 --save h100

Random weights (speed does not depend on them). Prints one JSON line with per-verb ms,
tokens/s, achieved TFLOP/s and MFU against the device's peak (a measured matmul). Options
compared by bench/device: `--mode graphs` (each chunk one CUDA graph replay), `--mode
compiled` (torch.compile), `--batch N` sessions in step, `--group-rows` (one attention call
for them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import emit, environment, peak_tflops, sync
from cache.kv import KVCache, KVLayout
from model.attention import resolve_backend
from model.config import ModelConfig, get_preset
from model.dit import CausalDiT
from model.fp8 import quantize_dit_linears
from model.graphs import ChunkGraphs
from model.sampler import FlowSchedule
from model.steps import ChunkRow, batched_chunk_pass, denoise_chunk, prefill_context, refresh_cache

MODES = ("eager", "graphs", "compiled")


def measure(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    attention: str = "auto",
    shots: int = 2,
    batch: int = 1,
    mode: str = "eager",
    group_rows: bool = False,
    peak: tuple[float, str] | None = None,
    fp8: bool = False,
) -> dict:
    """Time prefill and every chunk of `shots` shots (the first is warm-up) for `batch`
    sessions in step; returns the JSON row. `mode`: eager passes, chunks replayed as CUDA
    graphs (model/graphs.py), or the DiT under torch.compile (default mode); `fp8`: the
    blocks' linear layers in FP8 (model/fp8.py)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalDiT(cfg)
    dit = dit.to(dtype).eval().requires_grad_(False)
    dit.attn_backend = resolve_backend(attention, device)
    dit.group_rows = group_rows
    if fp8:
        quantize_dit_linears(dit)
    schedule = FlowSchedule(cfg.sampler)
    graphs = ChunkGraphs(dit, schedule, device) if mode == "graphs" else None
    net = torch.compile(dit) if mode == "compiled" else dit
    caches = [KVCache(KVLayout.for_config(cfg), 1, dtype, device) for _ in range(batch)]
    lat = (1, cfg.context_frames, *cfg.latent_shape)
    n_cap = 2
    prompt = torch.randn(1, n_cap, cfg.text.text_len, cfg.dit.text_dim, device=device, dtype=dtype)
    flags = (torch.arange(cfg.context_frames, device=device) * 2 // cfg.context_frames)[None]
    gen = flags[:, -1] + 1
    caption = torch.ones(1, dtype=torch.long, device=device)

    def timed(fn, *fn_args):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*fn_args)
        sync(device)
        return out, (time.perf_counter() - t0) * 1e3

    chunks_n = cfg.chunks_per_shot
    prefill_ms: list[float] = []
    denoise_ms: list[list[float]] = [[] for _ in range(chunks_n)]
    refresh_ms: list[list[float]] = [[] for _ in range(chunks_n)]
    t_first = time.perf_counter()
    first_shot_s = 0.0
    with torch.inference_mode():
        for shot in range(shots):
            ms = 0.0
            for kv in caches:
                ctx = torch.randn(lat, device=device, dtype=dtype)
                ms += timed(
                    prefill_context, dit, kv, ctx, flags, flags.clamp(max=n_cap - 1), prompt
                )[1]
            if shot:
                prefill_ms.append(ms)
            for b in range(chunks_n):
                rows = [ChunkRow(kv, b, gen, caption) for kv in caches]
                noise = torch.randn(
                    batch, cfg.chunk_frames, *cfg.latent_shape, device=device, dtype=dtype
                )
                draws = [torch.randn_like(noise) for _ in range(schedule.num_steps - 1)]
                if graphs is not None:
                    _, ms = timed(graphs.run, rows, noise, draws)
                    ms_r = 0.0
                else:
                    pass_ = batched_chunk_pass(dit, rows)
                    x0, ms = timed(denoise_chunk, net, schedule, pass_, noise, draws)
                    _, ms_r = timed(refresh_cache, net, pass_, x0)
                if shot:
                    denoise_ms[b].append(ms)
                    refresh_ms[b].append(ms_r)
            if shot == 0:
                first_shot_s = time.perf_counter() - t_first

    peak_value, peak_src = peak or peak_tflops(device, dtype)
    chunks = []
    for b in range(chunks_n):
        keys = cfg.context_tokens + cfg.chunk_tokens * (b + 1)
        d, r = statistics.median(denoise_ms[b]), statistics.median(refresh_ms[b])
        flops = batch * cfg.chunk_flops(b)
        tflops = flops / ((d + r) / 1e3) / 1e12
        chunks.append(
            {
                "chunk": b,
                "keys": keys,
                "denoise_ms": round(d, 3),
                "refresh_ms": round(r, 3),
                "tflops": round(tflops, 3),
                "mfu": round(tflops / peak_value, 4),
            }
        )
    total_ms = sum(c["denoise_ms"] + c["refresh_ms"] for c in chunks)
    shot_flops = sum(cfg.chunk_flops(b) for b in range(chunks_n))
    shot_flops = batch * (shot_flops + cfg.dit_flops(cfg.context_tokens, cfg.context_tokens))
    pre = statistics.median(prefill_ms)
    shot_s = (total_ms + pre) / 1e3
    frames = batch * cfg.pixel_frames_per_shot
    tokens = batch * cfg.chunk_tokens * (schedule.num_steps + 1) * chunks_n
    return {
        "bench": "dit_chunk",
        "preset": cfg.name,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": dit.attn_backend,
        "mode": mode,
        "batch": batch,
        "group_rows": group_rows,
        "fp8": fp8,
        **environment(device),
        # the warm-up shot: compilation, graph captures, kernel choice
        "first_shot_s": round(first_shot_s, 2),
        "graphs_captured": graphs.captures if graphs is not None else None,
        "prefill_ms": round(pre, 3),
        "chunk_ms_mean": round(total_ms / chunks_n, 3),
        "chunk_ms_worst": round(max(c["denoise_ms"] + c["refresh_ms"] for c in chunks), 3),
        "tokens_per_s": round(tokens / (total_ms / 1e3)),
        "dit_fps": round(frames / shot_s, 2),
        "realtime_budget_ms": round(1e3 * cfg.chunk_frames * cfg.vae.temporal_stride / cfg.fps, 1),
        "shot_tflops": round(shot_flops / 1e12, 3),
        "achieved_tflops": round(shot_flops / shot_s / 1e12, 3),
        "peak_tflops": round(peak_value, 3),
        "peak_source": peak_src,
        "mfu": round(shot_flops / shot_s / 1e12 / peak_value, 4),
        "chunks": chunks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--shots", type=int, default=2, help="shots to run; the first is warm-up")
    ap.add_argument("--batch", type=int, default=1, help="sessions in step, one batched pass")
    ap.add_argument("--mode", choices=MODES, default="eager")
    ap.add_argument(
        "--group-rows", action="store_true", help="one attention call per group of sessions in step"
    )
    ap.add_argument("--fp8", action="store_true", help="the blocks' linear layers in FP8")
    ap.add_argument("--save", default=None, help="append the JSON line to bench/results/NAME.jsonl")
    args = ap.parse_args()
    if args.shots < 2:
        ap.error("--shots must be at least 2 (the first is warm-up)")

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    torch.set_flush_denormal(True)
    row = measure(
        get_preset(args.preset),
        device,
        dtype,
        args.attention,
        args.shots,
        args.batch,
        args.mode,
        args.group_rows,
        fp8=args.fp8,
    )
    emit(row, args.save)


if __name__ == "__main__":
    main()
