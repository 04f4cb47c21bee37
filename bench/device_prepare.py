"""Prepare a GPU loan before it starts: the folders that travel with the command, checked
against the size limit, and the exact commands to run there (bench/README, "GPU loan").

    python -m bench.device_prepare          # fill .device/, check sizes, print the commands

.device/ is git-ignored. What it holds:

    golden/     the golden files (../shared/golden beside the checkout does not travel)
    whl/        wheels (cp312, manylinux x86_64) of what stages env..generate import and the
                GPU image lacks: diffusers, ftfy and what they need
    whl-serve/  the same for stage serve: fastapi, uvicorn, PyAV, pydantic, ...
    commit      the commit this was prepared at (the copy on the device has no .git)

Nothing can be fetched on the device, and a call carries at most 64 MiB (the working tree
and the carried folders together): PyAV's wheel alone is about 36 MB, so the golden files
and the server's wheels travel in two calls, `COMMAND` then `COMMAND_SERVE`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE = REPO / ".device"
LIMIT = 64 * 2**20  # bytes one call may carry, working tree included
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

# The GPU image's Python packages (python3 3.12, torch 2.11.0, transformers 5.17.0,
# numpy 2.5.2, safetensors 0.8.0, huggingface_hub 1.33.0, tokenizers 0.23.2, sentencepiece
# 0.2.2, triton 3.6.0), as the device tool's notes listed them on 2026-11-17.
_IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
"""
DEVICE_HAS = frozenset(_IMAGE_PACKAGES.split())
# Versions the image holds (the resolution must fit them: a newer huggingface_hub would
# pull packages of its own that the device does not need).
DEVICE_PINS = (
    "torch==2.11.0",
    "transformers==5.17.0",
    "huggingface-hub==1.33.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.2",
    "sentencepiece==0.2.2",
)
# Carried although the image has a version: pydantic 2.14 needs typing-extensions >= 4.16,
# newer than the image may hold (shadowing it with a newer one is harmless).
ALWAYS = frozenset({"typing-extensions"})
# The project's dependencies the model stages import; the rest is the server's.
CORE = frozenset({"diffusers", "ftfy"})

_INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site {wheels} && export PYTHONPATH=/tmp/site || exit; "
)
# Call 1 (at most 420 s of stages; run with timeout_s=540): carry .device/golden,
# .device/whl, .device/commit.
COMMAND = (
    _INSTALL.format(wheels=".device/whl/*.whl")
    + "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv; "
    "PYTHONUNBUFFERED=1 python3 -m bench.device --stages env,golden,dit,generate "
    "--save h200 --budget-s 420 2>&1 | tee $OUT/console.log"
)
# Call 2 (at most 240 s; timeout_s=330), right after, while the machine is warm: carry
# .device/whl, .device/whl-serve, .device/commit.
COMMAND_SERVE = (
    _INSTALL.format(wheels=".device/whl/*.whl .device/whl-serve/*.whl")
    + "PYTHONUNBUFFERED=1 python3 -m bench.device --stages serve --save h200 "
    "--budget-s 240 2>&1 | tee $OUT/console-serve.log"
)
CARRY = [".device/golden", ".device/whl", ".device/commit"]
CARRY_SERVE = [".device/whl", ".device/whl-serve", ".device/commit"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_requirements() -> tuple[list[str], list[str]]:
    """The project's runtime requirements the device lacks: (core, serve)."""
    import tomllib  # Python 3.11+, where this runs (the package itself supports 3.10)

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    core, serve = [], []
    for spec in deps:
        name = canonical(re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0])
        if name in DEVICE_HAS:
            continue
        (core if name in CORE else serve).append(spec)
    return core, serve


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def _platform_args() -> list[str]:
    out = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for p in PLATFORMS:
        out += ["--platform", p]
    return out


def resolve(requirements: list[str]) -> dict[str, str]:
    """name -> version of everything `requirements` need on the device, as pip resolves it
    for cp312 manylinux x86_64 (no download of the packages themselves)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pins = Path(tmp) / "device-pins.txt"
        pins.write_text("\n".join(DEVICE_PINS) + "\n")
        res = _pip(
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(pins),
            *_platform_args(),
            *requirements,
        )
        if res.returncode:
            raise SystemExit(f"pip could not resolve {requirements}:\n{res.stderr[-2000:]}")
        items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def fill(dest: Path, pins: dict[str, str]) -> int:
    """Download exactly `pins` (one version each) into a fresh `dest`; returns its bytes."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    specs = [f"{n}=={v}" for n, v in sorted(pins.items())]
    if specs:
        res = _pip("download", "--no-deps", *_platform_args(), "-d", str(dest), *specs)
        if res.returncode:
            raise SystemExit(f"pip download failed:\n{res.stderr[-2000:]}")
    return sum(p.stat().st_size for p in dest.glob("*.whl"))


def tree_bytes() -> int:
    """Bytes of what every call sends: tracked and untracked-not-ignored files."""
    res = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    paths = [REPO / p for p in res.stdout.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--golden-dir", type=Path, default=REPO.parent / "shared" / "golden")
    ap.add_argument("--no-wheels", action="store_true", help="golden files and commit only")
    args = ap.parse_args(argv)

    DEVICE.mkdir(exist_ok=True)
    golden = DEVICE / "golden"
    shutil.rmtree(golden, ignore_errors=True)
    golden.mkdir()
    files = sorted(args.golden_dir.glob("golden_*.safetensors"))
    if not files:
        raise SystemExit(f"no golden files in {args.golden_dir}")
    for f in files:
        shutil.copy2(f, golden / f.name)
        shutil.copy2(f.with_suffix(".json"), golden / f.with_suffix(".json").name)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (DEVICE / "commit").write_text(head + ("-dirty" if dirty else "") + "\n")

    if not args.no_wheels:
        core_reqs, serve_reqs = missing_requirements()
        core = {n: v for n, v in resolve(core_reqs).items() if n not in DEVICE_HAS or n in ALWAYS}
        core.update({n: v for n, v in resolve(sorted(ALWAYS)).items() if n in ALWAYS})
        serve = {
            n: v
            for n, v in resolve(serve_reqs).items()
            if (n not in DEVICE_HAS or n in ALWAYS) and n not in core
        }
        fill(DEVICE / "whl", core)
        fill(DEVICE / "whl-serve", serve)
        print(json.dumps({"whl": core, "whl-serve": serve}))

    tree = tree_bytes()
    ok = True
    for label, command, carry in (
        ("call 1", COMMAND, CARRY),
        ("call 2", COMMAND_SERVE, CARRY_SERVE),
    ):
        carried = sum(folder_bytes(REPO / c) for c in carry if (REPO / c).exists())
        total = tree + carried
        fits = total <= LIMIT and len(command) <= 2000
        ok &= fits
        print(
            json.dumps(
                {
                    "call": label,
                    "tree_mib": round(tree / 2**20, 1),
                    "carried_mib": round(carried / 2**20, 1),
                    "total_mib": round(total / 2**20, 1),
                    "limit_mib": LIMIT / 2**20,
                    "command_chars": len(command),
                    "fits": fits,
                    "carry": carry,
                    "command": command,
                }
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
