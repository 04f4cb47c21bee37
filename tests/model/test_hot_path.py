"""What the CPU can show about the hot path: one graph per pass (so no host syncs inside),
caches written in place, no tensors piling up across shots, compiled == eager."""

from __future__ import annotations

import gc

import pytest
import torch

from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import get_preset
from model.generator import ShotStreamGenerator, load_model
from model.golden import new_cache
from model.steps import chunk_pass, denoise_chunk, prefill_context, refresh_cache


@pytest.fixture(scope="module")
def setup():
    cfg = get_preset("tiny").replace(chunks_per_shot=3)
    model = load_model(cfg, seed=0)
    kv = new_cache(cfg)
    flags = torch.zeros(1, cfg.context_frames, dtype=torch.long)
    prompt = torch.randn(1, 1, cfg.text.text_len, cfg.dit.text_dim)
    return cfg, model, kv, flags, prompt


def _breaks(fn, *args):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_count, ex.graph_break_count, [str(r) for r in ex.break_reasons]


def test_hot_path_traces_without_graph_breaks(setup):
    """A graph break is where a Python branch on a tensor value or a host sync would be."""
    cfg, model, kv, flags, prompt = setup
    dit = model.dit
    ctx = torch.zeros(1, cfg.context_frames, *cfg.latent_shape)
    graphs, breaks, why = _breaks(prefill_context, dit, kv, ctx, flags, flags, prompt)
    assert breaks == 0, why
    p = chunk_pass(dit, kv, 1, flags[:, -1] + 1, torch.zeros(1, dtype=torch.long))
    x = torch.randn(1, cfg.chunk_frames, *cfg.latent_shape)
    draws = [torch.randn_like(x) for _ in range(model.schedule.num_steps - 1)]
    graphs, breaks, why = _breaks(denoise_chunk, dit, model.schedule, p, x, draws)
    assert (graphs, breaks) == (1, 0), why  # all four steps and re-noises in one graph
    graphs, breaks, why = _breaks(refresh_cache, dit, p, x)
    assert (graphs, breaks) == (1, 0), why


def test_caches_in_place_and_no_tensor_growth_across_shots(setup):
    cfg, model, *_ = setup
    pool = StatePool(
        KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    lease = pool.acquire("s")
    kv = lease.kv
    ptrs = [t.data_ptr() for t in (kv.k, kv.v, kv.text_k, kv.text_v)]
    gen = ShotStreamGenerator(model, lease, "a red circle on a blue background", seed=1)

    def live_tensors():
        gc.collect()
        n = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
        # minus the text encoder's LRU of caption embeddings (bounded, one tensor per caption,
        # and every shot's caption is new: it carries its shot index)
        return n - model.text.cached_captions

    counts, store = [], []
    for shot in range(4):
        gen.start_shot(f"shot {shot}")
        for _ in range(cfg.chunks_per_shot):
            gen.next_chunk()
            assert [t.data_ptr() for t in (kv.k, kv.v, kv.text_k, kv.text_v)] == ptrs
        counts.append(live_tensors())
        store.append(lease.frames.nbytes)
    # From the third shot on (context memo at its steady size) nothing accumulates.
    assert counts[2] == counts[3], counts
    assert store[2] == store[3], store
    pool.release(lease)


@pytest.mark.slow
def test_compiled_dit_equals_eager(setup):
    """torch.compile (inductor) of the DiT against eager, on two chunk shapes (slow: ~1 min
    of compilation on CPU, so it runs in `make soak`)."""
    cfg, model, kv, flags, prompt = setup
    dit = model.dit
    prefill_context(
        dit, kv, torch.zeros(1, cfg.context_frames, *cfg.latent_shape), flags, flags, prompt
    )
    compiled = torch.compile(dit.forward)
    x = torch.randn(1, cfg.chunk_frames, *cfg.latent_shape)
    t = torch.full((1, cfg.chunk_frames), 957.9287719726562)
    for b in range(2):
        p = chunk_pass(dit, kv, b, flags[:, -1] + 1, torch.zeros(1, dtype=torch.long))
        with torch.no_grad():
            assert (compiled(x, t, p) - dit(x, t, p)).abs().max() < 1e-5
