"""Time the DiT verbs per chunk: prefill, denoise (all steps) and refresh, for a preset.

    python -m bench.dit_chunk --preset tiny
    python -m bench.dit_chunk --preset wan2.1-1.3b --device cuda --dtype bfloat16 --save h100

Random weights (speed does not depend on them). Prints one JSON line with per-verb ms,
tokens/s, achieved TFLOP/s and MFU against the device's peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import emit, environment, peak_tflops, sync
from cache.kv import KVCache, KVLayout
from model.attention import resolve_backend
from model.config import get_preset
from model.dit import CausalDiT
from model.sampler import FlowSchedule
from model.steps import chunk_pass, denoise_chunk, prefill_context, refresh_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--shots", type=int, default=2, help="shots to run; the first is warm-up")
    ap.add_argument("--save", default=None, help="append the JSON line to bench/results/NAME.jsonl")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    torch.set_flush_denormal(True)
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        dit = CausalDiT(cfg)
    dit = dit.to(dtype).eval().requires_grad_(False)
    dit.attn_backend = resolve_backend(args.attention, device)
    schedule = FlowSchedule(cfg.sampler)
    kv = KVCache(KVLayout.for_config(cfg), 1, dtype, device)
    lat = (1, cfg.context_frames, *cfg.latent_shape)
    n_cap = 2
    prompt = torch.randn(1, n_cap, cfg.text.text_len, cfg.dit.text_dim, device=device, dtype=dtype)
    flags = torch.tensor([[0, 0, 0, 1, 1, 1]], device=device)[:, : cfg.context_frames]
    gen = flags[:, -1] + 1

    def timed(fn, *fn_args):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*fn_args)
        sync(device)
        return out, (time.perf_counter() - t0) * 1e3

    prefill_ms, denoise_ms, refresh_ms = (
        [],
        [[] for _ in range(cfg.chunks_per_shot)],
        [[] for _ in range(cfg.chunks_per_shot)],
    )
    with torch.inference_mode():
        for shot in range(args.shots):
            ctx = torch.randn(lat, device=device, dtype=dtype)
            _, ms = timed(prefill_context, dit, kv, ctx, flags, flags.clamp(max=n_cap - 1), prompt)
            if shot:
                prefill_ms.append(ms)
            for b in range(cfg.chunks_per_shot):
                pass_ = chunk_pass(dit, kv, b, gen, torch.ones(1, dtype=torch.long, device=device))
                noise = torch.randn(
                    1, cfg.chunk_frames, *cfg.latent_shape, device=device, dtype=dtype
                )
                draws = [torch.randn_like(noise) for _ in range(schedule.num_steps - 1)]
                x0, ms = timed(denoise_chunk, dit, schedule, pass_, noise, draws)
                _, ms_r = timed(refresh_cache, dit, pass_, x0)
                if shot:
                    denoise_ms[b].append(ms)
                    refresh_ms[b].append(ms_r)

    peak, peak_src = peak_tflops(device, dtype)
    chunks = []
    for b in range(cfg.chunks_per_shot):
        keys = cfg.context_tokens + cfg.chunk_tokens * (b + 1)
        d, r = statistics.median(denoise_ms[b]), statistics.median(refresh_ms[b])
        flops = cfg.chunk_flops(b)
        tflops = flops / ((d + r) / 1e3) / 1e12
        chunks.append({
            "chunk": b, "keys": keys, "denoise_ms": round(d, 3), "refresh_ms": round(r, 3),
            "tflops": round(tflops, 3), "mfu": round(tflops / peak, 4),
        })  # fmt: skip
    total_ms = sum(c["denoise_ms"] + c["refresh_ms"] for c in chunks)
    shot_flops = sum(cfg.chunk_flops(b) for b in range(cfg.chunks_per_shot))
    shot_flops += cfg.dit_flops(cfg.context_tokens, cfg.context_tokens)
    pre = statistics.median(prefill_ms)
    shot_s = (total_ms + pre) / 1e3
    frames = cfg.pixel_frames_per_shot
    tokens = cfg.chunk_tokens * (schedule.num_steps + 1) * cfg.chunks_per_shot
    emit(
        {
            "bench": "dit_chunk",
            "preset": cfg.name,
            "dtype": str(dtype).removeprefix("torch."),
            "attention": dit.attn_backend,
            **environment(device),
            "prefill_ms": round(pre, 3),
            "chunk_ms_mean": round(total_ms / cfg.chunks_per_shot, 3),
            "chunk_ms_worst": round(max(c["denoise_ms"] + c["refresh_ms"] for c in chunks), 3),
            "tokens_per_s": round(tokens / (total_ms / 1e3)),
            "dit_fps": round(frames / shot_s, 2),
            "realtime_budget_ms": round(
                1e3 * cfg.chunk_frames * cfg.vae.temporal_stride / cfg.fps, 1
            ),
            "shot_tflops": round(shot_flops / 1e12, 3),
            "achieved_tflops": round(shot_flops / shot_s / 1e12, 3),
            "peak_tflops": round(peak, 3),
            "peak_source": peak_src,
            "mfu": round(shot_flops / shot_s / 1e12 / peak, 4),
            "chunks": chunks,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
