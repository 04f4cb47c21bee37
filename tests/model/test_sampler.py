"""The warped 4-step schedule, x0 conversion and re-noise (docs/design/generator.md §7)."""

from __future__ import annotations

import torch

from model.config import SamplerConfig
from model.sampler import FlowSchedule


def test_released_step_list_is_warped():
    sch = FlowSchedule(SamplerConfig())
    assert sch.step_timesteps == (1000.0, 957.9287719726562, 888.888916015625, 737.588623046875)
    assert sch.step_sigmas == (1.0, 0.9579287767410278, 0.8888888955116272, 0.73758864402771)
    assert sch.timesteps[0].item() == 1000.0
    assert abs(sch.timesteps[-1].item() - 7.9444) < 1e-3


def test_unwarped_list_for_undistilled_models():
    sch = FlowSchedule(
        SamplerConfig(
            shift=1.0, denoising_step_list=(1000, 750, 500, 250), warp_denoising_step=False
        )
    )
    assert sch.step_timesteps == (1000.0, 750.0, 500.0, 250.0)
    assert [round(s, 3) for s in sch.step_sigmas] == [1.0, 0.75, 0.5, 0.25]


def test_x0_and_renoise_invert_the_noising():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    s = 0.8888888955116272
    x_t = FlowSchedule.renoise(x0, eps, s)
    v = eps - x0
    assert torch.allclose(FlowSchedule.to_x0(x_t, v, s), x0, atol=1e-6)
