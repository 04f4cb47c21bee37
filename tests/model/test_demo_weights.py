"""Demo weights: a trained folder loads through the normal strict path when no weights
folder is given, with its vocabulary; train-demo resumes to the same weights; and the
shipped folder is complete, small and in the vocabulary users are told about."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import get_preset
from model.generator import load_model
from model.train.dit_train import DiTTrainConfig
from model.train.run import RECIPES, TrainDemoConfig, train_demo
from model.train.vae_train import VAETrainConfig
from model.train.vocab import vocabulary
from model.weights import WeightsError
from tests.model.tiny_weights import write_demo_export

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


def _tiny_run(work: Path, dit_steps: int, resume: bool = False) -> dict[str, torch.Tensor]:
    tc = TrainDemoConfig(
        seed=3,
        vae=VAETrainConfig(steps=1, frame_batch=2, stats_frames=8),
        dit=DiTTrainConfig(steps=dit_steps, batch=1, warmup=30),
        start=DiTTrainConfig(
            steps=1, batch=1, level_weights=(1.0, 0.0, 0.0, 0.0), history_weights=(1.0,)
        ),
        follow=DiTTrainConfig(steps=1, batch=1, fade_min=0.2, whole_shot=True),
        polish=DiTTrainConfig(steps=1, batch=1, whole_shot=True, object_weight=6.0, train_chunks=2),
        carry=DiTTrainConfig(
            steps=1, batch=1, whole_shot=True, object_weight=6.0, train_chunks=2, turn_prob=0.5
        ),
    )
    out = train_demo(work, work / "export", tc, resume=resume)
    return load_file(str(out / "generator.safetensors"))


def test_train_demo_resumed_equals_uninterrupted(tmp_path):
    straight = _tiny_run(tmp_path / "a", dit_steps=2)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "vae_final.pt", tmp_path / "b" / "vae_final.pt")
    stopped = _tiny_run(tmp_path / "b", dit_steps=1, resume=True)  # phase 1 reused
    resumed = _tiny_run(tmp_path / "b", dit_steps=2, resume=True)
    meta = json.loads((tmp_path / "b" / "export" / "training.json").read_text())
    assert meta["resumed"] and meta["dit_started_at_step"] == 1  # from the checkpoint
    assert meta["recipe"] == "custom"  # neither named recipe
    assert any(not torch.equal(stopped[k], resumed[k]) for k in stopped)  # it trained on
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5)


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


def test_train_demo_help_states_the_recipes_step_counts():
    """Each --NAME-steps help says its phase's step count in the quick recipe (the default)
    and in the full one."""
    import argparse
    import re

    from model.train.run import LATER_PHASES
    from server.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train-demo"]
    helps = {a.dest: a.help for a in train._actions}
    assert train.parse_args([]).recipe == "quick"
    quick, full = RECIPES["quick"](), RECIPES["full"]()
    for name in ("vae", "dit", *LATER_PHASES):
        text = helps[f"{name}_steps"]
        stated = re.search(r"\(default (\d+)", text)
        assert stated and int(stated[1]) == getattr(quick, name).steps, name
        stated_full = re.search(r"full (\d+)", text)
        full_steps = int(stated_full[1]) if stated_full else int(stated[1])  # "both recipes"
        assert full_steps == getattr(full, name).steps, name
