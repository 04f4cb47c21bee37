"""Where the weights live in a `--weights DIR`, checked up front, and loading them all.

Both published layouts are accepted, detected from the files present:

    DIR/shotstream_merged.pt                 ShotStream generator ({"generator": ...})
       (or DIR/ShotStream/…, or DIR/generator.safetensors)
    DIR/Wan2.1-T2V-1.3B/                     original Wan2.1 layout (or these files in DIR)
        Wan2.1_VAE.pth
        models_t5_umt5-xxl-enc-bf16.pth
        google/umt5-xxl/                     tokenizer
    DIR/Wan2.1-T2V-1.3B-Diffusers/           Diffusers layout (or these folders in DIR)
        vae/  text_encoder/  tokenizer/

A preset whose tokenizer needs no files (byt5) needs no tokenizer folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model import text as text_mod
from model import vae as vae_mod
from model.config import ModelConfig
from model.dit import CausalDiT
from model.text import TextEncoder, load_text_encoder
from model.vae import WanVAE, load_vae
from model.weights import WeightsError, load_generator

GENERATOR_FILES = (
    "shotstream_merged.pt",
    "ShotStream/shotstream_merged.pt",
    "shotstream/shotstream_merged.pt",
    "generator.safetensors",
)
WAN_FOLDERS = (".", "Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B-Diffusers")


@dataclass(frozen=True)
class WeightsLayout:
    """Paths of each component found in a weights folder."""

    root: Path
    generator: Path
    vae: Path
    text: Path
    tokenizer: Path | None
    kind: str  # "original" or "diffusers" (of the VAE / text encoder files)


def find_weights(root: str | Path, cfg: ModelConfig) -> WeightsLayout:
    """Locate every file a preset needs under `root`; one error naming all that is missing."""
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"weights folder not found: {root}")
    generator = next((root / f for f in GENERATOR_FILES if (root / f).is_file()), None)
    vae = text = tokenizer = None
    kind = ""
    for sub in WAN_FOLDERS:
        base = root / sub
        if (base / vae_mod.ORIGINAL_FILE).is_file() or (base / text_mod.ORIGINAL_FILE).is_file():
            vae = base / vae_mod.ORIGINAL_FILE
            text = base / text_mod.ORIGINAL_FILE
            tokenizer = base / text_mod.ORIGINAL_TOKENIZER_DIR
            kind = "original"
            break
        if (base / vae_mod.DIFFUSERS_SUBFOLDER).is_dir() or (base / text_mod.HF_SUBFOLDER).is_dir():
            vae = base / vae_mod.DIFFUSERS_SUBFOLDER
            text = base / text_mod.HF_SUBFOLDER
            tokenizer = base / text_mod.HF_TOKENIZER_SUBFOLDER
            kind = "diffusers"
            break
    missing = []
    if generator is None:
        missing.append(f"the ShotStream generator ({' or '.join(GENERATOR_FILES)})")
    if vae is None:
        missing.append(
            f"the Wan2.1 VAE and text encoder ({vae_mod.ORIGINAL_FILE} + {text_mod.ORIGINAL_FILE}, "
            f"or {vae_mod.DIFFUSERS_SUBFOLDER}/ + {text_mod.HF_SUBFOLDER}/, in one of {', '.join(WAN_FOLDERS)})"
        )
    else:
        if not (vae.is_file() or (vae / "config.json").is_file()):
            missing.append(str(vae) + ("" if kind == "original" else "/config.json"))
        if not (text.is_file() or (text / "config.json").is_file()):
            missing.append(str(text) + ("" if kind == "original" else "/config.json"))
        if cfg.text.tokenizer == "umt5" and not (
            (tokenizer / "tokenizer.json").is_file()
            or (tokenizer / "tokenizer_config.json").is_file()
        ):
            missing.append(f"{tokenizer}/ (the umt5 tokenizer files)")
    if missing:
        raise WeightsError(f"{root}: missing " + "; ".join(missing))
    return WeightsLayout(
        root, generator, vae, text, tokenizer if cfg.text.tokenizer == "umt5" else None, kind
    )


def load_weights(
    cfg: ModelConfig,
    root: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    prompt_overflow: str = "truncate",
) -> tuple[CausalDiT, WanVAE, TextEncoder]:
    """Load generator, VAE and text encoder strictly from a weights folder."""
    layout = find_weights(root, cfg)
    dit = load_generator(cfg, layout.generator, device, dtype)
    vae = load_vae(cfg, layout.vae, device, dtype)
    text = load_text_encoder(
        cfg, layout.text, layout.tokenizer, device, dtype, policy=prompt_overflow
    )
    return dit, vae, text


VOCABULARY_FILE = "vocabulary.json"  # beside trained demo weights: the prompts they learned


def read_vocabulary(root: str | Path) -> dict | None:
    """The prompt vocabulary a weights folder was trained on (`vocabulary.json`), if any."""
    path = Path(root) / VOCABULARY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
