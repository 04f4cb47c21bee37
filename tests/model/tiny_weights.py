"""Write a real weights folder for a small preset, in either published layout (for tests).

The files are what the real releases hold, with the preset's sizes: the ShotStream
checkpoint `{"generator": {"model.<key>": ...}}`, and the Wan2.1 VAE and umT5 encoder as
the original `.pth` state dicts or as Diffusers `save_pretrained` folders. Or, for the
demo preset, the folder `train-demo` exports (`write_demo_export`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import text as text_mod
from model import vae as vae_mod
from model.config import ModelConfig
from model.dit import build_dit
from model.text import build_umt5, original_t5_key_map
from model.vae import WanVAE, build_autoencoder, original_vae_key
from model.weights import GENERATOR_PREFIX
from training.run import export_weights

GENERATOR = Path("ShotStream") / "shotstream_merged.pt"
WAN_FOLDER = {"original": "Wan2.1-T2V-1.3B", "diffusers": "Wan2.1-T2V-1.3B-Diffusers"}


def random_modules(cfg: ModelConfig, seed: int = 0):
    """Generator, VAE and text encoder with reproducible random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_dit(cfg), build_autoencoder(cfg), build_umt5(cfg.text)


def write_weights(root: Path, cfg: ModelConfig, layout: str, seed: int = 0) -> Path:
    """Write the three components of `cfg` under `root` in `layout`; returns `root`."""
    dit, vae, t5 = random_modules(cfg, seed)
    (root / GENERATOR).parent.mkdir(parents=True, exist_ok=True)
    sd = {GENERATOR_PREFIX + k: v for k, v in dit.state_dict().items()}
    torch.save({"generator": sd}, root / GENERATOR)
    base = root / WAN_FOLDER[layout]
    base.mkdir(parents=True, exist_ok=True)
    if layout == "original":
        nrb = cfg.vae.num_res_blocks
        vae_sd = {original_vae_key(k, nrb): v for k, v in vae.state_dict().items()}
        torch.save(vae_sd, base / vae_mod.ORIGINAL_FILE)
        hf = t5.state_dict()
        t5_sd = {o: hf[t[0]].clone() for o, t in original_t5_key_map(cfg.text.num_layers).items()}
        torch.save(t5_sd, base / text_mod.ORIGINAL_FILE)
    else:
        vae.save_pretrained(base / vae_mod.DIFFUSERS_SUBFOLDER)
        t5.save_pretrained(base / text_mod.HF_SUBFOLDER)
    return root


def write_demo_export(folder: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A weights folder exactly as `train-demo` exports it (vocabulary included), random
    values; returns it."""
    dit, vae, t5 = random_modules(cfg, seed)
    return export_weights(folder, cfg, dit, t5, WanVAE(vae, cfg), {"test": True})
