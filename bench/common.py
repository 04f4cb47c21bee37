"""What every benchmark reports beside its numbers: device, versions, commit, peak FLOP/s."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; CPU figures are measured instead.
GPU_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak for MFU: the datasheet figure on a known GPU, else a measured large matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"datasheet dense bf16 ({key})"
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, f"measured {n}x{n} matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def emit(row: dict, save_as: str | None = None) -> None:
    """Print one JSON line; with `save_as`, also append it to bench/results/<save_as>.jsonl."""
    line = json.dumps(row)
    print(line, flush=True)
    if save_as:
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / f"{save_as}.jsonl", "a") as f:
            f.write(line + "\n")
