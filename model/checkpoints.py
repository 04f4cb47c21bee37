"""Check each file of a weights folder from its headers: key names, shapes and configs,
without reading tensor data (`.pth` files are memory-mapped, safetensors read by header).

A wrong, truncated or mismatched file is named in seconds, before a multi-GB strict load.
`shotstream check-weights` prints these checks; `model.layout.load_weights` still loads
strictly afterwards, so nothing here is a substitute for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.dit import build_dit
from model.layout import WeightsLayout
from model.text import _check_hf_config, build_umt5, load_tokenizer, original_t5_shapes
from model.vae import _check_diffusers_config, build_autoencoder, original_vae_shapes
from model.weights import (
    GENERATOR_PREFIX,
    WeightsError,
    check_state_dict,
    expected_shapes,
    read_generator_file,
    read_state_dict,
    safetensors_shapes,
    strip_prefix,
)

_TIED = ("shared.weight", "encoder.embed_tokens.weight")


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one component's file or folder."""

    component: str  # "generator", "vae", "text encoder" or "tokenizer"
    path: Path
    nbytes: int
    tensors: int  # tensors found (0 for the tokenizer)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_weights(cfg: ModelConfig, layout: WeightsLayout) -> list[FileCheck]:
    """One check per component of `layout` (from `find_weights`), every problem named."""
    checks = [
        _run("generator", layout.generator, lambda: _check_generator(cfg, layout.generator)),
        _run("vae", layout.vae, lambda: _check_vae(cfg, layout.vae)),
        _run("text encoder", layout.text, lambda: _check_text(cfg, layout.text)),
    ]
    if layout.tokenizer is not None:
        tok = layout.tokenizer
        checks.append(_run("tokenizer", tok, lambda: _check_tokenizer(cfg, tok)))
    return checks


def _run(component: str, path: Path, check) -> FileCheck:
    size = (
        path.stat().st_size
        if path.is_file()
        else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    )
    try:
        return FileCheck(component, path, size, check())
    except WeightsError as exc:
        return FileCheck(component, path, size, 0, str(exc))


# -- one function per component: each returns the tensor count or raises WeightsError --------
def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as sf:
            return {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}  # noqa: SIM118
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def _check_generator(cfg: ModelConfig, path: Path) -> int:
    if path.suffix == ".safetensors":  # header only: a generator file is GBs
        got = strip_prefix(_meta(_header_shapes(path)), GENERATOR_PREFIX, where=str(path))
    else:
        got = read_generator_file(path)  # torch.load with mmap: no tensor data is read
    check_state_dict(expected_shapes(build_dit(cfg, meta=True)), got, str(path))
    return len(got)


def _read_config(folder: Path) -> dict:
    config = folder / "config.json"
    try:
        return json.loads(config.read_text())
    except OSError as exc:
        raise WeightsError(f"{config}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{config}: not valid JSON ({exc})") from exc


def _check_shards(folder: Path) -> None:
    """Name the shards a sharded checkpoint's index lists but the folder lacks."""
    for index in folder.glob("*.safetensors.index.json"):
        try:
            files = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            raise WeightsError(f"{index}: not a readable shard index ({exc})") from exc
        missing = sorted(f for f in files if not (folder / f).is_file())
        if missing:
            raise WeightsError(
                f"{folder}: missing shards {', '.join(missing)} (listed in {index.name})"
            )


def _check_vae(cfg: ModelConfig, path: Path) -> int:
    if path.is_file():
        sd = read_state_dict(path)
        check_state_dict(original_vae_shapes(cfg), sd, str(path))
        return len(sd)
    _check_diffusers_config(cfg.vae, _read_config(path), str(path / "config.json"))
    _check_shards(path)
    got = safetensors_shapes(path)
    expected = expected_shapes(build_autoencoder(cfg, meta=True))  # type: ignore[arg-type]
    check_state_dict(expected, _meta(got), str(path))
    return len(got)


def _check_text(cfg: ModelConfig, path: Path) -> int:
    if path.is_file():
        sd = read_state_dict(path)
        check_state_dict(original_t5_shapes(cfg.text), sd, str(path))
        return len(sd)
    _check_hf_config(cfg.text, _read_config(path), str(path / "config.json"))
    _check_shards(path)
    got = safetensors_shapes(path)
    n = len(got)
    for a, b in (_TIED, _TIED[::-1]):  # the embedding is tied: a file may hold either name
        if a in got and b not in got:
            got[b] = got[a]
    check_state_dict(expected_shapes(build_umt5(cfg.text, meta=True)), _meta(got), str(path))
    return n


def _check_tokenizer(cfg: ModelConfig, path: Path) -> int:
    try:
        load_tokenizer(cfg.text, path)  # small (a few MB): loading is the real check
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(
            f"{path}: tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from exc
    return 0
