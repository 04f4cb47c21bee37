"""What the quick recipe's DiT phases cost a step on this host, with one process and with
`--workers` processes sharing each step (training/parallel.py), and what the per-frame VAE
encode of training's data pipeline costs with and without the lone-frame kernel slice
(model/vae.py `_OneDNNCausalConv3d`): one JSON line, ratios taken within the run.

    python -m bench.train_steps --steps 100
    python -m bench.train_steps --phases whole --steps 100 --workers 1 --workers 2

Each phase runs from the same weights (the shipped ones unless `--weights`), with the
quick recipe's config and step count replaced by `--steps`, through the function
`train-demo` uses for a phase, so the data pipeline, the prefetch thread and the spawned
ranks all run as in a recipe; the first `--warm` steps of each (spawns, an empty latent
cache) are left out of the per-step figure. Timings depend on the host: compare the ratios.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from bench.common import emit, environment
from model.config import get_preset
from model.vae import _OneDNNCausalConv3d
from training.parallel import rank_config
from training.run import TrainDemoConfig, _run_phase, _tokenizer_and_scenes, load_start
from training.start_train import StartTrainer

SHIPPED = Path(__file__).resolve().parent.parent / "model" / "demo_weights"


class _WholeKernel(_OneDNNCausalConv3d):
    """The routed conv without the lone-frame slice: every frame meets the whole kernel."""

    forward = WanCausalConv3d.forward


def time_encode(vae, frames: int, repeats: int) -> dict:
    """ms per frame of `encode_frames`, with the lone-frame slice and without (interleaved)."""
    whole = copy.deepcopy(vae)
    for mod in whole.model.modules():
        if type(mod) is _OneDNNCausalConv3d:
            mod.__class__ = _WholeKernel
    cfg = get_preset("demo")
    g = torch.Generator().manual_seed(0)
    px = torch.rand(frames, 3, cfg.height, cfg.width, generator=g) * 2 - 1
    ms = {"slice": [], "whole_kernel": []}
    a, b = vae.encode_frames(px), whole.encode_frames(px)
    gap = float((a - b).abs().max() / b.abs().max())
    for _ in range(repeats):
        for name, v in (("slice", vae), ("whole_kernel", whole)):
            t0 = time.perf_counter()
            v.encode_frames(px)
            ms[name].append((time.perf_counter() - t0) * 1000 / frames)
    best = {k: round(min(v), 3) for k, v in ms.items()}
    return {
        "encode_ms_per_frame": best,
        "encode_speedup": round(best["whole_kernel"] / best["slice"], 2),
        "encode_max_relative_gap": gap,  # float rounding at most (0.0 on this project's CPU)
    }


def time_phase(name: str, workers: int, steps: int, warm: int, weights: Path) -> float:
    """Seconds a step of the quick recipe's phase `name` after `warm` steps."""
    cfg = get_preset("demo")
    tc = TrainDemoConfig()
    pc = replace(getattr(tc, name), steps=steps)
    dit, text, vae = load_start(cfg, weights)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok, scenes = _tokenizer_and_scenes(cfg, work)
        trainer = StartTrainer(
            cfg, dit, text, vae, tok, scenes, rank_config(pc, workers), tc.seed + pc.data_seed
        )
        marks: list[float] = []
        step = trainer.step

        def timed(i: int):
            out = step(i)
            marks.append(time.perf_counter())
            return out

        trainer.step = timed
        _run_phase(name, trainer, work, 1e9, False, workers)
    return (marks[-1] - marks[warm - 1]) / (steps - warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", nargs="+", default=["cross", "whole"], help="quick-recipe phases")
    ap.add_argument("--workers", type=int, action="append", help="repeatable; default 1 and 2")
    ap.add_argument("--steps", type=int, default=100, help="steps of each phase and count")
    ap.add_argument("--warm", type=int, default=20, help="first steps left out of the figure")
    ap.add_argument("--encode-frames", type=int, default=64)
    ap.add_argument("--weights", type=Path, default=SHIPPED)
    ap.add_argument("--save", default=None, help="append the JSON line to bench/results/NAME.jsonl")
    args = ap.parse_args()
    if not 0 < args.warm < args.steps:
        ap.error("--warm must be at least 1 and below --steps")
    torch.set_num_threads(1)  # as the DiT phases run (the ranks take one thread each)
    torch.set_flush_denormal(True)
    workers = args.workers or [1, 2]
    row: dict = {"bench": "train_steps", "steps": args.steps, "warm": args.warm}
    _, _, vae = load_start(get_preset("demo"), args.weights)
    row.update(time_encode(vae, args.encode_frames, repeats=3))
    per_step = {}
    for name in args.phases:
        per_step[name] = {
            w: round(time_phase(name, w, args.steps, args.warm, args.weights), 4) for w in workers
        }
    row["seconds_per_step"] = per_step
    base = workers[0]
    row["speedup_over_workers"] = {
        name: {w: round(t[base] / t[w], 2) for w in workers} for name, t in per_step.items()
    }
    row["baseline_workers"] = base
    emit({**row, **environment(torch.device("cpu"))}, args.save)


if __name__ == "__main__":
    main()
