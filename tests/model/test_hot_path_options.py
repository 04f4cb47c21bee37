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
    ("shot", 0, "one"),
    ("shot", 1, "two"),
    ("shot", 2, "three"),
    [0, 1],
    [0, 1, 2],
    [0, 1],  # sessions 0 and 1 in step, 2 behind
    ("shot", 0, "four"),
    ("shot", 1, "five"),
    [0, 1],  # the first step's caches and chunk indices again: its graph is reused
    [0, 1, 2],
    [2],
    ("shot", 2, "six"),
    [0, 1, 2],
]
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


def test_fp8_linear_is_the_dequantized_product():
    """The scales are wired right: the FP8 layer equals a float64 product of its own
    dequantized operands, and stays near the float32 layer (e4m3 keeps 3 mantissa bits)."""
    from model.fp8 import Float8Linear, _quantize_rows

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 37, 64) * torch.logspace(-2, 1, 64)  # channels of very unequal size
    fp8 = Float8Linear(lin)
    got = fp8(x)
    xq, xs = _quantize_rows(x.reshape(-1, 64))
    w = fp8.weight.double() * fp8.weight_scale.double().t()
    ref = ((xq.double() * xs.double()) @ w.t() + lin.bias.double()).reshape(2, 37, 48)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    exact = lin(x)
    assert 0 < ((got - exact).norm() / exact.norm()).item() < 0.1


def test_fp8_dit_runs_a_chunk_near_float32():
    from model.config import get_preset
    from model.dit import build_dit
    from model.fp8 import Float8Linear, quantize_dit_linears
    from model.golden import new_cache
    from model.sampler import FlowSchedule
    from model.steps import chunk_pass, denoise_chunk, prefill_context

    cfg = get_preset("tiny")
    torch.manual_seed(1)
    dit = build_dit(cfg).eval().requires_grad_(False)
    schedule = FlowSchedule(cfg.sampler)
    ctx = torch.randn(1, cfg.context_frames, *cfg.latent_shape)
    flags = torch.zeros(1, cfg.context_frames, dtype=torch.long)
    prompt = torch.randn(1, 1, cfg.text.text_len, cfg.dit.text_dim)
    noise = torch.randn(1, cfg.chunk_frames, *cfg.latent_shape)
    draws = [torch.randn_like(noise) for _ in range(schedule.num_steps - 1)]

    def chunk():
        kv = new_cache(cfg)
        with torch.inference_mode():
            prefill_context(dit, kv, ctx, flags, flags, prompt)
            p = chunk_pass(dit, kv, 0, flags[:, -1] + 1, torch.zeros(1, dtype=torch.long))
            return denoise_chunk(dit, schedule, p, noise, draws)

    ref = chunk()
    n = quantize_dit_linears(dit)
    assert n == cfg.dit.num_layers * (4 + 4 + 2)  # self q k v o, cross q k v o, ffn 2
    assert all(not isinstance(m, torch.nn.Linear) for b in dit.blocks for m in b.modules())
    assert any(isinstance(m, Float8Linear) for m in dit.blocks.modules())
    got = chunk()
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
