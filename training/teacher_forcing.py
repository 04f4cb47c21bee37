"""The cached inference computation as one uncached forward, for training and for proof.

The sequence is [context (t=0) | clean copy of the shot's chunks (t=0) | noisy copy (one t
per chunk)], with a mask reproducing inference exactly (docs/design/generator.md §12):
- context <-> context: full attention;
- clean chunk i -> context and clean chunks <= i (what its refresh pass sees);
- noisy chunk i -> context, clean chunks < i and itself (what its denoise passes see).
The noisy copy's output equals what chunk-by-chunk cached inference computes on the same
clean history; a test holds the two together. The trainers pass the mask as a `BlockMask`
(`shot_blocks`): only 40 to 50 percent of it attends, and its attention then skips the rest.
"""

from __future__ import annotations

import torch

from model.attention import BlockMask
from model.dit import CausalDiT, Pass


def shot_mask(
    context_frames: int, n_chunks: int, chunk_frames: int, tokens_per_frame: int, device=None
) -> torch.Tensor:
    """Boolean (L, L) mask, True = attend, over [context | clean chunks | noisy chunks]."""
    # Label every frame with (segment, chunk); build the frame mask, then expand to tokens.
    n_ctx, n_shot = context_frames, n_chunks * chunk_frames
    n = n_ctx + 2 * n_shot
    chunk = torch.full((n,), -1, dtype=torch.long, device=device)
    shot_chunks = torch.arange(n_shot, device=device) // chunk_frames
    chunk[n_ctx : n_ctx + n_shot] = shot_chunks
    chunk[n_ctx + n_shot :] = shot_chunks
    kind = torch.zeros(n, dtype=torch.long, device=device)  # 0 context, 1 clean, 2 noisy
    kind[n_ctx : n_ctx + n_shot] = 1
    kind[n_ctx + n_shot :] = 2
    q_kind, k_kind = kind[:, None], kind[None, :]
    q_chunk, k_chunk = chunk[:, None], chunk[None, :]
    to_context = k_kind == 0
    ctx_rows = (q_kind == 0) & to_context
    clean_rows = (q_kind == 1) & (to_context | ((k_kind == 1) & (k_chunk <= q_chunk)))
    noisy_rows = (q_kind == 2) & (
        to_context | ((k_kind == 1) & (k_chunk < q_chunk)) | ((k_kind == 2) & (k_chunk == q_chunk))
    )
    frames = ctx_rows | clean_rows | noisy_rows
    return frames.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def shot_blocks(
    context_frames: int, n_chunks: int, chunk_frames: int, tokens_per_frame: int, device=None
) -> BlockMask:
    """`shot_mask` as a `BlockMask`: the training forward's attention skips what it masks."""
    return BlockMask(shot_mask(context_frames, n_chunks, chunk_frames, tokens_per_frame, device))


def teacher_forced_flow(
    dit: CausalDiT,
    context: torch.Tensor,
    context_flags: torch.Tensor,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    chunk_t: torch.Tensor,
    gen_flag: torch.Tensor,
    prompt_embeds: torch.Tensor,
    caption_index: torch.Tensor,
    mask: torch.Tensor | BlockMask | None = None,
) -> torch.Tensor:
    """Flow predictions for the noisy copy of a shot, all chunks in one forward.

    context (B, Fc, C, h, w) and its flags (B, Fc); clean and noisy (B, Fs, C, h, w);
    chunk_t (B, n_chunks) the timestep of each noisy chunk; gen_flag (B,); prompt_embeds
    (B, S, T, text_dim); caption_index (B, Fc + Fs) caption row of the context frames and
    then of the shot's frames. Returns the flow of the noisy frames (B, Fs, C, h, w).
    """
    cfg = dit.cfg
    b, n_ctx = context.shape[:2]
    n_shot = clean.shape[1]
    n_chunks = n_shot // cfg.chunk_frames
    device = context.device
    shot_pos = torch.arange(n_ctx, n_ctx + n_shot, device=device)
    positions = torch.cat([torch.arange(n_ctx, device=device), shot_pos, shot_pos])
    shot_flags = gen_flag[:, None].expand(b, n_shot)
    flags = torch.cat([context_flags, shot_flags, shot_flags], dim=1)
    cos, sin = dit.rope_for(positions, flags)
    shot_caps = caption_index[:, n_ctx:]
    captions = torch.cat([caption_index, shot_caps], dim=1)
    text_k, text_v = dit.text_kv(prompt_embeds)
    if mask is None:
        mask = shot_blocks(n_ctx, n_chunks, cfg.chunk_frames, cfg.tokens_per_frame, device)
    t = torch.cat(
        [
            torch.zeros(b, n_ctx + n_shot, device=device),
            chunk_t.float().repeat_interleave(cfg.chunk_frames, dim=1),
        ],
        dim=1,
    )
    pass_ = Pass(cos, sin, captions, text_k, text_v, mask=mask, backend=dit.attn_backend)
    x = torch.cat([context, clean, noisy], dim=1)
    flow = dit(x, t, pass_)
    return flow[:, n_ctx + n_shot :]
