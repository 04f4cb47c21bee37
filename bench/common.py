"""What every benchmark reports beside its numbers: device, versions, commit, peak FLOP/s."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core datasheet peaks (TFLOP/s), reported beside the measured one: MFU
# is taken against a matmul measured on the device itself (an H200 of the GPU lease ran
# 8192^3 bf16 at about 790, not the datasheet's 989).
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


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak for MFU: a large matmul measured here, random data (zeros run faster), median
    of timed repeats after warm-ups; the source string names the datasheet figure too."""
    n = 1024 if device.type == "cpu" else 8192
    reps = 5 if device.type == "cpu" else 10
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(reps + 3):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    value = 2 * n**3 / times[len(times) // 2] / 1e12
    sheet = datasheet_tflops(device)
    src = f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"
    return value, src + (f" (datasheet {sheet:g})" if sheet else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    """The short commit; on a copy without .git (a GPU loan), the one bench/device_prepare
    wrote into the carried .device/commit."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        carried = Path(__file__).resolve().parents[1] / ".device" / "commit"
        return carried.read_text().strip() if carried.is_file() else "unknown"


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
