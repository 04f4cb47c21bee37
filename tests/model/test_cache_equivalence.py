"""Cached chunk-by-chunk inference equals the same frames computed without a cache."""

from __future__ import annotations

import pytest
import torch

from model.attention import BlockMask, attention
from model.config import PRESETS
from model.dit import build_dit
from model.golden import caption_index_for, new_cache
from model.sampler import FlowSchedule
from model.steps import chunk_pass, prefill_context, refresh_cache
from training.teacher_forcing import shot_blocks, shot_mask, teacher_forced_flow


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].replace(chunks_per_shot=3)
    dit = build_dit(cfg).eval()
    return cfg, dit


def _conditioning(cfg, shot):
    g = torch.Generator().manual_seed(shot)
    n_cap = shot + 1
    ctx = torch.randn(1, cfg.context_frames, *cfg.latent_shape, generator=g)
    flags = torch.tensor([[0, 0, 0, 1, 1, 1]]) if shot == 2 else torch.zeros(1, 6, dtype=torch.long)
    prompt = torch.randn(1, n_cap, cfg.text.text_len, cfg.dit.text_dim, generator=g)
    return ctx, flags, prompt


@pytest.mark.parametrize("shot", [0, 2], ids=["shot0", "shot2-multicaption"])
def test_cached_equals_uncached(setup, shot):
    """Every denoise pass of every chunk through the dual cache == the full-attention forward
    over [context | clean chunks so far | this noisy chunk]."""
    cfg, dit = setup
    ctx, flags, prompt = _conditioning(cfg, shot)
    n_cap = prompt.shape[1]
    sch = FlowSchedule(cfg.sampler)
    kv = new_cache(cfg)
    gen_flag = flags[:, -1] + 1
    caption = caption_index_for(gen_flag, n_cap)
    g = torch.Generator().manual_seed(100 + shot)
    n_chunks = cfg.chunks_per_shot
    with torch.inference_mode():
        prefill_context(dit, kv, ctx, flags, caption_index_for(flags, n_cap), prompt)
        clean, cached = [], []  # per chunk: final x0; per (chunk, step): (x_in, t, flow)
        for c in range(n_chunks):
            pass_ = chunk_pass(dit, kv, c, gen_flag, caption)
            x = torch.randn(1, cfg.chunk_frames, *cfg.latent_shape, generator=g)
            for i, (t, s) in enumerate(zip(sch.step_timesteps, sch.step_sigmas, strict=True)):
                flow = dit(x, torch.full((1, cfg.chunk_frames), t), pass_)
                cached.append((c, x, t, flow))
                x0 = sch.to_x0(x, flow, s)
                if i + 1 < sch.num_steps:
                    x = sch.renoise(x0, torch.randn(x0.shape, generator=g), sch.step_sigmas[i + 1])
            refresh_cache(dit, pass_, x0)
            clean.append(x0)
        clean = torch.cat(clean, dim=1)

        captions = torch.cat(
            [caption_index_for(flags, n_cap), caption.expand(1, cfg.latent_frames_per_shot)], dim=1
        )
        worst = 0.0
        for c, x, t, flow in cached:
            # Only the noisy chunk c matters; other noisy chunks see nothing of it.
            noisy = clean.clone()
            noisy[:, c * 3 : (c + 1) * 3] = x
            chunk_t = torch.full((1, n_chunks), t)
            full = teacher_forced_flow(
                dit, ctx, flags, clean, noisy, chunk_t, gen_flag, prompt, captions
            )
            diff = (full[:, c * 3 : (c + 1) * 3] - flow).abs().max().item()
            worst = max(worst, diff)
    assert worst < 1e-5, worst


def test_mask_pattern():
    m = shot_mask(context_frames=2, n_chunks=2, chunk_frames=1, tokens_per_frame=1)
    # rows/cols: c0 c1 | clean0 clean1 | noisy0 noisy1
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_block_mask_keeps_the_shot_masks_key_sets():
    """One block per run of query rows with the same keys: a slice where they are contiguous
    (context, clean chunks), an index where they are not (a noisy chunk skips the clean copy
    of itself and of later chunks)."""
    blocks = shot_blocks(context_frames=2, n_chunks=2, chunk_frames=1, tokens_per_frame=1).blocks
    got = [(a, b, k if isinstance(k, slice) else k.tolist()) for a, b, k in blocks]
    assert got == [
        (0, 2, slice(0, 2)),
        (2, 3, slice(0, 3)),
        (3, 4, slice(0, 4)),
        (4, 5, [0, 1, 4]),
        (5, 6, [0, 1, 2, 5]),
    ]


def _random_mask(g: torch.Generator, n: int) -> torch.Tensor:
    """Runs of rows sharing random (mostly non-contiguous) key sets, each set non-empty."""
    rows, mask = 0, torch.zeros(n, n, dtype=torch.bool)
    while rows < n:
        run = int(torch.randint(1, 5, (1,), generator=g))
        keys = torch.rand(n, generator=g) < 0.4
        keys[int(torch.randint(0, n, (1,), generator=g))] = True
        mask[rows : rows + run] = keys
        rows += run
    return mask


@pytest.mark.parametrize("case", ["shot", "random"])
def test_block_mask_attention_equals_the_dense_mask_with_its_gradients(case):
    g = torch.Generator().manual_seed(3)
    if case == "shot":
        dense = shot_mask(context_frames=6, n_chunks=4, chunk_frames=3, tokens_per_frame=4)
    else:
        dense = _random_mask(g, 37)
    n = dense.shape[0]
    inputs = [torch.randn(2, n, 3, 8, generator=g, requires_grad=True) for _ in range(3)]
    out = {}
    for name, mask in (("dense", dense), ("blocks", BlockMask(dense))):
        y = attention(*inputs, mask=mask)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[name] = (y.detach(), *(x.grad.clone() for x in inputs))
        for x in inputs:
            x.grad = None
    if case == "random":
        assert len(BlockMask(dense).blocks) > 5
    for a, b in zip(out["dense"], out["blocks"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_block_mask_refuses_a_row_without_keys_and_a_wrong_size():
    empty_row = torch.ones(4, 4, dtype=torch.bool)
    empty_row[2] = False
    with pytest.raises(ValueError, match="at least one key"):
        BlockMask(empty_row)
    blocks = BlockMask(torch.ones(4, 4, dtype=torch.bool))
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="shape"):
        attention(q, q, q, mask=blocks)


def test_teacher_forcing_gives_the_same_flow_with_the_dense_mask(setup):
    cfg, dit = setup
    ctx, flags, prompt = _conditioning(cfg, 2)
    g = torch.Generator().manual_seed(7)
    n = cfg.latent_frames_per_shot
    clean, noisy = (torch.randn(1, n, *cfg.latent_shape, generator=g) for _ in range(2))
    chunk_t = torch.tensor([[999.0, 750.0, 500.0]])
    gen_flag = flags[:, -1] + 1
    captions = torch.cat(
        [caption_index_for(flags, 3), caption_index_for(gen_flag, 3).expand(1, n)], dim=1
    )
    dense = shot_mask(cfg.context_frames, 3, cfg.chunk_frames, cfg.tokens_per_frame)
    args = (dit, ctx, flags, clean, noisy, chunk_t, gen_flag, prompt, captions)
    with torch.inference_mode():
        torch.testing.assert_close(
            teacher_forced_flow(*args), teacher_forced_flow(*args, mask=dense), rtol=0, atol=1e-5
        )


def test_cache_writes_only_its_slot(setup):
    """A chunk's passes write its own local slot in place; context and other slots unchanged."""
    cfg, dit = setup
    ctx, flags, prompt = _conditioning(cfg, 0)
    kv = new_cache(cfg)
    ptrs = (kv.k.data_ptr(), kv.v.data_ptr())
    with torch.inference_mode():
        prefill_context(dit, kv, ctx, flags, torch.zeros_like(flags), prompt)
        before = kv.k.clone()
        pass_ = chunk_pass(dit, kv, 1, flags[:, -1] + 1, torch.zeros(1, dtype=torch.long))
        refresh_cache(dit, pass_, torch.randn(1, 3, *cfg.latent_shape))
    start, end = kv.layout.chunk_range(1)
    assert (kv.k.data_ptr(), kv.v.data_ptr()) == ptrs
    assert torch.equal(kv.k[:, :, :start], before[:, :, :start])
    assert torch.equal(kv.k[:, :, end:], before[:, :, end:])
    assert not torch.equal(kv.k[:, :, start:end], before[:, :, start:end])
