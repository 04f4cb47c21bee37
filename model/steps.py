"""The hot path's verbs for one shot, as plain functions over explicit state (model-spec §5).

    prefill_context  one t=0 pass over the context latents fills the global cache and text K/V
    chunk_pass       the per-chunk inputs shared by its denoise and refresh passes
    denoise_chunk    `num_steps` flow steps with re-noise, attending to [context | shot so far]
    refresh_cache    the clean t=0 pass that leaves this chunk's final K/V in the cache

Noise is passed in, drawn by the caller from its own seeded generator, so these functions
are deterministic and the golden replay can inject the recorded draws.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Inputs of chunk `chunk_index`'s passes: RoPE at positions Fc+3b.., one flag and caption
    row per batched session (`flag`, `caption`: (B,) int tensors)."""
    cfg = dit.cfg
    first = cfg.context_frames + chunk_index * cfg.chunk_frames
    positions = torch.arange(first, first + cfg.chunk_frames, device=flag.device)
    flags = flag[:, None].expand(-1, cfg.chunk_frames)
    cos, sin = dit.rope_for(positions, flags)
    captions = caption[:, None].expand(-1, cfg.chunk_frames)
    start, end = kv.layout.chunk_range(chunk_index)
    return Pass(cos, sin, captions, kv.text_k, kv.text_v, kv, start, end, backend=dit.attn_backend)


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
