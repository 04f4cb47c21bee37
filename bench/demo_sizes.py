"""What a size of the demo model would cost on this host, before training it: the production
generator's time per chunk (real-time factor) and, optionally, the seconds of one step of the
centred DiT phase (its attention mask as blocks, as training runs it, and dense), for
variants of the demo preset.

    python -m bench.demo_sizes --variant patch=2 --variant patch=1 --train-steps 4
    python -m bench.demo_sizes --train-steps 20 --train-chunks 4

A variant changes the preset's sizes: `patch` (the DiT's spatial patch: `1`, or `1x2` for
one latent pixel high and two wide), `dim`, `layers` (the DiT), `base` (the VAE's base
width), `height`, `width` (the frame). Every network is random (speed does not depend on the
weights) with the shipped word-level tokenizer, and the prompts are the vocabulary's, so
shots run as a served stream's would. One JSON line per variant; the first shot is a
warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, environment
from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import ModelConfig, get_preset
from model.dit import build_dit
from model.generator import ShotStreamGenerator

KEYS = ("patch", "dim", "layers", "base", "height", "width")
GLOBAL = "a red square on a blue background"
SHOTS = ("wide shot, the square moves right", "close-up shot, the square moves up")


def variant(spec: str) -> tuple[dict[str, int | str], ModelConfig]:
    """`patch=1,dim=96` (or `patch=1x2`: 1 latent pixel high, 2 wide) -> the demo preset with
    those sizes."""
    changes: dict[str, int | str] = {}
    cfg = get_preset("demo")
    dit, vae = cfg.dit, cfg.vae
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        sizes = value.split("x") if key == "patch" else [value]
        if key not in KEYS or len(sizes) > 2 or not all(v.isdigit() for v in sizes):
            raise ValueError(f"bad variant item {item!r}: one of {', '.join(KEYS)} = an integer")
        changes[key] = int(value) if len(sizes) == 1 else value
        if key == "patch":  # one size: square
            ph, pw = int(sizes[0]), int(sizes[-1])
            dit = dataclasses.replace(dit, patch_size=(1, ph, pw))
    if "dim" in changes:
        dit = dataclasses.replace(dit, dim=changes["dim"], ffn_dim=4 * changes["dim"])
    if "layers" in changes:
        dit = dataclasses.replace(dit, num_layers=changes["layers"])
    if "base" in changes:
        vae = dataclasses.replace(vae, base_dim=changes["base"])
    sizes = {k: changes[k] for k in ("height", "width") if k in changes}
    return changes, cfg.replace(dit=dit, vae=vae, **sizes)


def time_generator(cfg: ModelConfig, shots: int) -> dict:
    from training.evaluate import random_demo_model

    model = random_demo_model(cfg)
    pool = StatePool(
        KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    lease = pool.acquire("sizes")
    gen = ShotStreamGenerator(model, lease, GLOBAL, seed=0)
    seconds, frames, denoise, decode = 0.0, 0, [], []
    with torch.inference_mode():
        for s in range(shots + 1):
            gen.start_shot(SHOTS[s % len(SHOTS)])
            for _ in range(cfg.chunks_per_shot):
                t = time.perf_counter()
                chunk = gen.next_chunk()
                if s:  # shot 0 warms up
                    seconds += time.perf_counter() - t
                    frames += chunk.frames.shape[0]
                    denoise.append(chunk.timings["denoise_ms"])
                    decode.append(chunk.timings["decode_ms"])
    pool.release(lease)
    return {
        "frames": frames,
        "ms_per_chunk": round(1e3 * seconds / len(denoise), 1),
        "denoise_ms": round(sum(denoise) / len(denoise), 1),
        "decode_ms": round(sum(decode) / len(decode), 1),
        "realtime_factor": round(frames / cfg.fps / seconds, 2),
    }


def time_training(cfg: ModelConfig, steps: int, chunks: int = 2) -> dict:
    """Seconds per step of the centred DiT phase (batch 8, its data prefetched on a thread)
    over `chunks` chunks of a shot (the centred phase trains 2, the quick recipe's last phase
    all 4), with the attention mask as blocks (what training runs) and dense, the two
    alternating step by step so that a change in the host's load falls on both."""
    from training.evaluate import random_demo_model
    from training.run import _centred, _tokenizer_and_scenes
    from training.start_train import StartTrainer
    from training.teacher_forcing import shot_mask

    model = random_demo_model(cfg)
    dit, text = model.dit.requires_grad_(True), model.text.model.requires_grad_(True)
    phase = dataclasses.replace(_centred(2 * steps + 1), train_chunks=chunks)
    with tempfile.TemporaryDirectory() as work:
        tok, scenes = _tokenizer_and_scenes(cfg, Path(work))
        tr = StartTrainer(cfg, dit, text, model.vae, tok, scenes, phase, 0)
        masks = {
            "blocks": tr.mask,
            "dense": shot_mask(cfg.context_frames, chunks, cfg.chunk_frames, cfg.tokens_per_frame),
        }
        tr.step(0)  # warm-up (and the first batch, which nothing prefetched)
        seconds = dict.fromkeys(masks, 0.0)
        for s in range(1, 2 * steps + 1):
            name = ("blocks", "dense")[s % 2]
            tr.mask = masks[name]
            t = time.perf_counter()
            tr.step(s)
            seconds[name] += time.perf_counter() - t
        tr.close()
    return {
        "train_steps": steps,
        "train_chunks": chunks,
        "train_step_s": round(seconds["blocks"] / steps, 2),
        "train_step_dense_mask_s": round(seconds["dense"] / steps, 2),
        "dense_over_blocks": round(seconds["dense"] / seconds["blocks"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="K=V,...",
        help=f"sizes to change ({', '.join(KEYS)}); repeatable; default: the preset as it is",
    )
    ap.add_argument("--shots", type=int, default=3, help="shots timed after the warm-up")
    ap.add_argument("--train-steps", type=int, default=0, help="DiT training steps to time")
    ap.add_argument(
        "--train-chunks",
        type=int,
        default=2,
        help="chunks of a shot each training step trains (2: the centred phase; 4: every chunk)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--save", default=None, help="append the JSON lines to bench/results/NAME.jsonl"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    for spec in args.variant or [""]:
        try:
            changes, cfg = variant(spec)
        except ValueError as e:
            ap.error(str(e))
        row = {
            "bench": "demo_sizes",
            "variant": changes,
            "frame": [cfg.height, cfg.width],
            "tokens_per_latent_frame": cfg.grid_h * cfg.grid_w,
            "dit_params": sum(p.numel() for p in build_dit(cfg, meta=True).parameters()),
            **time_generator(cfg, args.shots),
        }
        if args.train_steps:
            row.update(time_training(cfg, args.train_steps, args.train_chunks))
        emit({**row, **environment(torch.device("cpu")), "threads": args.threads}, args.save)


if __name__ == "__main__":
    main()
