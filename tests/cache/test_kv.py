"""The dual cache: preallocated, written in place, byte-counted."""

from __future__ import annotations

import torch

from cache.kv import KVCache, KVLayout
from model.config import PRESETS


def test_real_preset_bytes_match_the_spec():
    """184,320 B per token across layers (K+V, bf16): ~7.8 GB per session plus text K/V."""
    cfg = PRESETS["wan2.1-1.3b"]
    layout = KVLayout.for_config(cfg)
    per_token = 2 * cfg.dit.num_layers * cfg.dit.dim * 2
    assert per_token == 184_320
    assert layout.total_tokens == 9360 + 32760
    expected = (9360 + 32760 + 7 * 512) * per_token
    assert layout.nbytes(1, torch.bfloat16) == expected == cfg.kv_bytes_per_session(torch.bfloat16)


def test_writes_in_place_and_counts_bytes():
    cfg = PRESETS["tiny"]
    kv = KVCache(KVLayout.for_config(cfg))
    ptr = kv.k.data_ptr()
    start, end = kv.layout.chunk_range(1)
    k = torch.randn(1, end - start, cfg.dit.num_heads, cfg.dit.head_dim)
    kv.write(0, start, k, k * 2)
    assert kv.k.data_ptr() == ptr
    assert torch.equal(kv.k[0, :, start:end], k)
    assert kv.k[0, :, :start].abs().sum() == 0 and kv.k[0, :, end:].abs().sum() == 0
    keys, vals = kv.prefix(0, end)
    assert keys.data_ptr() == ptr and keys.shape[1] == end
    assert kv.nbytes == kv.layout.nbytes(1, torch.float32)
