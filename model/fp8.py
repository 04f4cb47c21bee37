"""FP8 linear layers for the DiT blocks: an option, kept only if the GPU run shows it faster
and within the bf16 drift bound (bench/device, stages golden and dit).

Weights are stored in float8 e4m3 with one scale per output channel; activations are
quantized per token at run time (its own amax), and the product runs in `torch._scaled_mm`
with both scale vectors, accumulating in higher precision and writing the model's dtype.
No dependency beyond torch (torchao does the same with more choices).
"""

from __future__ import annotations

import torch
from torch import nn

from model.dit import CausalDiT

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8 values, float32 scale (M, 1)) with x ~= values * scale."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(nn.Module):
    """A frozen nn.Linear run in FP8: y = (xq * sx) (wq * sw)^T + b."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w, scale = _quantize_rows(linear.weight.detach())
        self.register_buffer("weight", w)  # (out, in) float8
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out) float32
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        pad = -rows % 16  # the CUDA kernels want row counts in multiples of 16
        if pad:
            x2 = torch.cat([x2, x2.new_zeros(pad, self.in_features)])
        xq, xs = _quantize_rows(x2)
        y = torch._scaled_mm(
            xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=self.out_dtype
        )
        if pad:
            y = y[:rows]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def quantize_dit_linears(dit: CausalDiT) -> int:
    """Swap the linear layers of every DiT block (attention projections, feed-forward) for
    Float8Linear, in place; embeddings, modulation and head stay. Returns how many."""
    swapped = 0
    for block in dit.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Float8Linear(child))
                    swapped += 1
    return swapped
