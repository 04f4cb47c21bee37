"""Few-step flow-matching schedule of the distilled student
(docs/design/generator.md §7).

Noising is x_t = (1 - s) x0 + s eps, the network predicts v = eps - x0, and every step
predicts x0 then re-noises it to the next level with fresh noise (DMD-style sampling).
"""

from __future__ import annotations

import torch

from model.config import SamplerConfig


class FlowSchedule:
    """The shifted 1000-step schedule and the (warped) few-step list actually used."""

    def __init__(self, cfg: SamplerConfig):
        n = cfg.num_train_timesteps
        raw = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:n]
        self.sigmas = cfg.shift * raw / (1 + (cfg.shift - 1) * raw)
        self.timesteps = self.sigmas * n
        nominal = torch.tensor(cfg.denoising_step_list, dtype=torch.float32)
        if cfg.warp_denoising_step:
            # Index the schedule (with a final 0 appended) at n - nominal.
            padded = torch.cat([self.timesteps, torch.zeros(1)])
            steps = padded[(n - nominal).long()]
        else:
            steps = nominal
        # Host-side floats, fixed per preset: the hot path never looks them up on device.
        self.step_timesteps: tuple[float, ...] = tuple(float(t) for t in steps)
        self.step_sigmas: tuple[float, ...] = tuple(self.sigma_at(t) for t in self.step_timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.step_timesteps)

    def sigma_at(self, t: float) -> float:
        """sigma of the schedule entry whose timestep is nearest to t."""
        return float(self.sigmas[torch.argmin((self.timesteps - t).abs())])

    @staticmethod
    def to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 = x_t - sigma * v, evaluated in float64 and cast back."""
        return (x_t.double() - sigma * flow.double()).to(x_t.dtype)

    @staticmethod
    def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma_next: float) -> torch.Tensor:
        """(1 - s) x0 + s eps, mixed in float32 and cast back."""
        mixed = (1 - sigma_next) * x0.float() + sigma_next * noise.float()
        return mixed.to(x0.dtype)
