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


class BlockMask:
    """A boolean (L, L) attention mask kept as blocks: runs of consecutive query rows that
    attend to the same keys, each with those keys (a slice where they are contiguous, an
    index otherwise). Attention over it is one unmasked call per block, which skips the
    masked-out scores a dense mask still computes: training's teacher-forced shots
    (training/teacher_forcing.py) attend to 40 to 50 percent of their keys, and the demo
    preset's training step runs 1.1 to 1.2 times as fast this way on CPU
    (`bench.demo_sizes --train-steps`). The result is the dense mask's to float rounding."""

    def __init__(self, mask: torch.Tensor):
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError("BlockMask takes a 2-D bool mask (query rows x keys)")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query row must attend to at least one key")
        starts = [0, *((mask[1:] != mask[:-1]).any(dim=1).nonzero().flatten() + 1).tolist()]
        self.shape = tuple(mask.shape)
        self.blocks: list[tuple[int, int, slice | torch.Tensor]] = []
        for start, end in zip(starts, [*starts[1:], mask.shape[0]], strict=True):
            keys = mask[start].nonzero().flatten()
            first, last = int(keys[0]), int(keys[-1]) + 1
            span = slice(first, last) if last - first == len(keys) else keys
            self.blocks.append((start, end, span))


def _block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: BlockMask
) -> torch.Tensor:
    if (q.shape[1], k.shape[1]) != mask.shape:
        raise ValueError(f"BlockMask of shape {mask.shape} for {q.shape[1]} x {k.shape[1]}")
    parts = []
    for start, end, keys in mask.blocks:
        if isinstance(keys, slice):
            kk, vv = k[:, keys], v[:, keys]
        else:
            keys = keys.to(k.device)
            kk, vv = k.index_select(1, keys), v.index_select(1, keys)
        parts.append(attention(q[:, start:end], kk, vv, backend))
    return torch.cat(parts, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    mask: torch.Tensor | BlockMask | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head; `mask` (Lq, Lk) bool, True = attend (dense, or
    as a `BlockMask`)."""
    if isinstance(mask, BlockMask):
        return _block_attention(q, k, v, backend, mask)
    if backend == "xformers" and mask is None:
        return _xformers_ops().memory_efficient_attention(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)
