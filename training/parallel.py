"""Data-parallel DiT phases on one host: `workers` processes share every batch.

A DiT step on a CPU runs its forward and backward on one core while a prefetch thread
renders and encodes the next batch, which left a second core about half idle; a second
torch thread in the same process fights the prefetch thread for it and ends slower. Two
processes of one thread each keep both cores busy (on 2 cores, the quick recipe's
two-chunk and every-chunk steps went from 0.46 and 0.79 s to 0.29 and 0.51 s; the model
card). So a phase with `workers` > 1 runs that many ranks: the calling process is rank 0,
the others are spawned for the phase. Each rank draws its share of the batch (`batch /
workers` stories) from a seed of its own, trains on it with its own prefetch thread, and
the gradients are averaged over gloo before clipping. Every rank then takes the same
optimiser step from the same gradients, so the weights stay identical (checked at the end
of every phase).

Rank 0 draws the first `batch / workers` stories of the single-process batch; rank r > 0
draws from `rank_seed(seed, r)`. A run with workers is as deterministic as one without
(batches keyed by seed, rank and step), but not the same run: its config records the count.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from training.dit_train import DiTTrainConfig, DiTTrainer
from training.render import stable_seed

# a rank waits this long for the others (a step takes about a second, a spawned rank's
# start a few, more on a busy host): a rank that dies ends the phase with an error within
# it at the latest
TIMEOUT_S = 180


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank `rank` draws its stories and noise from (rank 0: the phase's own)."""
    return seed if rank == 0 else stable_seed(seed, rank, "rank")


def rank_config(pc: DiTTrainConfig, workers: int) -> DiTTrainConfig:
    """A rank's share of the phase: `batch / workers` stories a step."""
    if workers < 1 or pc.batch % workers:
        raise ValueError(f"batch {pc.batch} does not split over {workers} workers")
    return replace(pc, batch=pc.batch // workers)


class GradientAverager:
    """One rank's end of the process group: `average` replaces every gradient by its mean
    over the ranks (one flat all-reduce a step)."""

    def __init__(self, store: Path, rank: int, workers: int):
        self.workers = workers
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store.resolve()}",
            rank=rank,
            world_size=workers,
            timeout=timedelta(seconds=TIMEOUT_S),
        )

    def average(self, params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.workers
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p)  # views of one buffer: no copy per parameter

    def check_same(self, params: list[torch.nn.Parameter]) -> None:
        """Raise unless every rank holds rank 0's weights."""
        with torch.no_grad():
            mine = torch.cat([p.detach().reshape(-1) for p in params])
            first = mine.clone()
            dist.broadcast(first, src=0)
            gap = (mine - first).abs().max().reshape(1)
            dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if float(gap) != 0.0:
            raise RuntimeError(f"data-parallel ranks drifted apart (largest gap {float(gap)})")

    def close(self) -> None:
        dist.destroy_process_group()


@dataclass(frozen=True)
class PhaseJob:
    """What a spawned rank needs to train its share of a phase (picklable)."""

    trainer_cls: type[DiTTrainer]
    preset: str
    pc: DiTTrainConfig  # the whole phase's config (not a rank's share)
    seed: int
    workers: int
    start: int
    handoff: str  # torch.save of this job, the networks and the optimiser state at `start`
    store: str
    tokenizer_dir: str


def _rank_main(handoff: str, rank: int) -> None:
    """A spawned rank: the phase's steps from `job.start` on, then the weight check."""
    from model.config import get_preset
    from model.text import load_tokenizer
    from training.run import training_scenes

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    state = torch.load(handoff, weights_only=False)
    job: PhaseJob = state["job"]
    cfg = get_preset(job.preset)
    tokenizer = load_tokenizer(cfg.text, job.tokenizer_dir)
    trainer = job.trainer_cls(
        cfg,
        state["dit"],
        state["text"],
        state["vae"],
        tokenizer,
        training_scenes(),
        rank_config(job.pc, job.workers),
        rank_seed(job.seed, rank),
    )
    if state["opt"] is not None:
        trainer.opt.load_state_dict(state["opt"])
    del state
    averager = GradientAverager(Path(job.store), rank, job.workers)
    trainer.reduce = averager.average
    trainer.dit.train()
    trainer.text.train()
    try:
        for step in range(job.start, job.pc.steps):
            trainer.step(step)
        averager.check_same(trainer.params)
    finally:
        trainer.close()
        averager.close()


class Ranks:
    """Rank 0's side of a data-parallel phase: spawns ranks 1.. for `trainer` (rank 0's own,
    built with `rank_config`) from its current weights and optimiser state, and hooks the
    gradient averaging into it. Use as a context manager around the phase's steps; `finish`
    checks the ranks agree and waits for them."""

    def __init__(self, trainer: DiTTrainer, job: PhaseJob):
        self.trainer, self.job = trainer, job
        self.procs: list[subprocess.Popen] = []
        self.averager: GradientAverager | None = None

    def __enter__(self) -> Ranks:
        job, tr = self.job, self.trainer
        self._clean()
        opt = tr.opt.state_dict() if job.start > 0 else None
        state = {"job": job, "dit": tr.dit, "text": tr.text, "vae": tr.cache.vae, "opt": opt}
        torch.save(state, job.handoff)
        # the ranks import this package from where this process did
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        for rank in range(1, job.workers):
            cmd = [sys.executable, "-m", "training.parallel", job.handoff, str(rank)]
            self.procs.append(subprocess.Popen(cmd, env=env))
        try:
            self.averager = GradientAverager(Path(job.store), 0, job.workers)
        except Exception as exc:  # a rank that never joined: say how it ended
            self._stop(wait=True)
            self._clean()
            raise RuntimeError(self._ranks_state()) from exc
        tr.reduce = self.averager.average
        return self

    def _stop(self, wait: bool) -> None:
        """End the spawned ranks: wait for them (up to TIMEOUT_S) or stop them at once."""
        for proc in self.procs:
            if wait:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(TIMEOUT_S)
            if proc.poll() is None:
                proc.terminate()
            proc.wait()

    def _clean(self) -> None:
        for path in (self.job.handoff, self.job.store):
            Path(path).unlink(missing_ok=True)

    def _ranks_state(self) -> str:
        codes = [p.poll() for p in self.procs]
        return f"data-parallel ranks 1..{self.job.workers - 1}: exit codes {codes} (None: running)"

    def finish(self) -> None:
        """Check every rank holds rank 0's weights, then wait for the ranks to end."""
        self.averager.check_same(self.trainer.params)
        for proc in self.procs:
            if proc.wait(TIMEOUT_S) != 0:
                raise RuntimeError(self._ranks_state())

    def __exit__(self, kind, exc, tb) -> None:
        self.trainer.reduce = None
        failed = kind is not None
        self._stop(wait=not failed)
        self.averager.close()
        self._clean()
        if failed and any(p.returncode not in (0, -15) for p in self.procs):
            raise RuntimeError(self._ranks_state()) from exc


if __name__ == "__main__":  # a spawned rank: python -m training.parallel HANDOFF RANK
    _rank_main(sys.argv[1], int(sys.argv[2]))
