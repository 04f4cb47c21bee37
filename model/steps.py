"""The hot path's verbs for one shot, as plain functions over explicit state
(docs/design/generator.md §9).

    prefill_context  one t=0 pass over the context latents fills the global cache and text K/V
    chunk_pass       the per-chunk inputs shared by its denoise and refresh passes
    denoise_chunk    `num_steps` flow steps with re-noise, attending to [context | shot so far]
    refresh_cache    the clean t=0 pass that leaves this chunk's final K/V in the cache

Noise is passed in, drawn by the caller from its own seeded generator, so these functions
are deterministic and the golden replay can inject the recorded draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from cache.kv import KVCache
from model.dit import CausalDiT, Pass
from model.sampler import FlowSchedule


def _timesteps(value: float, batch: int, frames: int, device) -> torch.Tensor:
    return torch.full((batch, frames), value, dtype=torch.float32, device=device)


def prefill_context(
    dit: CausalDiT,
    kv: KVCache,
    latents: torch.Tensor,
    flags: torch.Tensor,
    caption_index: torch.Tensor,
    prompt_embeds: torch.Tensor,
    record: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Fill the text K/V slots and the global cache from the context latents.

    latents (B, Fc, C, h, w) at t=0; flags (B, Fc) their source shots; caption_index
    (B, Fc) each frame's caption row in `prompt_embeds` (B, S, T, text_dim). Attention is
    bidirectional among the context frames only. With `record`, also returns the flow
    (which inference discards) and records activations.
    """
    b, n_ctx = latents.shape[:2]
    text_k, text_v = dit.text_kv(prompt_embeds)
    n_cap = text_k.shape[2]
    kv.text_k[:, :, :n_cap] = text_k
    kv.text_v[:, :, :n_cap] = text_v
    if record is not None:
        record["text_embedding"] = dit.embed_text(prompt_embeds)
    positions = torch.arange(n_ctx, device=latents.device)
    cos, sin = dit.rope_for(positions, flags)
    end = kv.layout.context_tokens
    pass_ = Pass(
        cos, sin, caption_index, kv.text_k, kv.text_v, kv, 0, end, backend=dit.attn_backend
    )
    t = _timesteps(0.0, b, n_ctx, latents.device)
    return dit(latents, t, pass_, need_output=record is not None, record=record)


def chunk_pass(
    dit: CausalDiT, kv: KVCache, chunk_index: int, flag: torch.Tensor, caption: torch.Tensor
) -> Pass:
    """Inputs of one session's chunk `chunk_index` (flag, caption: (1,) int tensors)."""
    return batched_chunk_pass(dit, [ChunkRow(kv, chunk_index, flag, caption)])


class ChunkRow(NamedTuple):
    """One session's place in a batched chunk pass."""

    kv: KVCache
    chunk_index: int
    flag: torch.Tensor  # (1,) shot flag of the generated frames
    caption: torch.Tensor  # (1,) the shot's caption row in the cache's text slots


def batched_chunk_pass(dit: CausalDiT, rows: Sequence[ChunkRow]) -> Pass:
    """Inputs shared by a chunk's denoise and refresh passes, for one or more sessions.

    Rows may sit at different chunk indices: each has its RoPE positions Fc+3b.., its shot
    flag, its caption (gathered from its cache's text slots, so cross-attention reads one
    row per session) and its own cache slot and prefix.
    """
    cfg = dit.cfg
    f = cfg.chunk_frames
    device = rows[0].flag.device
    frames = torch.arange(f, device=device)
    positions = torch.stack([cfg.context_frames + r.chunk_index * f + frames for r in rows])
    flags = torch.cat([r.flag for r in rows])[:, None].expand(-1, f)
    cos, sin = dit.rope_for(positions, flags)
    text_k = torch.cat([r.kv.text_k[:, 0].index_select(1, r.caption) for r in rows], dim=1)[
        :, :, None
    ]
    text_v = torch.cat([r.kv.text_v[:, 0].index_select(1, r.caption) for r in rows], dim=1)[
        :, :, None
    ]
    captions = torch.zeros(len(rows), f, dtype=torch.long, device=device)
    caches = [(r.kv, *r.kv.layout.chunk_range(r.chunk_index)) for r in rows]
    return Pass(
        cos,
        sin,
        captions,
        text_k,
        text_v,
        rows=caches,
        backend=dit.attn_backend,
        group_rows=dit.group_rows,
    )


def denoise_chunk(
    dit: CausalDiT,
    schedule: FlowSchedule,
    pass_: Pass,
    noise: torch.Tensor,
    renoise: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Run the few-step sampler on one chunk; returns x0 (B, F, C, h, w).

    `noise` is the chunk's initial noise; `renoise` holds `num_steps - 1` fresh draws, one
    per re-noise. Every pass writes this chunk's (transient) K/V into its local slot.
    """
    b, f = noise.shape[:2]
    x = noise
    x0 = noise
    for i, (t, sigma) in enumerate(zip(schedule.step_timesteps, schedule.step_sigmas, strict=True)):
        flow = dit(x, _timesteps(t, b, f, noise.device), pass_)
        x0 = schedule.to_x0(x, flow, sigma)
        if i + 1 < schedule.num_steps:
            x = schedule.renoise(x0, renoise[i], schedule.step_sigmas[i + 1])
    return x0


def refresh_cache(dit: CausalDiT, pass_: Pass, x0: torch.Tensor) -> None:
    """The clean pass at t=0: overwrite the chunk's local slot with K/V of its final x0."""
    b, f = x0.shape[:2]
    dit(x0, _timesteps(0.0, b, f, x0.device), pass_, need_output=False)
