"""The causal Wan DiT of the ShotStream student (docs/design/generator.md §3).

Module names match the checkpoint keys after stripping `model.`, so the state dict
loads as is. One forward runs one pass over a chunk (or the context prefill): it writes
its K/V into the session's cache at `[start, end)` and attends over `[0, end)`.
Latents enter and leave in the sampler layout (B, F, C, h, w).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cache.kv import KVCache
from model.attention import BlockMask, attention
from model.config import ModelConfig
from model.rope import RopeTables, apply_rope


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t w_0..), sin(t w_0..)] with w_j = 10000^(-j/half), in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t.to(torch.float64).flatten(), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class RMSNorm(nn.Module):
    """RMSNorm with statistics in float32, cast back before the weight (as the reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        heads = (b, n, self.num_heads, -1)
        q = self.norm_q(self.q(x)).view(heads)
        k = self.norm_k(self.k(x)).view(heads)
        return q, k, self.v(x).view(heads)


class CrossAttention(nn.Module):
    """Text cross-attention; each frame's queries attend to one caption row, no mask
    (docs/design/generator.md §6)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def project_text(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of embedded captions c (..., T, D) -> (..., T, H, d)."""
        heads = (*c.shape[:-1], self.num_heads, -1)
        return self.norm_k(self.k(c)).view(heads), self.v(c).view(heads)

    def forward(
        self,
        x: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        caption_index: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        # x (B, F*n, D); text_k/v (B, S, T, H, d); caption_index (B, F) of caption rows.
        b, length, dim = x.shape
        n_frames = caption_index.shape[1]
        q = self.norm_q(self.q(x)).view(b * n_frames, length // n_frames, self.num_heads, -1)
        rows = torch.arange(b, device=x.device)[:, None]
        k = text_k[rows, caption_index].flatten(0, 1)  # (B*F, T, H, d)
        v = text_v[rows, caption_index].flatten(0, 1)
        y = attention(q, k, v, backend)
        return self.o(y.reshape(b, length, dim))


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dit
        self.modulation = nn.Parameter(torch.randn(1, 6, d.dim) / d.dim**0.5)
        self.norm1 = nn.LayerNorm(d.dim, eps=d.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d.dim, d.num_heads, d.eps)
        self.norm3 = nn.LayerNorm(d.dim, eps=d.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d.dim, d.num_heads, d.eps)
        self.norm2 = nn.LayerNorm(d.dim, eps=d.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d.dim, d.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(d.ffn_dim, d.dim)
        )

    def forward(
        self, x: torch.Tensor, e0: torch.Tensor, pass_: Pass, layer: int, need_output: bool = True
    ) -> torch.Tensor:
        b, length, dim = x.shape
        n_frames = e0.shape[1]
        per_frame = (b, n_frames, length // n_frames, dim)
        # (shift, scale, gate) x 2, one row per frame, broadcast over the frame's tokens
        m = (self.modulation.unsqueeze(0) + e0).unsqueeze(3)  # (B, F, 6, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)

        a = (self.norm1(x).view(per_frame) * (1 + scale1) + shift1).view(b, length, dim)
        q, k, v = self.self_attn.qkv(a)
        q = apply_rope(q, pass_.cos, pass_.sin)
        k = apply_rope(k, pass_.cos, pass_.sin)
        if pass_.rows is None:
            y = attention(q, k, v, pass_.backend, pass_.mask)
        elif pass_.group_rows and len(pass_.rows) > 1:
            grouped = _grouped_row_attention(q, k, v, pass_, layer, need_output)
            if grouped is None:
                return x  # a K/V-only pass, as below
            y = grouped
        else:
            # Each batch row (a session) writes its own cache slot, then attends over its own
            # prefix: linear layers run batched, attention per row, no cache is copied.
            ys = []
            for i, (kv, start, end) in enumerate(pass_.rows):
                kv.write(layer, start, k[i : i + 1], v[i : i + 1])
                if need_output:
                    keys, values = kv.prefix(layer, end)
                    ys.append(attention(q[i : i + 1], keys, values, pass_.backend))
            if not need_output:
                return x  # a K/V-only pass: nothing after these writes reaches any cache
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
        y = self.self_attn.o(y.flatten(2))
        x = x + (y.view(per_frame) * gate1).view(b, length, dim)

        text_k, text_v = pass_.text_k[layer], pass_.text_v[layer]
        x = x + self.cross_attn(self.norm3(x), text_k, text_v, pass_.caption_index, pass_.backend)

        f = self.ffn((self.norm2(x).view(per_frame) * (1 + scale2) + shift2).view(b, length, dim))
        return x + (f.view(per_frame) * gate2).view(b, length, dim)


def _grouped_row_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pass_: Pass, layer: int, need_output: bool
) -> torch.Tensor | None:
    """The rows' attention with one call per distinct prefix length instead of one per row:
    rows whose chunks end at the same key (sessions in step) attend together over their
    prefixes stacked into one batch (a copy of those keys, then one kernel launch)."""
    rows = pass_.rows
    assert rows is not None
    for i, (kv, start, _end) in enumerate(rows):
        kv.write(layer, start, k[i : i + 1], v[i : i + 1])
    if not need_output:
        return None
    groups: dict[int, list[int]] = {}
    for i, (_kv, _start, end) in enumerate(rows):
        groups.setdefault(end, []).append(i)
    parts: list[torch.Tensor] = [q[:0]] * len(rows)
    for end, idx in groups.items():
        prefixes = [rows[i][0].prefix(layer, end) for i in idx]
        keys = torch.cat([p[0] for p in prefixes]) if len(idx) > 1 else prefixes[0][0]
        values = torch.cat([p[1] for p in prefixes]) if len(idx) > 1 else prefixes[0][1]
        run = idx == list(range(idx[0], idx[-1] + 1))
        queries = q[idx[0] : idx[-1] + 1] if run else q[idx]
        out = attention(queries, keys, values, pass_.backend)
        for j, i in enumerate(idx):
            parts[i] = out[j : j + 1]
    return torch.cat(parts)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dit
        self.norm = nn.LayerNorm(d.dim, eps=d.eps, elementwise_affine=False)
        self.head = nn.Linear(d.dim, d.out_dim * math.prod(d.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, d.dim) / d.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # Uses the time embedding e (B, F, D), not its 6-way projection.
        b, length, dim = x.shape
        n_frames = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        y = self.norm(x).view(b, n_frames, -1, dim) * (1 + scale) + shift
        return self.head(y)  # (B, F, tokens_per_frame, out_dim * patch volume)


class Pass:
    """Everything one forward needs besides the latents and timesteps.

    `cos`/`sin`: RoPE for the pass's tokens (B or 1, N, d/2); `caption_index` (B, F): caption
    row per frame into `text_k`/`text_v` (L, B, S, T, H, d). With caches, `rows` holds one
    (cache, start, end) per batch row: the row's K/V are written at `[start, start+N)` and it
    attends over its cache's `[0, end)`. Without caches, attention runs over the pass's own
    tokens with `mask` (dense, or a `BlockMask`).
    """

    __slots__ = (
        "cos",
        "sin",
        "caption_index",
        "text_k",
        "text_v",
        "rows",
        "mask",
        "backend",
        "group_rows",
    )

    def __init__(
        self,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caption_index: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        kv: KVCache | None = None,
        start: int = 0,
        end: int = 0,
        mask: torch.Tensor | BlockMask | None = None,
        backend: str = "sdpa",
        rows: list[tuple[KVCache, int, int]] | None = None,
        group_rows: bool = False,
    ):
        self.cos, self.sin = cos, sin
        self.caption_index = caption_index
        self.text_k, self.text_v = text_k, text_v
        self.rows = rows if rows is not None else ([(kv, start, end)] if kv is not None else None)
        self.mask = mask
        self.backend = backend
        self.group_rows = group_rows  # rows of equal prefix length attend in one call


class CausalDiT(nn.Module):
    """The ShotStream generator network: patch embed, time/text embeddings, blocks, head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dit
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(
            d.in_dim, d.dim, kernel_size=d.patch_size, stride=d.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(d.text_dim, d.dim), nn.GELU(approximate="tanh"), nn.Linear(d.dim, d.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(d.freq_dim, d.dim), nn.SiLU(), nn.Linear(d.dim, d.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d.dim, d.dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(d.num_layers))
        self.head = Head(cfg)
        self.reset_rope("cpu")
        self.attn_backend = "sdpa"
        # Batched sessions: one attention call per prefix length instead of one per session
        # (an option, off until the GPU figures of bench/device show it wins).
        self.group_rows = False

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def reset_rope(self, device) -> None:
        """Rebuild the RoPE tables on `device` (after loading onto a meta-built module)."""
        cfg = self.cfg
        with torch.device(device):
            self.rope = RopeTables(
                cfg.dit.head_dim, cfg.rope_theta, cfg.rope_max_positions, cfg.rope_shot_phase
            )

    # -- inputs ---------------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, C, h, w) -> tokens (B, F*gh*gw, D); a linear map on (c, kh, kw)-flattened patches."""
        b, f, c, h, w = x.shape
        _, ph, pw = self.cfg.dit.patch_size
        gh, gw = h // ph, w // pw
        patches = x.view(b, f, c, gh, ph, gw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        patches = patches.reshape(b, f * gh * gw, c * ph * pw)
        weight = self.patch_embedding.weight.view(self.cfg.dit.dim, -1)
        return nn.functional.linear(patches, weight, self.patch_embedding.bias)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, F) -> e (B, F, D) and its modulation projection e0 (B, F, 6, D)."""
        b, f = t.shape
        dtype = self.dtype
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.dit.freq_dim).to(dtype))
        e0 = self.time_projection(e)
        return e.view(b, f, -1), e0.view(b, f, 6, -1)

    def embed_text(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """umT5 rows (..., T, text_dim), padding rows zero -> (..., T, D); padding stays attended."""
        return self.text_embedding(prompt_embeds.to(self.dtype))

    def text_kv(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of every layer for captions (B, S, T, text_dim): (L, B, S, T, H, d)."""
        c = self.embed_text(prompt_embeds)
        ks, vs = zip(*(blk.cross_attn.project_text(c) for blk in self.blocks), strict=True)
        return torch.stack(ks), torch.stack(vs)

    def rope_for(
        self, positions: torch.Tensor, flags: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope.cos_sin(positions, flags, self.cfg.grid_h, self.cfg.grid_w)

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """(B, F, gh*gw, ph*pw*C) with channel order (q, r, c) -> (B, F, C, h, w)."""
        b, f = out.shape[:2]
        _, ph, pw = self.cfg.dit.patch_size
        gh, gw, c = self.cfg.grid_h, self.cfg.grid_w, self.cfg.dit.out_dim
        out = out.view(b, f, gh, gw, ph, pw, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, f, c, gh * ph, gw * pw)

    # -- one pass -------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        pass_: Pass,
        need_output: bool = True,
        record: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Flow prediction v (B, F, C, h, w) for latents x at timesteps t (B, F).

        With `need_output=False` the pass only fills the cache: the last block stops after
        its K/V write and the head is skipped (prefill and refresh passes).
        """
        h = self.embed_patches(x.to(self.dtype))
        e, e0 = self.embed_time(t)
        if record is not None:
            record["patch_embed"] = h
            record["time_embedding"] = e.flatten(0, 1)
            record["time_projection"] = e0.flatten(0, 1).flatten(1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = block(h, e0, pass_, i, need_output=need_output or i < last)
            if record is not None:
                record[f"block{i}"] = h
        if not need_output:
            return None
        out = self.head(h, e)
        if record is not None:
            record["head"] = out
        return self.unpatchify(out)


def build_dit(cfg: ModelConfig, device="cpu", dtype=torch.float32, meta: bool = False) -> CausalDiT:
    """Construct the DiT (random init; load weights with model.weights)."""
    if meta:
        with torch.device("meta"):
            return CausalDiT(cfg)
    model = CausalDiT(cfg)
    return model.to(device=device, dtype=dtype)
