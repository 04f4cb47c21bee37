"""The GPU hot-path options, checked on CPU against the plain path: chunks replayed from
static buffers (model/graphs.py, CUDA graphs on a GPU) and one attention call per group of
sessions in step (`CausalDiT.group_rows`). Both must give the plain path's bits."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import get_preset
from model.generator import ShotStreamGenerator, load_model, next_chunks
from model.graphs import chunk_step
from model.steps import ChunkRow


@pytest.fixture(scope="module")
def model():
    cfg = get_preset("tiny").replace(chunks_per_shot=3)
    return load_model(cfg, seed=0)


def _sessions(model, n: int, seed: int = 3):
    pool = StatePool(
        KVLayout.for_config(model.cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    gens = []
    for i in range(n):
        lease = pool.acquire(f"s{i}")
        gens.append(ShotStreamGenerator(model, lease, f"caption {i}", seed=seed + i))
    return pool, gens


def _story(model, n_sessions: int, steps) -> list[torch.Tensor]:
    """Run `steps` (lists of session indices per batched step, or ("shot", i, text))."""
    pool, gens = _sessions(model, n_sessions)
    frames = []
    for step in steps:
        if step[0] == "shot":
            gens[step[1]].start_shot(step[2])
            continue
        for out in next_chunks([gens[i] for i in step]):
            frames.append(out.frames)
    caches = [torch.cat([g.lease.kv.k.flatten(), g.lease.kv.v.flatten()]) for g in gens]
    if model.chunk_graphs is not None:
        assert len(model.chunk_graphs) == DISTINCT_STEPS  # one per step, reused when met again
    for g in gens:
        pool.release(g.lease)
    return frames + caches


STORY = [
    ("shot", 0, "one"), ("shot", 1, "two"), ("shot", 2, "three"),
    [0, 1], [0, 1, 2], [0, 1],  # sessions 0 and 1 in step, 2 behind
    ("shot", 0, "four"), ("shot", 1, "five"),
    [0, 1],  # the first step's caches and chunk indices again: its graph is reused
    [0, 1, 2], [2], ("shot", 2, "six"), [0, 1, 2],
]  # fmt: skip
STEPS, DISTINCT_STEPS = 7, 6


def test_replayed_chunks_equal_plain_chunks(model):
    plain = _story(model, 3, STORY)
    model.use_chunk_graphs()
    try:
        replayed = _story(model, 3, STORY)
    finally:
        model.use_chunk_graphs(False)
    assert sum(1 for s in STORY if s[0] != "shot") == STEPS
    assert len(plain) == len(replayed)
    for a, b in zip(plain, replayed, strict=True):
        assert torch.equal(a, b)


def test_grouped_attention_equals_per_session_attention(model):
    plain = _story(model, 3, STORY)
    model.dit.group_rows = True
    try:
        grouped = _story(model, 3, STORY)
    finally:
        model.dit.group_rows = False
    for a, b in zip(plain, grouped, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=0), (
            (a.float() - b.float()).abs().max()
        )


def test_a_freed_cache_takes_its_graphs_with_it(model):
    model.use_chunk_graphs()
    try:
        pool, (gen,) = _sessions(model, 1)
        gen.start_shot("shot")
        gen.next_chunk()
        gen.next_chunk()
        assert len(model.chunk_graphs) == 2
        pool.release(gen.lease)
        pool.trim()
        del gen, pool
        gc.collect()
        assert len(model.chunk_graphs) == 0
    finally:
        model.use_chunk_graphs(False)


class _HostOps(TorchDispatchMode):
    """Ops that a CUDA graph capture refuses: a tensor made from host data (a copy from
    host memory at every pass) and a read of a tensor's value on the host (a sync)."""

    BAD = ("lift_fresh", "_local_scalar_dense", "item")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(bad in name for bad in self.BAD):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_chunk_step_has_no_host_data_or_host_reads(model):
    """What capture needs beyond no graph breaks (tests/model/test_hot_path.py)."""
    pool, (gen,) = _sessions(model, 1)
    gen.start_shot("shot")
    cfg = model.cfg
    noise = torch.randn(1, cfg.chunk_frames, *cfg.latent_shape)
    renoise = [torch.randn_like(noise) for _ in range(model.schedule.num_steps - 1)]
    row = ChunkRow(gen.lease.kv, 1, gen._gen_flag, gen._caption_row)
    with torch.inference_mode(), _HostOps() as mode:
        chunk_step(model.dit, model.schedule, [row], noise, renoise)
    pool.release(gen.lease)
    assert mode.seen == []
