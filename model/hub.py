"""Getting and checking a weights folder: `shotstream download` and `shotstream check-weights`.

`download` fetches three things from the Hugging Face hub into the folders
`model.layout.find_weights` looks in:

    DIR/ShotStream/                  KlingTeam/ShotStream: shotstream_merged.pt + its configs
    DIR/Wan2.1-T2V-1.3B/             --layout original (default): VAE .pth, umT5 bf16 .pth
                                     (11.4 GB) and google/umt5-xxl/ tokenizer, ~12 GB
    DIR/Wan2.1-T2V-1.3B-Diffusers/   --layout diffusers: vae/, text_encoder/ (22.7 GB fp32),
                                     tokenizer/

Each repo is fetched with `snapshot_download(allow_patterns=...)` into its folder, which
resumes partial files. A repo that completed is recorded in `.shotstream-download.json`
in its folder (files and sizes), so a later run skips it without asking the hub.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD = ".shotstream-download.json"


@dataclass(frozen=True)
class HubSource:
    """One hub repo and the files of it we need, fetched into `DIR/folder`."""

    repo_id: str
    folder: str
    patterns: tuple[str, ...]
    what: str


SHOTSTREAM = HubSource(
    "KlingTeam/ShotStream",
    "ShotStream",
    ("shotstream_merged.pt", "shotstream.yaml", "default_config.yaml"),
    "ShotStream causal student (the whole generator)",
)
WAN_ORIGINAL = HubSource(
    "Wan-AI/Wan2.1-T2V-1.3B",
    "Wan2.1-T2V-1.3B",
    ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*"),
    "Wan2.1 VAE, umT5-xxl text encoder (bf16) and tokenizer, original layout",
)
WAN_DIFFUSERS = HubSource(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "Wan2.1-T2V-1.3B-Diffusers",
    ("vae/*", "text_encoder/*", "tokenizer/*"),
    "Wan2.1 VAE, umT5-xxl text encoder (fp32) and tokenizer, Diffusers layout",
)
LAYOUTS = {"original": WAN_ORIGINAL, "diffusers": WAN_DIFFUSERS}


class DownloadError(RuntimeError):
    """A fetch that failed; the message says which repo and what to do."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# -- download -------------------------------------------------------------------------------
def sources_for(layout: str) -> list[HubSource]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    return [SHOTSTREAM, LAYOUTS[layout]]


def completed(source: HubSource, root: Path) -> bool:
    """Whether an earlier run fetched all of `source` and its files are still whole."""
    folder = root / source.folder
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if record.get("repo_id") != source.repo_id or record.get("patterns") != list(source.patterns):
        return False
    files = record.get("files") or {}
    return bool(files) and all(
        (folder / name).is_file() and (size is None or (folder / name).stat().st_size == size)
        for name, size in files.items()
    )


def fetch(source: HubSource, root: Path, token: str | None = None, recheck: bool = False) -> bool:
    """Fetch `source` into `root/source.folder`; False if a completed earlier run was kept."""
    import huggingface_hub

    folder = root / source.folder
    if not recheck and completed(source, root):
        print(f"{source.repo_id}: complete in {folder}, skipped", file=sys.stderr)
        return False
    kwargs: dict[str, Any] = dict(
        allow_patterns=list(source.patterns), local_dir=str(folder), token=token
    )
    try:
        plan = huggingface_hub.snapshot_download(source.repo_id, dry_run=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 (network, auth and hub errors all end here)
        raise DownloadError(f"{source.repo_id}: cannot list the files: {_explain(exc)}") from exc
    if not plan:
        raise DownloadError(
            f"{source.repo_id}: no files match {', '.join(source.patterns)}; has the repo moved?"
        )
    for f in plan:
        # The hub trusts its own metadata over the file: a file cut short or overwritten
        # since would be kept. Remove it so that it is fetched again.
        local = folder / f.filename
        if local.is_file() and f.file_size is not None and local.stat().st_size != f.file_size:
            print(f"{source.repo_id}: {f.filename} is damaged; fetching it again", file=sys.stderr)
            local.unlink()
            f.will_download = True
    total = sum(f.file_size or 0 for f in plan)
    need = sum(f.file_size or 0 for f in plan if f.will_download)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        raise DownloadError(
            f"{source.repo_id}: needs {human_bytes(need)} but {root} has {human_bytes(free)} free"
        )
    print(
        f"{source.repo_id}: {source.what}; {len(plan)} files, {human_bytes(total)}, "
        f"{human_bytes(need)} to fetch -> {folder}",
        file=sys.stderr,
    )
    try:
        huggingface_hub.snapshot_download(source.repo_id, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise DownloadError(
            f"{source.repo_id}: download failed: {_explain(exc)}. Run the same command again "
            "to resume; finished files are kept."
        ) from exc
    files = {f.filename: f.file_size for f in plan}
    short = [
        n
        for n, size in files.items()
        if not (folder / n).is_file() or (size is not None and (folder / n).stat().st_size != size)
    ]
    if short:
        raise DownloadError(
            f"{source.repo_id}: files missing or of the wrong size after download: {', '.join(short)}"
        )
    record = {
        "repo_id": source.repo_id,
        "patterns": list(source.patterns),
        "commit": plan[0].commit_hash,
        "files": files,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return True


def _explain(exc: Exception) -> str:
    name = type(exc).__name__
    hint = ""
    if name == "GatedRepoError":
        hint = " (accept the licence on the repo's hub page, then pass --token or set HF_TOKEN)"
    elif name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        hint = " (a private repo needs --token or HF_TOKEN)"
    elif name in (
        "LocalEntryNotFoundError",
        "ConnectError",
        "ConnectTimeout",
        "OfflineModeIsEnabled",
    ):
        hint = " (is huggingface.co reachable? HF_HUB_OFFLINE must be unset)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {first}{hint}"


def run_download(args: Any) -> int:
    """`shotstream download`: fetch every repo, then show what `find_weights` finds."""
    root = Path(args.dir)
    try:
        sources = sources_for(args.layout)
        for source in sources:
            fetch(source, root, token=args.token, recheck=args.recheck)
    except DownloadError as exc:
        print(f"shotstream download: error: {exc}", file=sys.stderr)
        return 1
    return report_weights(root, args.preset, skip_files=args.skip_check, prog="download")


# -- check ----------------------------------------------------------------------------------
def report_weights(
    root: Path, preset: str, skip_files: bool = False, prog: str = "check-weights"
) -> int:
    """Print the layout `find_weights` sees and (unless `skip_files`) each file's header check."""
    from model.checkpoints import check_weights
    from model.config import get_preset
    from model.layout import find_weights
    from model.weights import WeightsError

    cfg = get_preset(preset)
    try:
        layout = find_weights(root, cfg)
    except WeightsError as exc:
        print(f"shotstream {prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"weights folder {layout.root} for preset {cfg.name}: {layout.kind} layout")
    if skip_files:
        for name in ("generator", "vae", "text", "tokenizer"):
            if getattr(layout, name) is not None:
                print(f"  {name:<12} {getattr(layout, name)}")
        return 0
    checks = check_weights(cfg, layout)
    for c in checks:
        tensors = f", {c.tensors} tensors" if c.tensors else ""
        print(
            f"  {'ok' if c.ok else 'BAD':<4} {c.component:<12} {c.path} ({human_bytes(c.nbytes)}{tensors})"
        )
        if not c.ok:
            print(f"       {c.error}")
    bad = [c.component for c in checks if not c.ok]
    if bad:
        print(f"shotstream {prog}: error: wrong or damaged: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def run_check_weights(args: Any) -> int:
    """`shotstream check-weights`: name missing or wrong files; with --load, load strictly."""
    import torch

    from model.config import get_preset
    from model.generator import resolve_device, resolve_dtype
    from model.layout import load_weights
    from model.weights import WeightsError

    code = report_weights(Path(args.weights), args.preset)
    if code or not args.load:
        return code
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            load_weights(get_preset(args.preset), args.weights, device, dtype)
    except WeightsError as exc:
        print(f"shotstream check-weights: error: {exc}", file=sys.stderr)
        return 1
    print(f"loaded strictly on {device} ({dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0
