"""Data-parallel DiT phases (training/parallel.py): two real processes over gloo keep one set
of weights (checked at the end of every phase), a run is a function of its seed and worker
count, a resumed run ends where an uninterrupted one does, a rank that dies ends the phase
with an error that says so, and a batch that does not split is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import get_preset
from model.text import build_umt5, load_tokenizer
from model.vae import WanVAE, build_autoencoder
from training import parallel
from training.dit_train import DiTTrainConfig
from training.parallel import PhaseJob, Ranks, rank_config, rank_seed
from training.run import _run_phase, init_dit, training_scenes
from training.start_train import StartTrainer
from training.tokenizer import save_tokenizer
from training.vae_train import init_vae

CFG = get_preset("demo")
PHASE = DiTTrainConfig(
    steps=2,
    batch=2,
    lr=1e-3,
    warmup=1,
    whole_shot=True,
    train_chunks=2,
    object_weight=6.0,
    layout="crossing",
)


def _networks():
    torch.manual_seed(0)
    model = build_autoencoder(CFG.vae)
    init_vae(model)
    return init_dit(CFG, 0), build_umt5(CFG.text), WanVAE(model, CFG)


def _trainer(work, workers: int, pc: DiTTrainConfig = PHASE) -> StartTrainer:
    dit, text, vae = _networks()
    tok = load_tokenizer(CFG.text, save_tokenizer(work / "tokenizer"))
    scenes = training_scenes()
    return StartTrainer(CFG, dit, text, vae, tok, scenes, rank_config(pc, workers), seed=4)


def _phase(work, workers: int, resume: bool = False, pc: DiTTrainConfig = PHASE) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    trainer = _trainer(work, workers, pc)
    _run_phase("cross", trainer, work, 1e9, resume, workers)
    assert not list(work.glob(".cross.*"))  # the handoff and the store are cleaned up
    return {k: v.clone() for k, v in trainer.dit.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_two_workers_train_one_set_of_weights_deterministically_and_resume(tmp_path):
    start = {k: v.clone() for k, v in _networks()[0].state_dict().items()}
    two = _phase(tmp_path / "a", 2)  # the ranks' weights are compared at the phase's end
    assert not _same(two, start)
    assert _same(_phase(tmp_path / "b", 2), two)  # a function of seed, step and ranks
    assert not _same(_phase(tmp_path / "c", 1), two)  # rank 1 drew stories of its own
    # stopped after one step (its checkpoint holds the optimiser state), then resumed
    _phase(tmp_path / "d", 2, pc=replace(PHASE, steps=1))
    resumed = _phase(tmp_path / "d", 2, resume=True)
    for k in two:
        torch.testing.assert_close(resumed[k], two[k], rtol=1e-4, atol=1e-5)


def test_rank_zero_draws_the_first_share_of_the_one_process_batch(tmp_path):
    whole = _trainer(tmp_path, 1, replace(PHASE, batch=4))
    share = _trainer(tmp_path, 2, replace(PHASE, batch=4))
    try:
        assert share.tc.batch == 2
        assert share.examples(7) == whole.examples(7)[:2]
        assert rank_seed(4, 0) == 4 and rank_seed(4, 1) not in (4, rank_seed(4, 2))
    finally:
        whole.close()
        share.close()


def test_a_rank_that_dies_ends_the_phase_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "TIMEOUT_S", 5)
    trainer = _trainer(tmp_path, 2)
    job = PhaseJob(
        StartTrainer,
        "no-such-preset",  # the spawned rank cannot build its model and exits
        PHASE,
        4,
        2,
        0,
        str(tmp_path / ".cross.handoff"),
        str(tmp_path / ".cross.store"),
        str(tmp_path / "tokenizer"),
    )
    try:
        with pytest.raises(RuntimeError, match=r"exit codes \[1\]"), Ranks(trainer, job):
            trainer.step(0)
    finally:
        trainer.close()
    assert trainer.reduce is None


def test_a_batch_that_does_not_split_over_the_workers_is_refused():
    assert rank_config(PHASE, 2).batch == 1
    with pytest.raises(ValueError, match="does not split"):
        rank_config(replace(PHASE, batch=3), 2)
    with pytest.raises(ValueError, match="does not split"):
        rank_config(PHASE, 0)
