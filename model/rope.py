"""3-axis RoPE with ShotStream's shot-discontinuity indicator
(docs/design/generator.md §4).

Each head's channels form d/2 complex pairs, split into temporal / height / width
groups. The temporal angle is `p * w_j + flag * phase`: positions run contiguously
and the shot indicator is a constant phase per shot flag. Angles are computed in
float64; the rotation itself runs in float32 and is cast back to the activation dtype.
"""

from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (temporal, height, width): 22/21/21 for d=128, 6/5/5 for d=32."""
    pairs = head_dim // 2
    hw = pairs // 3
    return pairs - 2 * hw, hw, hw


def _axis_freqs(pairs: int, max_positions: int, theta: float) -> torch.Tensor:
    # w_j = theta^(-2j / (2 * pairs)), outer with integer positions, in float64
    inv = 1.0 / torch.pow(theta, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)


class RopeTables(torch.nn.Module):
    """Angle tables for positions 0..max_positions-1 on each axis (buffers, not weights)."""

    phase: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_positions: int, shot_phase: float):
        super().__init__()
        c_t, c_h, c_w = rope_split(head_dim)
        self.pairs = head_dim // 2
        self.shot_phase = shot_phase
        self.register_buffer("t_angles", _axis_freqs(c_t, max_positions, theta), persistent=False)
        self.register_buffer("h_angles", _axis_freqs(c_h, max_positions, theta), persistent=False)
        self.register_buffer("w_angles", _axis_freqs(c_w, max_positions, theta), persistent=False)
        # float32 on the tables' device: a host constant would be a host-to-device copy
        # inside every pass, which a CUDA graph capture refuses (model/graphs.py)
        self.register_buffer(
            "phase", torch.tensor([shot_phase], dtype=torch.float32), persistent=False
        )

    def _apply(self, fn, recurse=True):
        # Device moves only: the angle tables stay float64 whatever dtype the model takes.
        for name in ("t_angles", "h_angles", "w_angles", "phase"):
            table = getattr(self, name)
            self._buffers[name] = table.to(device=fn(table[:0]).device)
        return self

    def cos_sin(
        self, positions: torch.Tensor, flags: torch.Tensor, grid_h: int, grid_w: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, F*grid_h*grid_w, d/2) float32 of `angles`."""
        angles = self.angles(positions, flags, grid_h, grid_w)
        return torch.cos(angles).to(torch.float32), torch.sin(angles).to(torch.float32)

    def angles(
        self, positions: torch.Tensor, flags: torch.Tensor, grid_h: int, grid_w: int
    ) -> torch.Tensor:
        """Angles (B, F*grid_h*grid_w, d/2) float64 for frames at `positions` (F,) with
        shot `flags` (B, F), one row of flags per batched session.

        Tokens are frame-major, then row, then column. Indices are integer tensors on the
        tables' device, so this makes no host sync.
        """
        batch, n_frames = flags.shape
        # The phase is float32(flag) * float32(phase), then added to the float64 angle.
        phase = flags.to(torch.float32) * self.phase
        t = self.t_angles[positions] + phase.to(torch.float64)[..., None]  # (B, F, c_t)
        h = self.h_angles[:grid_h]  # (gh, c_h)
        w = self.w_angles[:grid_w]  # (gw, c_w)
        shape = (batch, n_frames, grid_h, grid_w)
        return torch.cat(
            [
                t[:, :, None, None, :].expand(*shape, -1),
                h[None, None, :, None, :].expand(*shape, -1),
                w[None, None, None, :, :].expand(*shape, -1),
            ],
            dim=-1,
        ).reshape(batch, n_frames * grid_h * grid_w, self.pairs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, L, H, d) by per-token angles (B or 1, L, d/2)."""
    b, n, h, d = x.shape
    xf = x.to(torch.float32).reshape(b, n, h, d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((re * c - im * s, re * s + im * c), dim=-1)
    return out.reshape(b, n, h, d).to(x.dtype)
