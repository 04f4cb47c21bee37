"""Attention backends: PyTorch SDPA by default, xformers when installed and on CUDA.

All take and return (B, L, H, d): the layout of the KV cache, so cached keys are
attended to without copies.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except Exception:
        return None
    return xops


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, best first."""
    dev = torch.device(device)
    names = ["sdpa"]
    if dev.type == "cuda" and _xformers_ops() is not None:
        names.insert(0, "xformers")
    return names


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """`auto` picks the first available backend; a named one must be available."""
    requested = (
        os.environ.get("SHOTSTREAM_ATTENTION", requested) if requested == "auto" else requested
    )
    names = available_backends(device)
    if requested == "auto":
        return names[0]
    if requested not in names:
        raise ValueError(f"attention backend {requested!r} unavailable on {device}; have {names}")
    return requested


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head; `mask` (Lq, Lk) bool, True = attend."""
    if backend == "xformers" and mask is None:
        return _xformers_ops().memory_efficient_attention(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)
