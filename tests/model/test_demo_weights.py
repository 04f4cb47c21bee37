"""Demo weights: a trained folder loads through the normal strict path when no weights
folder is given, with its vocabulary; and the shipped folder is complete, small, made by
train-demo's full recipe and in the vocabulary users are told about."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

from model.config import get_preset
from model.generator import load_model
from model.weights import WeightsError
from tests.model.tiny_weights import write_demo_export
from training.run import RECIPES
from training.vocab import vocabulary

DEMO = get_preset("demo")
SHIPPED = DEMO.bundled_weights_dir


def test_load_model_without_weights_loads_the_bundled_folder(tmp_path):
    folder = write_demo_export(tmp_path / "bundled", DEMO)
    cfg = replace(DEMO, bundled_weights=str(folder))  # absolute: used as is
    model = load_model(cfg, device="cpu")
    assert model.real_weights and model.weights == str(folder)
    assert model.vocabulary == vocabulary()
    saved = load_file(str(folder / "generator.safetensors"))
    for k, v in model.dit.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_missing_bundled_weights_name_the_command_that_makes_them(tmp_path):
    cfg = replace(DEMO, bundled_weights=str(tmp_path / "nothing"))
    with pytest.raises(WeightsError, match="train-demo"):
        load_model(cfg, device="cpu")


def test_a_bundled_folder_missing_a_component_is_refused(tmp_path):
    folder = write_demo_export(tmp_path / "bundled", DEMO)
    shutil.rmtree(folder / "vae")
    with pytest.raises(WeightsError, match="vae"):
        load_model(replace(DEMO, bundled_weights=str(folder)), device="cpu")


@pytest.mark.skipif(SHIPPED is None or not SHIPPED.is_dir(), reason="no shipped demo weights")
def test_shipped_demo_weights_are_complete_small_and_in_the_vocabulary():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    assert {p.relative_to(SHIPPED).as_posix() for p in tensors} == {
        "generator.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    assert sum(p.stat().st_size for p in tensors) <= 25 * 2**20
    assert (SHIPPED / "README.md").is_file() or (SHIPPED / "MODEL_CARD.md").is_file()
    assert json.loads((SHIPPED / "vocabulary.json").read_text()) == vocabulary()
    # the recipe that made them is train-demo's full one, seed 0
    meta = json.loads((SHIPPED / "training.json").read_text())
    assert meta["config"] == json.loads(json.dumps(asdict(RECIPES["full"](seed=0))))
    model = load_model(DEMO, device="cpu")  # strict: every key and shape checked
    assert model.real_weights and model.vocabulary == vocabulary()
