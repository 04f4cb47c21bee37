"""Strict loading of generator weights from the published checkpoint layouts
(docs/design/generator.md §2).

Accepted files:
- the ShotStream checkpoint: `torch.save({"generator": state_dict})` with every key
  prefixed `model.` (`shotstream_merged.pt`);
- a safetensors file with the same keys, with or without the `model.` prefix (the
  Wan2.1 `diffusion_pytorch_model` layout has none).

Every missing, unexpected or mis-shaped key is an error that names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.config import ModelConfig
from model.dit import CausalDiT, build_dit

GENERATOR_PREFIX = "model."


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, of the wrong kind or the wrong shape."""


def read_generator_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a generator state dict (keys without the `model.` prefix) from `path`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"generator weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise WeightsError(
                f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(obj, Mapping) or "generator" not in obj:
            keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(
                f"{path}: expected a ShotStream checkpoint with a 'generator' entry, found {keys}"
            )
        sd = dict(obj["generator"])
    return strip_prefix(sd, GENERATOR_PREFIX, where=str(path))


def strip_prefix(
    sd: Mapping[str, torch.Tensor], prefix: str, where: str
) -> dict[str, torch.Tensor]:
    """Remove `prefix` from every key; all keys or none must carry it."""
    has = [k.startswith(prefix) for k in sd]
    if all(has):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    if not any(has):
        return dict(sd)
    odd = next(k for k, h in zip(sd, has, strict=True) if not h)
    raise WeightsError(f"{where}: some keys carry the prefix {prefix!r} and some not, e.g. {odd!r}")


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]], got: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise a WeightsError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k])
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:10]) + (
                f", ... ({len(items)} in all)" if len(items) > 10 else ""
            )
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))


def expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def load_dit_state(
    cfg: ModelConfig,
    sd: Mapping[str, torch.Tensor],
    device="cpu",
    dtype=torch.float32,
    what: str = "generator",
) -> CausalDiT:
    """Build the DiT for `cfg` without allocating random weights and load `sd` strictly."""
    model = build_dit(cfg, meta=True)
    check_state_dict(expected_shapes(model), sd, what)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.reset_rope(device)
    return model.eval().requires_grad_(False)


def load_generator(
    cfg: ModelConfig, path: str | Path, device="cpu", dtype=torch.float32
) -> CausalDiT:
    """Load the causal DiT from a ShotStream checkpoint (.pt) or a safetensors file."""
    return load_dit_state(cfg, read_generator_file(path), device, dtype, what=str(path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .pth/.pt (torch.save) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path}: expected a flat state dict of tensors, found {type(obj).__name__}"
        )
    return dict(obj)


def safetensors_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in the folder's safetensors files (headers only)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors files")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        except Exception as exc:
            raise WeightsError(f"{f}: not a readable safetensors file ({exc})") from exc
    return shapes
