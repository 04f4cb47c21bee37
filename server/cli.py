"""The `shotstream` command: serve, selftest, generate, download, check-weights, train-demo
and eval-demo.

Each subcommand's arguments are declared here; the work lives in the module it names,
imported lazily, inside a function: `server.serve`, `model.golden` (selftest),
`model.offline` (generate), `model.hub` (download, check-weights) and `training.run`
(train-demo, eval-demo: the serving code's only imports of `training`).
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_selftest(args: argparse.Namespace) -> int:
    """Replay golden files through our code; one JSON line per tensor group."""
    import torch

    from model.golden import run_selftest

    torch.set_flush_denormal(True)
    failed = False
    for path in args.golden:
        try:
            groups = run_selftest(path)
        except (OSError, ValueError, KeyError) as exc:
            print(json.dumps({"file": path, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            failed = True
            continue
        for grp in groups:
            row = {
                "file": path,
                "group": grp.group,
                "tensors": len(grp.checks),
                "max_abs": grp.max_abs,
                "tolerance": grp.tolerance,
                "reference_spread": grp.spread,
                "worst": grp.worst,
                "ok": grp.ok,
            }
            print(json.dumps(row), flush=True)
            failed |= not grp.ok
    return 1 if failed else 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Offline generation of a multi-shot script into an MP4 file."""
    from model.offline import run_generate

    return run_generate(args)


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch the real weights from the Hugging Face hub."""
    from model.hub import run_download

    return run_download(args)


def cmd_check_weights(args: argparse.Namespace) -> int:
    """Check a weights folder file by file, then optionally load it strictly."""
    from model.hub import run_check_weights

    return run_check_weights(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the streaming server (uvicorn)."""
    from server.serve import run_serve

    return run_serve(args)


def cmd_train_demo(args: argparse.Namespace) -> int:
    """Train the bundled demo model (training/; never imported by the server)."""
    from training.run import run_train_demo

    return run_train_demo(args)


def cmd_eval_demo(args: argparse.Namespace) -> int:
    """Prompt adherence of the demo model on held-out prompts, from pixels."""
    from training.run import run_eval_demo

    return run_eval_demo(args)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shotstream",
        description="ShotStream: real-time multi-shot text-to-video streaming server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "selftest",
        help="check this install against golden vectors of the original implementation",
        description="Replay every recorded call of golden files (sizes from the JSON beside "
        "each) and print one JSON line per tensor group with its max abs error. Exits 1 "
        "past tolerance.",
    )
    p.add_argument(
        "--golden",
        action="extend",
        nargs="+",
        required=True,
        metavar="FILE",
        help="golden .safetensors files (each with its .json sidecar beside it); repeatable",
    )
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser(
        "generate",
        help="generate a multi-shot script into an MP4 file (offline, no server)",
        description="Generate every shot of a script in the original demo format "
        '({"global_caption": "...", "shot1": "...", "shot2": "...", ...}) and write one '
        "H.264 MP4 at the preset's fps. Without --weights the demo preset runs on its bundled "
        "weights (a small model trained on procedural shapes); --preset tiny runs on random "
        "weights (the video is noise).",
    )
    p.add_argument("--script", required=True, metavar="FILE.json", help="the shot script (JSON)")
    p.add_argument("--out", required=True, metavar="VIDEO.mp4", help="the MP4 file to write")
    p.add_argument(
        "--preset",
        default=None,
        help="model preset (default: wan2.1-1.3b with --weights, demo without)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="DIR",
        help="weights folder (see `shotstream download`); none = the preset's bundled "
        "weights (demo) or random ones (tiny)",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (and random weights' seed)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--attention", default="auto", help="attention backend: auto, sdpa or xformers")
    p.add_argument(
        "--chunks-per-shot",
        type=_positive_int,
        default=None,
        metavar="N",
        help="chunks per shot (default: the preset's, 7 = 81 frames)",
    )
    p.add_argument(
        "--prompt-overflow",
        default="truncate",
        choices=["truncate", "reject", "fit"],
        help="captions over the text length: cut the end (as the original), "
        "refuse, or shorten the global caption first",
    )
    p.add_argument("--crf", type=float, default=18.0, help="H.264 quality (0-51, lower is better)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "download",
        help="fetch the real weights from the Hugging Face hub",
        description="Fetch the ShotStream checkpoint (KlingTeam/ShotStream) and the Wan2.1 "
        "VAE, umT5-xxl text encoder and tokenizer into DIR, in the layout --weights expects. "
        "Interrupted downloads resume; completed repos are skipped.",
    )
    p.add_argument("--dir", default="weights", help="weights folder to fill (default: ./weights)")
    p.add_argument(
        "--layout",
        default="original",
        choices=["original", "diffusers"],
        help="original: Wan-AI/Wan2.1-T2V-1.3B files, ~12 GB (bf16 text encoder); "
        "diffusers: Wan-AI/Wan2.1-T2V-1.3B-Diffusers, ~23 GB (fp32 text encoder)",
    )
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or login)")
    p.add_argument(
        "--recheck",
        action="store_true",
        help="ask the hub again even for repos recorded as complete",
    )
    p.add_argument("--preset", default="wan2.1-1.3b", help="preset to check the folder for")
    p.add_argument(
        "--skip-check",
        action="store_true",
        help="only locate the files afterwards; do not read their headers",
    )
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "check-weights",
        help="name any missing or wrong file in a weights folder",
        description="Locate every file the preset needs, check key names, shapes and "
        "configs from the file headers (no tensor data read), and with --load load "
        "everything strictly. Exits 1 naming each problem.",
    )
    p.add_argument("--weights", required=True, metavar="DIR", help="weights folder")
    p.add_argument("--preset", default="wan2.1-1.3b", help="preset the weights are for")
    p.add_argument("--load", action="store_true", help="also load every component strictly")
    p.add_argument("--device", default="cpu", help="device for --load (default cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="dtype for --load (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.set_defaults(func=cmd_check_weights)

    p = sub.add_parser(
        "train-demo",
        help="train the small demo model on procedural shapes (2 CPU cores: under an hour)",
        description="Train the demo preset's VAE, then its causal DiT and text encoder, on "
        "procedural multi-shot clips, then a shot's first chunk at sigma 1 (object placement), "
        "then whole shots at every level, then (full recipe) whole shots that start centred "
        "(at three learning rates, the last with a motion term) and the VAE decoder, on the "
        "generator's own latents and then on the encoder's; checkpoints go to --work, the "
        "weights to --out. "
        "Seeded: the same seed and step counts give the same batches, resumed or not.",
    )
    p.add_argument(
        "--work",
        default="artifacts/demo-train",
        metavar="DIR",
        help="checkpoints and logs (default: artifacts/demo-train)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="weights folder to write (default: WORK/export; the shipped weights live in model/demo_weights)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data, noise and initial weights")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument(
        "--recipe",
        choices=["quick", "full"],
        default="quick",
        help="quick: under an hour on 2 CPU cores (52.4 minutes measured); full: the "
        "shipped weights' recipe: seventeen phases, better adherence (520 minutes measured)",
    )
    p.add_argument(
        "--vae-steps",
        type=int,
        default=None,
        metavar="N",
        help="VAE optimiser steps (default 1000, both recipes)",
    )
    p.add_argument(
        "--dit-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the teacher-forced DiT phase over every level and chunk "
        "(default 0: quick starts with the placement phase; full 1000)",
    )
    p.add_argument("--dit-batch", type=int, default=None, metavar="N", help="DiT shots per step")
    p.add_argument(
        "--dit-unroll",
        type=float,
        default=None,
        metavar="P",
        help="chance a later sampler level is noised from the model's own x0 of the level before (default 0)",
    )
    p.add_argument(
        "--start-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that teaches a shot's first chunk to place the "
        "object (default 500, where its framing and motion start it; full 1500, where its "
        "noise says)",
    )
    p.add_argument(
        "--follow-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that keeps that object through the sampler's "
        "later steps and later chunks (default 0; full 800)",
    )
    p.add_argument(
        "--polish-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the one before with the object's "
        "pixels weighted up (default 0; full 1500)",
    )
    p.add_argument(
        "--carry-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase on stories with earlier shots and more colour changes "
        "(default 800: first chunks at sigma 1, whose colour often only the context frames "
        "carry; full 1000: the object-weighted whole-shot phase on longer stories)",
    )
    p.add_argument(
        "--centre-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the object-weighted one with every shot "
        "starting at the frame's centre (default 0; full 3000)",
    )
    p.add_argument(
        "--settle-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the centred one at a lower learning rate "
        "(default 0; full 1200)",
    )
    p.add_argument(
        "--motion-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the one before at half its learning rate "
        "with the motion term, on new stories (default 0; full 1200)",
    )
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the VAE decoder phase on the generator's own latents (default 0; full 1000)",
    )
    p.add_argument(
        "--sharpen-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase after it, the VAE decoder on the encoder's latents of "
        "rendered frames (default 1000; full 3000)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase after the decoder phases, the lower-rate centred one again "
        "(default 0; full 2000)",
    )
    p.add_argument(
        "--fresh-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the one before on stories of its own "
        "(default 0; full 2000)",
    )
    p.add_argument(
        "--cross-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the one before with vertical shots crossing "
        "the frame (default 4000, from a DiT trained only to place; full 3000)",
    )
    p.add_argument(
        "--extend-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase that repeats the one before on stories of its own "
        "(default 0; full 2000)",
    )
    p.add_argument(
        "--extra-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of phase 16 (each of its rounds), the one before again on stories of "
        "its own (default 0; full 2000)",
    )
    p.add_argument(
        "--extra-rounds",
        type=_positive_int,
        default=None,
        metavar="N",
        help="rounds of phase 16, each with a fresh optimiser on stories of its own "
        "(default 1; full 7)",
    )
    p.add_argument(
        "--whole-steps",
        type=int,
        default=None,
        metavar="N",
        help="steps of the phase after those rounds, their config with every chunk of a shot "
        "trained (default 2650, straight after the crossing phase; full 2000)",
    )
    p.add_argument(
        "--decoder-stories",
        type=int,
        default=None,
        metavar="N",
        help="generated stories the decoder phase trains on (default 150)",
    )
    p.add_argument(
        "--start-from",
        default=None,
        metavar="DIR",
        help="a weights folder that stands for phases 1 to 6 (skipped): the centred "
        "phases, the decoder phases and the DiT phases after them continue from it",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of the DiT phases (default 1: they prefetch batches on another core)",
    )
    p.add_argument(
        "--vae-threads",
        type=int,
        default=0,
        help="torch CPU threads of the VAE and sharpen phases, which run alone (0 = every core)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that share every DiT step, one torch thread each (default: the "
        "recipe's, quick 2, full 1); each draws its share of the batch from a seed of its "
        "own, so the count changes the run",
    )
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser(
        "eval-demo",
        help="measure the demo model's prompt adherence from pixels (one JSON line)",
        description="Generate multi-shot stories on held-out prompts through the production "
        "generator, with mid-stream prompt cuts, and read every chunk's pixels: colour, "
        "shape and motion adherence, consistency across cuts, and the first chunk after "
        "a switch; each chunk figure also by prompted shape, motion and framing, shot and "
        "chunk, with the shapes read for each prompted one.",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="DIR",
        help="weights folder (default: the bundled demo weights)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="the baseline: the demo preset with random weights (at chance)",
    )
    p.add_argument(
        "--stories",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate the first N held-out stories (default: all)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first story set (stories and noise)"
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        metavar="N",
        help="story sets pooled, seeds SEED .. SEED+N-1, 27 stories each (default 3: one set "
        "is too few to tell small changes apart; each set's own figures are in by_seed)",
    )
    p.add_argument(
        "--round-trip",
        action="store_true",
        help="also read VAE round trips of rendered held-out shots (the decoder's ceiling; "
        "about 30 s more)",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=cmd_eval_demo)

    p = sub.add_parser(
        "serve",
        help="run the streaming server (REST + WebSocket, protocol v1)",
        description="Serve real-time multi-shot video over WebSocket. Every setting is a flag "
        "here and a SHOTSTREAM_* environment variable (flags win).",
    )
    from server.serve import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
