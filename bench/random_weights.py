"""Any preset with random weights, for speed measurements (speed does not depend on values).

The real presets refuse to run without weights, and the real umT5 tokenizer ships with them.
`random_preset` returns a preset that runs without either: random weights allowed, and
transformers' ByT5 tokenizer (no files, the same special ids, ids inside umT5's vocabulary)
in place of umT5's. The text encoder still runs at its full `text_len`, so its cost is the
real one.

    python -m bench.random_weights serve --preset wan2.1-1.3b --device cuda

runs `shotstream` with those presets registered and the networks initialised on the target
device (umT5-xxl initialised on a host takes minutes), for `bench.serve --random-weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

from model import config as model_config
from model.config import ModelConfig, get_preset


def random_preset(name: str) -> ModelConfig:
    """`name`'s preset, runnable without a weights folder (a bundled one still loads, with
    the tokenizer it ships: the demo's word-level one has ids only for its own 96 words)."""
    cfg = get_preset(name)
    text = cfg.text
    if text.tokenizer == "umt5" and not cfg.bundled_weights:
        text = dataclasses.replace(text, tokenizer="byt5")
    return cfg.replace(random_weights_ok=True, text=text)


def install() -> None:
    """Register the random-weight presets under their own names and make `load_model`
    initialise random networks on the device it loads them onto."""
    import model.generator as generator

    for name in list(model_config.PRESETS):
        model_config.PRESETS[name] = random_preset(name)
    original = generator.load_model
    if getattr(original, "_on_device", False):
        return

    def load_model(cfg, weights=None, device="auto", *args, **kwargs):
        dev = generator.resolve_device(device)
        ctx = torch.device(dev) if weights is None else contextlib.nullcontext()
        with ctx:
            return original(cfg, weights, device, *args, **kwargs)

    load_model._on_device = True  # type: ignore[attr-defined]
    generator.load_model = load_model


def main() -> int:
    install()  # before server modules bind `load_model`
    from server.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
