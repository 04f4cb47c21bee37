"""train-demo: a run stopped and resumed ends at the same weights as one never stopped (all
sixteen phases, the last in two rounds), a run can start from a weights folder instead of
phases 1 to 6, the DiT phase after the decoder phases keeps their checkpoints, the last
phase's rounds draw stories of their own and a later round keeps the earlier ones', and its
help states each phase's step count in both recipes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.decoder_train import DecoderTrainConfig
from training.dit_train import DiTTrainConfig
from training.run import RECIPES, TrainDemoConfig, extra_rounds, train_demo
from training.vae_train import VAETrainConfig


def _tiny_config(dit_steps: int) -> TrainDemoConfig:
    centred = DiTTrainConfig(
        steps=1, batch=1, whole_shot=True, object_weight=6.0, train_chunks=2, layout="centred"
    )
    return TrainDemoConfig(
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
        centre=centred,
        settle=centred,
        motion=DiTTrainConfig(
            steps=1,
            batch=1,
            whole_shot=True,
            train_chunks=2,
            layout="centred",
            motion_weight=1.0,
            freeze_prob=0.25,
            data_seed=1,
        ),
        decoder=DecoderTrainConfig(steps=2, stories=1, frame_batch=4),
        sharpen=DecoderTrainConfig(steps=2, stories=0, frame_batch=4, real_share=1.0, data_seed=7),
        refine=replace(centred, lr=3e-4),
        fresh=replace(centred, lr=3e-4, data_seed=5),
        cross=replace(centred, lr=3e-4, layout="crossing", data_seed=6),
        extend=replace(centred, lr=3e-4, layout="crossing", data_seed=8),
        extra=replace(centred, lr=3e-4, layout="crossing", data_seed=9),
        extra_rounds=2,
        whole=replace(centred, lr=3e-4, layout="crossing", data_seed=16, train_chunks=0),
        workers=1,  # two: tests/training/test_parallel.py
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(str(out / "generator.safetensors")),
        **{
            f"vae.{k}": v
            for k, v in load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors")).items()
        },
    }


def _tiny_run(work: Path, dit_steps: int, resume: bool = False) -> dict[str, torch.Tensor]:
    return _weights(train_demo(work, work / "export", _tiny_config(dit_steps), resume=resume))


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


def test_train_demo_can_start_from_a_weights_folder(tmp_path):
    """start_from stands for phases 1 to 6: the centred phases and the decoder phases continue
    from the folder's weights; the decoder phases change the decoder only."""
    first = train_demo(tmp_path / "a", tmp_path / "a" / "export", _tiny_config(1))
    before = _weights(first)
    out = train_demo(tmp_path / "b", tmp_path / "b" / "export", _tiny_config(1), start_from=first)
    meta = json.loads((out / "training.json").read_text())
    assert meta["started_from"] == str(first)
    # phases 1 to 6 skipped
    assert set(meta["seconds"]) == {
        "centre",
        "settle",
        "motion",
        "decoder",
        "sharpen",
        "refine",
        "fresh",
        "cross",
        "extend",
        "extra",
        "extra2",
        "whole",
    }
    after = _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(not k.startswith("vae.") for k in changed)  # the centred phases trained the DiT
    assert any(k.startswith("vae.decoder.") for k in changed)  # the decoder phases its decoder
    assert all(
        k.startswith("vae.decoder.") or k.startswith("vae.post_quant_conv.")
        for k in changed
        if k.startswith("vae.")
    )  # and nothing else of the VAE: the latents the DiT learned are the same


def test_the_last_dit_phase_keeps_the_decoder_phases(tmp_path):
    """Phase 12 trains the DiT after the decoder phases: run longer with --resume, it trains
    on from its checkpoint and keeps the decoder phases' (a marked sharpen checkpoint is what
    the export's VAE holds), while a DiT phase before the decoder phases that trains again
    discards them (the mark is gone)."""
    tc = _tiny_config(1)
    first = _weights(train_demo(tmp_path, tmp_path / "export", tc))
    key = "decoder.conv_out.bias"
    sharpen = torch.load(tmp_path / "sharpen.pt", weights_only=False)
    sharpen["model"][key] += 0.5  # a mark only a kept checkpoint carries into the export
    torch.save(sharpen, tmp_path / "sharpen.pt")
    marked = sharpen["model"][key].clone()

    longer = replace(tc, refine=replace(tc.refine, steps=2))
    out = train_demo(tmp_path, tmp_path / "export", longer, resume=True)
    after = _weights(out)
    meta = json.loads((out / "training.json").read_text())
    assert meta["config"]["refine"]["steps"] == 2
    assert torch.load(tmp_path / "refine.pt", weights_only=False)["step"] == 2
    assert torch.equal(after[f"vae.{key}"], marked)  # the sharpen checkpoint was kept
    assert any(not torch.equal(first[k], after[k]) for k in first if not k.startswith("vae."))

    motion_longer = replace(longer, motion=replace(longer.motion, steps=2))
    again = _weights(train_demo(tmp_path, tmp_path / "export", motion_longer, resume=True))
    assert not torch.equal(again[f"vae.{key}"], marked)  # the decoder phases trained anew


def test_train_demo_help_states_the_recipes_step_counts():
    """Each --NAME-steps help says its phase's step count in the quick recipe (the default)
    and in the full one."""
    import argparse
    import re

    from server.cli import build_parser
    from training.run import PHASE_ORDER

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train-demo"]
    helps = {a.dest: a.help for a in train._actions}
    assert train.parse_args([]).recipe == "quick"
    quick, full = RECIPES["quick"](), RECIPES["full"]()
    stated_counts = {}
    for name in ("vae", "dit", *PHASE_ORDER):
        stated_counts[f"{name}_steps"] = (getattr(quick, name).steps, getattr(full, name).steps)
    stated_counts["extra_rounds"] = (quick.extra_rounds, full.extra_rounds)
    for dest, (in_quick, in_full) in stated_counts.items():
        text = helps[dest]
        stated = re.search(r"\(default (\d+)", text)
        assert stated and int(stated[1]) == in_quick, dest
        stated_full = re.search(r"full (\d+)", text)
        full_count = int(stated_full[1]) if stated_full else int(stated[1])  # "both recipes"
        assert full_count == in_full, dest


def test_phase_16_runs_in_rounds_on_stories_of_their_own(tmp_path):
    """Round k of phase 16 draws the stories of data_seed + k - 1 (its own batches); a run
    with one more round trains that round and phase 17 after it only, from the checkpoints
    of the others, and a round that trains again discards the rounds and phase after it."""
    tc = _tiny_config(1)
    assert [(name, pc.data_seed) for name, pc in extra_rounds(tc)] == [("extra", 9), ("extra2", 10)]
    assert {pc.steps for _, pc in extra_rounds(tc)} == {tc.extra.steps}
    full = RECIPES["full"]()
    seeds = [pc.data_seed for _, pc in extra_rounds(full)]
    assert len(seeds) == full.extra_rounds and len(set(seeds)) == len(seeds)
    others = ("refine", "fresh", "cross", "extend", "whole")
    earlier = {getattr(full, name).data_seed for name in others}
    assert not earlier & set(seeds)  # stories none of the DiT phases after the decoder drew
    assert full.whole.train_chunks == 0 and full.extra.train_chunks == 2

    first = _weights(train_demo(tmp_path, tmp_path / "export", tc))
    second_round = torch.load(tmp_path / "extra2.pt", weights_only=False)
    whole_before = torch.load(tmp_path / "whole.pt", weights_only=False)
    three = replace(tc, extra_rounds=3)
    out = train_demo(tmp_path, tmp_path / "export", three, resume=True)
    meta = json.loads((out / "training.json").read_text())
    assert meta["config"]["extra_rounds"] == 3 and "extra3" in meta["seconds"]
    kept = torch.load(tmp_path / "extra2.pt", weights_only=False)
    assert all(torch.equal(kept["dit"][k], second_round["dit"][k]) for k in kept["dit"])
    # phase 17 trained again, from the third round's weights
    whole_after = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert any(not torch.equal(whole_after["dit"][k], v) for k, v in whole_before["dit"].items())
    after = _weights(out)
    assert any(not torch.equal(first[k], after[k]) for k in first if not k.startswith("vae."))

    longer = replace(three, extra=replace(three.extra, steps=2))  # round 1 trains again
    train_demo(tmp_path, tmp_path / "export", replace(longer, extra_rounds=1), resume=True)
    assert (tmp_path / "extra.pt").is_file()
    assert not (tmp_path / "extra2.pt").exists() and not (tmp_path / "extra3.pt").exists()
    anew = torch.load(tmp_path / "whole.pt", weights_only=False)  # trained anew
    assert any(not torch.equal(anew["dit"][k], v) for k, v in whole_after["dit"].items())

    # phase 17 trained longer keeps every round
    rounds = {p.name for p in tmp_path.glob("extra*.pt")}
    once = replace(longer, extra_rounds=1)
    train_demo(
        tmp_path,
        tmp_path / "export",
        replace(once, whole=replace(once.whole, steps=2)),
        resume=True,
    )
    assert {p.name for p in tmp_path.glob("extra*.pt")} == rounds
    assert torch.load(tmp_path / "whole.pt", weights_only=False)["step"] == 2
