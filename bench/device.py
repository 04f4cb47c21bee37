"""Everything a short GPU loan should measure, as one command with stages in order of value.

    python -m bench.device --stages env,golden,dit,generate --save h200      # on the GPU
    python -m bench.device --stages serve --save h200                        # second call
    python -m bench.device --dry-run                                         # CPU, tiny preset

Stages (each in its own process with its own time box, so a slow or crashing stage costs
only itself; each appends JSON lines as soon as it has them, to stdout, `$OUT/device.jsonl`
(or `--out DIR`) and, with `--save NAME`, `bench/results/NAME.jsonl`):

    env       device, driver, torch/CUDA/cuDNN/triton and package versions, commit; the
              measured ceilings (bf16 matmul TFLOP/s for MFU, device copy GB/s)
    golden    golden parity on the device in float32 (TF32 off) for every golden file;
              bf16-vs-fp32 drift of the DiT (the preset, random weights, two chunks), whose
              bf16 output must be finite
    dit       the DiT alone per chunk (prefill, 4 denoise passes, refresh): eager, CUDA
              graphs, batched sessions with and without grouped attention, torch.compile;
              tokens/s, MFU against the measured matmul
    generate  the whole generator with the full Wan VAE: FPS, time to first frame, per-verb
              ms, peak memory, KV and decoder bytes per session; plain and with CUDA graphs;
              the first chunk's latents and pixels checked finite before the timing
    serve     the server under load (bench.serve, random weights): 1-4 sessions, batching
              on and off, deadline misses, TTFF and prompt-to-visible as clients see them

`--dry-run` runs the same stages on the CPU with the tiny preset and short boxes (CI checks
the structure of what it prints, never the speed). bench/README says how to run it on a
GPU loan (the golden files and missing packages travel as carried folders).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "golden", "dit", "generate", "serve")
# Seconds per stage on a GPU, sized for an H200 with the 1.3B preset (bench/README).
BOXES = {"env": 45, "golden": 120, "dit": 200, "generate": 150, "serve": 230}
DRY_BOXES = {"env": 120, "golden": 300, "dit": 300, "generate": 300, "serve": 300}
PACKAGES = (
    "torch",
    "triton",
    "numpy",
    "safetensors",
    "transformers",
    "diffusers",
    "huggingface_hub",
    "tokenizers",
    "sentencepiece",
    "ftfy",
    "av",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "websockets",
    "httpx",
    "prometheus_client",
    "xformers",
    "torchao",
)
CARRIED_GOLDEN = REPO / ".device" / "golden"  # where bench/device_prepare.py copies them


@dataclass
class Context:
    """What a stage gets: the device, preset, output files and the run's shared state."""

    stage: str
    dry_run: bool
    run_id: str
    out: Path | None
    save: str | None
    golden_dir: Path
    state: Path  # a folder shared by the stages of one run (the measured ceilings)

    @property
    def device_name(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def preset(self) -> str:
        return "tiny" if self.dry_run else "wan2.1-1.3b"

    def record(self, row: dict) -> None:
        """One JSON line, everywhere at once (a later kill loses nothing written)."""
        full = {
            "bench": "device",
            "run": self.run_id,
            "stage": self.stage,
            "dry_run": self.dry_run,
            **row,
        }
        line = json.dumps(full, default=str)
        print(line, flush=True)
        targets = []
        if self.out is not None:
            targets.append(self.out / "device.jsonl")
        if self.save:
            targets.append(REPO / "bench" / "results" / f"{self.save}.jsonl")
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(line + "\n")


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _driver() -> str | None:
    try:
        res = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


# -- stages -----------------------------------------------------------------------------
def stage_env(ctx: Context) -> None:
    import torch

    from bench.common import environment, peak_tflops, sync

    device = torch.device(ctx.device_name)
    row = {
        "kind": "environment",
        **environment(device),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "packages": _versions(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        row.update(
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            driver=_driver(),
        )
    ctx.record(row)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tflops, source = peak_tflops(device, dtype)
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    copy = 2 * nbytes / sorted(times)[len(times) // 2] / 1e9  # bytes read + written
    (ctx.state / "peak.json").write_text(json.dumps([tflops, source]))
    ctx.record(
        {
            "kind": "ceilings",
            "matmul_tflops": round(tflops, 3),
            "matmul_source": source,
            "copy_gb_s": round(copy, 1),
            "copy_bytes": nbytes,
        }
    )


def _peak(ctx: Context, device, dtype) -> tuple[float, str]:
    from bench.common import peak_tflops

    path = ctx.state / "peak.json"
    if path.is_file() and device.type == "cuda":
        value, source = json.loads(path.read_text())
        return float(value), str(source)
    return peak_tflops(device, dtype)


def drift(cfg, device, chunks: int = 2, seed: int = 0) -> dict:
    """bf16 against float32 for the same random DiT and inputs: relative L2 error and max
    abs error of each chunk's x0 (prefill, then `chunks` chunks of denoise + refresh)."""
    import copy

    import torch

    from cache.kv import KVCache, KVLayout
    from model.dit import CausalDiT
    from model.fp8 import quantize_dit_linears
    from model.sampler import FlowSchedule
    from model.steps import chunk_pass, denoise_chunk, prefill_context, refresh_cache

    torch.manual_seed(seed)
    with torch.device(device):
        dit32 = CausalDiT(cfg).eval().requires_grad_(False)
    schedule = FlowSchedule(cfg.sampler)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    ctx_lat = randn(1, cfg.context_frames, *cfg.latent_shape)
    prompt = randn(1, 2, cfg.text.text_len, cfg.dit.text_dim)
    flags = (torch.arange(cfg.context_frames, device=device) * 2 // cfg.context_frames)[None]
    noises = [randn(1, cfg.chunk_frames, *cfg.latent_shape) for _ in range(chunks)]
    draws = [
        [randn(1, cfg.chunk_frames, *cfg.latent_shape) for _ in range(schedule.num_steps - 1)]
        for _ in range(chunks)
    ]
    caption = torch.ones(1, dtype=torch.long, device=device)

    def run(dit, dtype) -> list:
        kv = KVCache(KVLayout.for_config(cfg), 1, dtype, device)
        prefill_context(dit, kv, ctx_lat.to(dtype), flags, flags.clamp(max=1), prompt.to(dtype))
        outs = []
        for b in range(chunks):
            pass_ = chunk_pass(dit, kv, b, flags[:, -1] + 1, caption)
            x0 = denoise_chunk(
                dit, schedule, pass_, noises[b].to(dtype), [d.to(dtype) for d in draws[b]]
            )
            refresh_cache(dit, pass_, x0)
            outs.append(x0.float())
        del kv
        return outs

    def compare(ref, got) -> dict:
        rows = []
        for b, (r, g) in enumerate(zip(ref, got, strict=True)):
            rows.append(
                {
                    "chunk": b,
                    "rel_l2": float((g - r).norm() / r.norm()),
                    "max_abs": float((g - r).abs().max()),
                    "finite": bool(torch.isfinite(g).all()),
                    "ref_rms": float(r.pow(2).mean().sqrt()),
                }
            )
        return {
            "chunks": rows,
            "finite": all(r["finite"] for r in rows),
            "rel_l2_max": max(r["rel_l2"] for r in rows),
        }

    with torch.inference_mode():
        ref = run(dit32, torch.float32)
        dit16 = copy.deepcopy(dit32).to(torch.bfloat16)
        del dit32
        _release_memory()
        out = {
            "reference": "float32 (TF32 off)",
            "bfloat16": compare(ref, run(dit16, torch.bfloat16)),
        }
        try:  # FP8 linears on the bf16 model: kept only within the bf16 drift (x a margin)
            quantize_dit_linears(dit16)
            out["fp8"] = compare(ref, run(dit16, torch.bfloat16))
        except Exception as exc:  # no FP8 matmul on this device
            out["fp8"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["finite"] = out["bfloat16"]["finite"]
    return out


def stage_golden(ctx: Context) -> None:
    import torch

    from model.config import get_preset
    from model.golden import run_selftest

    device = torch.device(ctx.device_name)
    if device.type == "cuda":  # float32 parity: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    files = sorted(ctx.golden_dir.glob("golden_*.safetensors"))
    if not files:
        ctx.record(
            {"kind": "golden-file", "error": f"no golden files in {ctx.golden_dir}", "ok": False}
        )
    for path in files:
        t0 = time.perf_counter()
        try:
            groups = run_selftest(path, device)
        except Exception as exc:  # one file's failure must not hide the others
            ctx.record(
                {
                    "kind": "golden-file",
                    "file": path.name,
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            continue
        for grp in groups:
            ctx.record(
                {
                    "kind": "golden",
                    "file": path.name,
                    "device": str(device),
                    "group": grp.group,
                    "tensors": len(grp.checks),
                    "max_abs": grp.max_abs,
                    "tolerance": grp.tolerance,
                    "reference_spread": grp.spread,
                    "worst": grp.worst,
                    "ok": grp.ok,
                }
            )
        ctx.record(
            {
                "kind": "golden-file",
                "file": path.name,
                "ok": all(g.ok for g in groups),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        _release_memory()
    cfg = get_preset(ctx.preset)
    t0 = time.perf_counter()
    row = drift(cfg, device)
    ctx.record(
        {"kind": "drift", "preset": cfg.name, **row, "seconds": round(time.perf_counter() - t0, 2)}
    )


def dit_variants(dry_run: bool) -> list[dict]:
    """The DiT variants in order of value: today's path first."""
    b = 2 if dry_run else 4
    out = [
        {"mode": "eager", "batch": 1},
        {"mode": "graphs", "batch": 1},
        {"mode": "graphs", "batch": 1, "fp8": True},
        {"mode": "eager", "batch": b},
        {"mode": "eager", "batch": b, "group_rows": True},
        {"mode": "graphs", "batch": b},
        {"mode": "compiled", "batch": 1},  # last: its compile may take the rest of the box
    ]
    return out


def stage_dit(ctx: Context) -> None:
    import torch

    from bench.dit_chunk import measure
    from model.config import get_preset

    device = torch.device(ctx.device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = get_preset(ctx.preset)
    if ctx.dry_run:
        cfg = cfg.replace(chunks_per_shot=2)
    peak = _peak(ctx, device, dtype)
    for variant in dit_variants(ctx.dry_run):
        if ctx.dry_run and variant["mode"] == "compiled":
            ctx.record({"kind": "dit", **variant, "skipped": "dry run (CPU compile takes minutes)"})
            continue
        try:
            row = measure(cfg, device, dtype, shots=2, peak=peak, **variant)
            row.pop("bench", None)
            ctx.record({"kind": "dit", **row})
        except Exception as exc:
            ctx.record({"kind": "dit", **variant, "error": f"{type(exc).__name__}: {exc}"})
        _release_memory()


def stage_generate(ctx: Context) -> None:
    import torch

    from bench.generate import build_parser, run

    device = ctx.device_name
    base = ["--preset", ctx.preset, "--device", device, "--shots", "1", "--warmup", "1"]
    if ctx.dry_run:
        base += ["--chunks", "2"]
    for extra in ([], ["--chunk-graphs"], ["--chunk-graphs", "--fp8"]):
        args = build_parser().parse_args(base + extra)
        seen: list[bool] = []

        def check_first(chunk, gen, extra=extra, seen=seen) -> None:
            if not seen:  # the first chunk of the run: latents and pixels must be finite
                seen.append(True)
                (x,) = [v for k, v in gen.trace.items() if isinstance(k, tuple)]
                ctx.record(
                    {
                        "kind": "first-chunk",
                        "preset": ctx.preset,
                        "variant": extra,
                        "x0_finite": bool(torch.isfinite(x["x0"]).all()),
                        "pixels_finite": bool(torch.isfinite(x["pixels"]).all()),
                        "pixels_std": float(x["pixels"].float().std()),
                        "frames": list(chunk.frames.shape),
                    }
                )
            gen.trace.clear()

        try:
            row = run(args, on_chunk=check_first)
            row.pop("bench", None)
            ctx.record({"kind": "generate", **row})
        except Exception as exc:
            ctx.record(
                {"kind": "generate", "variant": extra, "error": f"{type(exc).__name__}: {exc}"}
            )
        _release_memory()
    from model.config import get_preset

    cfg = get_preset(ctx.preset)
    if ctx.dry_run:
        cfg = cfg.replace(chunks_per_shot=2)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        ctx.record({"kind": "overlap", "preset": cfg.name, **decode_overlap(cfg, dev, dtype)})
    except Exception as exc:
        ctx.record({"kind": "overlap", "error": f"{type(exc).__name__}: {exc}"})


def decode_overlap(cfg, device, dtype, repeats: int = 2) -> dict:
    """What overlapping the VAE decode of chunk n with the DiT of chunk n+1 on two CUDA
    streams would save, before changing when the generator returns a chunk: one shot's
    chunks (DiT as replayed graphs, then decode, then the host copy) run one after another,
    then pipelined (DiT(n+1) launched on the main stream, then decode(n) and its host copy
    on a side stream, waited for while the DiT runs). Wall seconds of each, best of `repeats`.
    On a CPU there is no second stream: both run the same order (the ratio is ~1)."""
    import torch

    from cache.kv import KVCache, KVLayout
    from model.dit import build_dit
    from model.graphs import ChunkGraphs
    from model.sampler import FlowSchedule
    from model.steps import ChunkRow, prefill_context
    from model.vae import WanVAE

    torch.manual_seed(0)
    with torch.device(device):
        dit = build_dit(cfg, device, dtype).eval().requires_grad_(False)
        vae = WanVAE.random(cfg, seed=1, device=device, dtype=dtype)
    schedule = FlowSchedule(cfg.sampler)
    graphs = ChunkGraphs(dit, schedule, device)
    kv = KVCache(KVLayout.for_config(cfg), 1, dtype, device)
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    flags = torch.zeros(1, cfg.context_frames, dtype=torch.long, device=device)
    prompt = torch.randn(1, 1, cfg.text.text_len, cfg.dit.text_dim, device=device, dtype=dtype)
    gen_flag = torch.ones(1, dtype=torch.long, device=device)
    caption = torch.zeros(1, dtype=torch.long, device=device)
    shape = (1, cfg.chunk_frames, *cfg.latent_shape)
    noise = [torch.randn(shape, device=device, dtype=dtype) for _ in range(cfg.chunks_per_shot)]
    draws = [torch.randn(shape, device=device, dtype=dtype) for _ in range(schedule.num_steps - 1)]

    def dit_chunk(b):
        return graphs.run([ChunkRow(kv, b, gen_flag, caption)], noise[b], draws)

    def sequential() -> float:
        state = vae.new_decoder_state()
        t0 = time.perf_counter()
        for b in range(cfg.chunks_per_shot):
            vae.decode_chunk(state, dit_chunk(b)).cpu()
        return time.perf_counter() - t0

    def pipelined() -> float:
        state = vae.new_decoder_state()
        t0 = time.perf_counter()
        pending = None  # (x0 of the chunk before, the event after its DiT)
        for b in range(cfg.chunks_per_shot + 1):
            current = None
            if b < cfg.chunks_per_shot:  # the DiT of chunk b first: one graph launch
                x0 = dit_chunk(b)
                done = torch.cuda.Event() if cuda else None
                if done is not None:
                    done.record()
                current = (x0, done)
            if pending is not None:  # then the decode of chunk b-1 beside it
                prev, prev_done = pending
                if cuda:
                    with torch.cuda.stream(side):
                        side.wait_event(prev_done)
                        prev.record_stream(side)
                        # decode and the copy to (pinned) host memory, on the side stream
                        host = vae.decode_chunk(state, prev).to("cpu", non_blocking=True)
                        copied = torch.cuda.Event()
                        copied.record(side)
                    copied.synchronize()  # chunk b-1's frames are on the host
                    del host
                else:
                    vae.decode_chunk(state, prev).cpu()
            pending = current
        return time.perf_counter() - t0

    with torch.inference_mode():
        prefill_context(
            dit,
            kv,
            torch.zeros(1, cfg.context_frames, *cfg.latent_shape, device=device, dtype=dtype),
            flags,
            flags,
            prompt,
        )
        sequential()  # warm-up: graph captures, kernel choice
        seq = min(sequential() for _ in range(repeats))
        pipe = min(pipelined() for _ in range(repeats))
    return {
        "chunks": cfg.chunks_per_shot,
        "sequential_s": round(seq, 4),
        "pipelined_s": round(pipe, 4),
        "pipelined_vs_sequential": round(pipe / seq, 4),
        "streams": 2 if cuda else 1,
    }


def serve_cases(dry_run: bool) -> list[list[str]]:
    """bench.serve invocations: batching on and off for 1-4 sessions, all admitted."""
    if dry_run:
        return [
            [
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--sessions",
                "1",
                "--duration",
                "3",
                "--prompt-every",
                "1.5",
            ]
        ]
    base = [
        "--preset",
        "wan2.1-1.3b",
        "--device",
        "cuda",
        "--random-weights",
        "--duration",
        "10",
        "--prompt-every",
        "3",
        "--admit-all",
    ]
    return [
        base + ["--sessions", "1,2,3,4", "--compare", "max_batch=4"],  # batching on
        base + ["--sessions", "4", "--compare", "max_batch=1"],  # off, where it matters
    ]


def stage_serve(ctx: Context) -> None:
    for argv in serve_cases(ctx.dry_run):
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.serve", *argv],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                ctx.record({"kind": row.pop("bench", "serve"), **row})
        if proc.wait():
            ctx.record(
                {"kind": "serve", "args": argv, "error": f"bench.serve exited {proc.returncode}"}
            )


STAGE_FUNCS: dict[str, Callable[[Context], None]] = {
    "env": stage_env,
    "golden": stage_golden,
    "dit": stage_dit,
    "generate": stage_generate,
    "serve": stage_serve,
}


# -- the parent: stages in order, each in its own time box ----------------------------
def _default_golden() -> Path:
    if CARRIED_GOLDEN.is_dir():
        return CARRIED_GOLDEN
    return Path(os.environ.get("SHOTSTREAM_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, short boxes")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in this order")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
        help="folder for device.jsonl and stage logs (default: $OUT)",
    )
    ap.add_argument("--save", default=None, help="also append to bench/results/NAME.jsonl")
    ap.add_argument(
        "--golden-dir",
        type=Path,
        default=None,
        help="golden_*.safetensors + .json (default: .device/golden if carried, "
        "else $SHOTSTREAM_GOLDEN_DIR or ../shared/golden)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="all stages together (default: 480 on a GPU, 900 dry run)",
    )
    ap.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="STAGE=S",
        help="override one stage's time box",
    )
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


def _run_child(args: argparse.Namespace, stage: str, box: float, state: Path) -> tuple[str, int]:
    cmd = [
        sys.executable,
        "-m",
        "bench.device",
        "--child",
        stage,
        "--run-id",
        args.run_id,
        "--state",
        str(state),
        "--golden-dir",
        str(args.golden_dir),
    ]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.out is not None:
        cmd += ["--out", str(args.out)]
    if args.save:
        cmd += ["--save", args.save]
    log_dir = args.out if args.out is not None else state
    log = open(log_dir / f"stage-{stage}.log", "w")  # noqa: SIM115 (closed below)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A session of its own: a time-out ends the stage and every process it started.
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=log, env=env, start_new_session=True)
    try:
        return ("ok" if proc.wait(box) == 0 else "error"), proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", proc.returncode
    finally:
        log.close()
        if proc.returncode:  # the end of its log, where the output tail shows it
            tail = (log_dir / f"stage-{stage}.log").read_text(errors="replace")[-1500:]
            print(tail, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.golden_dir = args.golden_dir or _default_golden()
    args.run_id = args.run_id or time.strftime("%Y%m%dT%H%M%S")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        ctx = Context(
            args.child,
            args.dry_run,
            args.run_id,
            args.out,
            args.save,
            args.golden_dir,
            args.state or Path(tempfile.mkdtemp()),
        )
        import torch

        torch.set_flush_denormal(True)
        if args.dry_run:
            torch.set_num_threads(1)
        STAGE_FUNCS[args.child](ctx)
        return 0

    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    boxes = dict(DRY_BOXES if args.dry_run else BOXES)
    for item in args.box:
        name, _, seconds = item.partition("=")
        boxes[name] = float(seconds)
    budget = args.budget_s or (900.0 if args.dry_run else 480.0)
    t_start = time.monotonic()
    summary = Context(
        "summary", args.dry_run, args.run_id, args.out, args.save, args.golden_dir, Path(".")
    )
    statuses = {}
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        for stage in STAGES:
            if stage not in stages:
                continue
            left = budget - (time.monotonic() - t_start)
            box = min(boxes[stage], left)
            rec = Context(
                stage, args.dry_run, args.run_id, args.out, args.save, args.golden_dir, Path(tmp)
            )
            if left < 10:
                statuses[stage] = "skipped"
                rec.record({"kind": "stage", "status": "skipped", "reason": "budget spent"})
                continue
            t0 = time.monotonic()
            status, rc = _run_child(args, stage, box, Path(tmp))
            statuses[stage] = status
            rec.record(
                {
                    "kind": "stage",
                    "status": status,
                    "rc": rc,
                    "box_s": round(box),
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
    summary.record(
        {"kind": "summary", "stages": statuses, "seconds": round(time.monotonic() - t_start, 1)}
    )
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
