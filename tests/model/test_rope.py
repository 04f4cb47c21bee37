"""RoPE with the shot indicator: the spec's split and worked example."""

from __future__ import annotations

import pytest
import torch

from model.config import PRESETS
from model.rope import RopeTables, apply_rope, rope_split


@pytest.mark.parametrize("d, split", [(128, (22, 21, 21)), (64, (12, 10, 10)), (32, (6, 5, 5))])
def test_split(d, split):
    assert rope_split(d) == split


def test_worked_example_real_size():
    """Shot 3, chunk 2, middle frame (p=13), row 10, column 20 (docs/design/generator.md §4)."""
    cfg = PRESETS["wan2.1-1.3b"]
    tables = RopeTables(
        cfg.dit.head_dim, cfg.rope_theta, cfg.rope_max_positions, cfg.rope_shot_phase
    )
    positions = torch.arange(12, 15)  # chunk 2: 6 + 3*2 .. +2
    flags = torch.full((1, 3), 3)
    ang = tables.angles(positions, flags, cfg.grid_h, cfg.grid_w)[0]
    token = 1 * cfg.tokens_per_frame + 10 * cfg.grid_w + 20  # middle frame of the chunk
    a = ang[token]
    assert a[0].item() == pytest.approx(13.5, abs=1e-6)
    assert a[1].item() == pytest.approx(9.05313, abs=1e-5)
    assert a[21].item() == pytest.approx(0.501976, abs=1e-6)
    assert a[22].item() == pytest.approx(10.0, abs=1e-9)
    assert a[23].item() == pytest.approx(6.449467, abs=1e-6)
    assert a[42].item() == pytest.approx(0.0015505, abs=1e-7)
    assert a[44].item() == pytest.approx(12.898934, abs=1e-6)


def test_phase_is_float32_product():
    """flag 5 gives float32(5) * float32(1/6) = 0.8333333730697632, not float32(5/6)."""
    tables = RopeTables(32, 10000.0, 16, 1 / 6)
    ang = tables.angles(torch.tensor([0]), torch.tensor([[5]]), 1, 1)
    assert ang[0, 0, 0].item() == 0.8333333730697632


def test_scores_depend_on_flag_differences_only():
    """Adding a constant to every flag leaves q.k unchanged (docs/design/generator.md §4)."""
    torch.manual_seed(0)
    tables = RopeTables(32, 10000.0, 64, 1 / 6)
    q, k = torch.randn(1, 24, 2, 32), torch.randn(1, 24, 2, 32)
    pos = torch.tensor([3, 7])

    def scores(shift):
        cos, sin = tables.cos_sin(pos, torch.tensor([[1 + shift, 4 + shift]]), 3, 4)
        return torch.einsum("bqhd,bkhd->bhqk", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    assert torch.allclose(scores(0), scores(9), atol=1e-5)
    assert not torch.allclose(scores(0), torch.einsum("bqhd,bkhd->bhqk", q, k), atol=1e-3)


def test_tables_stay_float64_when_model_is_cast():
    tables = RopeTables(32, 10000.0, 16, 1 / 6).to(torch.bfloat16)
    assert tables.t_angles.dtype == torch.float64
