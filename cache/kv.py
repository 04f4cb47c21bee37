"""The dual KV cache of the causal student (docs/design/generator.md §5), preallocated and
written in place.

One buffer per K and V holds every layer: `[layers, B, context + shot tokens, heads, head_dim]`.
The global (context) cache sits at `[0, context_tokens)` and the local (current shot)
slots follow it, so chunk b attends over the contiguous prefix ending at its own slot.
The cross-attention K/V of the shot's captions live beside it in fixed caption slots.

Writes are in place and each pass writes its own slot before attending, so a chunk that
fails half-way leaves nothing a retry would read: committing a chunk is only a matter of
advancing the caller's chunk counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Token geometry of a cache; all sizes come from the model config."""

    num_layers: int
    num_heads: int
    head_dim: int
    context_tokens: int
    shot_tokens: int
    chunk_tokens: int
    max_captions: int
    text_len: int

    @property
    def total_tokens(self) -> int:
        return self.context_tokens + self.shot_tokens

    @classmethod
    def for_config(cls, cfg) -> KVLayout:  # cfg: model.config.ModelConfig (no import: layering)
        return cls(
            num_layers=cfg.dit.num_layers,
            num_heads=cfg.dit.num_heads,
            head_dim=cfg.dit.head_dim,
            context_tokens=cfg.context_tokens,
            shot_tokens=cfg.shot_tokens,
            chunk_tokens=cfg.chunk_tokens,
            max_captions=cfg.max_captions,
            text_len=cfg.text.text_len,
        )

    def chunk_range(self, chunk_index: int) -> tuple[int, int]:
        """Token range [start, end) of a chunk's local slot in the combined buffer."""
        start = self.context_tokens + chunk_index * self.chunk_tokens
        return start, start + self.chunk_tokens

    def nbytes(self, batch: int, dtype: torch.dtype) -> int:
        el = torch.empty((), dtype=dtype).element_size()
        per_layer_token = 2 * self.num_heads * self.head_dim * el  # K and V
        tokens = self.total_tokens + self.max_captions * self.text_len
        return self.num_layers * batch * tokens * per_layer_token


class KVCache:
    """Preallocated self-attention and cross-attention K/V for `batch` sessions."""

    def __init__(self, layout: KVLayout, batch: int = 1, dtype=torch.float32, device="cpu") -> None:
        self.layout = layout
        self.batch = batch
        shape = (layout.num_layers, batch, layout.total_tokens, layout.num_heads, layout.head_dim)
        text_shape = (
            layout.num_layers,
            batch,
            layout.max_captions,
            layout.text_len,
            layout.num_heads,
            layout.head_dim,
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.text_k = torch.zeros(text_shape, dtype=dtype, device=device)
        self.text_v = torch.zeros(text_shape, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.text_k, self.text_v))

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of tokens [start, start + len) of one layer, in place."""
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v

    def prefix(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of K/V tokens [0, end) of one layer: what a pass ending at `end` attends to."""
        return self.k[layer, :, :end], self.v[layer, :, :end]
