"""train-demo: a run stopped and resumed ends at the same weights as one never stopped, and
its help states each phase's step count in both recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.dit_train import DiTTrainConfig
from training.run import RECIPES, TrainDemoConfig, train_demo
from training.vae_train import VAETrainConfig


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


def test_train_demo_help_states_the_recipes_step_counts():
    """Each --NAME-steps help says its phase's step count in the quick recipe (the default)
    and in the full one."""
    import argparse
    import re

    from server.cli import build_parser
    from training.run import LATER_PHASES

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
