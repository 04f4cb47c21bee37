"""eval-demo's VAE round trip: what the decoder draws from exact latents, the ceiling of every
generator figure. On the shipped weights the decoder keeps the probe's reading of shapes,
framing and motion (the sharpen phase's purpose); random weights keep none of it."""

from __future__ import annotations

from model.config import get_preset
from model.generator import load_model
from training.evaluate import random_demo_model, round_trip

DEMO = get_preset("demo")


def test_the_shipped_decoder_draws_what_the_probe_reads_from_exact_latents():
    out = round_trip(load_model(DEMO, device="cpu"), every=9)  # 30 shots of held-out scenes
    assert out["chunks"] == 30 * 4  # read in the generator's four chunks per shot
    assert out["color_adherence"] == 1.0
    assert out["framing_adherence"] == 1.0
    assert out["shape_adherence"] >= 0.95  # before the sharpen phase: 0.66
    assert out["motion_adherence"] >= 0.9


def test_a_random_decoder_keeps_nothing():
    out = round_trip(random_demo_model(DEMO, seed=0), every=27)
    assert out["chunks"] == 10 * 4
    assert out["color_adherence"] < 0.2 and out["shape_adherence"] < 0.5
