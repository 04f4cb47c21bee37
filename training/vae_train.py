"""Phase 1 of the demo recipe: the tiny Wan VAE (diffusers `AutoencoderKLWan`), from scratch.

The VAE is trained as a per-frame image autoencoder. `init_vae` zeroes every causal conv's
taps on earlier frames and starts the temporal down/up-sampling as "take the latest frame"
and "repeat", and training on single frames never moves them (their inputs are the zero
padding of a first frame). So latent frame j of a clip is exactly the image latent of pixel
frame 4j (`clip_frame_offsets`), and the DiT's training latents cost one image encode per
latent frame instead of a video encode of every pixel frame; the decoder holds each latent
frame for 4 pixel frames. Single frames at 64x96 cost ~45 ms each to train against ~60 ms
per frame in clips, and every one is a fresh image.

Objective: L1 reconstruction of rendered frames with object pixels weighted up (the object
is a few percent of the frame, but its colour and outline are what the demo must get
right), plus a tiny KL (beta 1e-6) on the sampled posterior. The posterior's log-variance
starts at `init_logvar` (std 0.05): PyTorch's default init gives std ~1, as large as the
signal, and the decoder then sees mostly noise and learns only the mean colour. Afterwards
the per-channel mean and std of the posterior mean are measured on rendered frames and
folded into the quant convs, so the exported VAE's normalised latents are unit scale with
latents_mean 0 and latents_std 1.

Every batch is a pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
)

from model.config import VAEConfig
from training.render import (
    ClipKey,
    Geometry,
    all_scenes,
    background_value,
    object_pixels,
    render_frames,
    sample_story,
    stable_seed,
)


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 10
    frame_batch: int = 16  # single rendered frames per step
    kl_weight: float = 1e-6
    object_weight: float = 4.0  # extra L1 weight on pixels that differ from the background
    grad_clip: float = 1.0
    init_logvar: float = -6.0  # posterior log-variance at init (std 0.05)
    stats_frames: int = 256  # rendered frames that measure the latent mean and std
    layout: str = "centred"  # where the rendered frames put the object (training/render.py)


def init_vae(model: AutoencoderKLWan, init_logvar: float = -6.0) -> None:
    """A per-frame image autoencoder to start from: variance-preserving convs, identity
    residual blocks (their last conv and the attention output start at zero), causal convs
    blind to earlier frames, temporal resampling as "latest frame" / "repeat", and a small
    posterior variance. With PyTorch's default init the base-4 VAE sits for hundreds of
    steps at the mean colour."""
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            torch.nn.init.zeros_(mod.bias)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, WanCausalConv3d) and mod.weight.shape[2] > 1:
                mod.weight[:, :, :-1].zero_()  # taps on earlier frames
            if isinstance(mod, WanResidualBlock):
                mod.conv2.weight.zero_()
            elif isinstance(mod, WanAttentionBlock):
                mod.proj.weight.zero_()
            elif isinstance(mod, WanResample) and hasattr(mod, "time_conv"):
                w = mod.time_conv.weight  # (out, in, 3, 1, 1), tap 2 = the current frame
                w.zero_()
                for o in range(w.shape[0]):
                    w[o, o % w.shape[1], -1, 0, 0] = 1.0
        z = model.config.z_dim
        model.quant_conv.bias[z:] = init_logvar


def clip_frame_offsets(cfg: VAEConfig, latent_frames: int) -> list[int]:
    """Pixel frames whose image latents are a clip's latent frames, for a per-frame VAE."""
    return [cfg.temporal_stride * j for j in range(latent_frames)]


def _step_rng(seed: int, step: int, what: str) -> random.Random:
    return random.Random(f"{what}:{seed}:{step}")


def random_key(rng: random.Random) -> ClipKey:
    story = sample_story(rng, 1, all_scenes(), first_turn_prob=0.0)
    return story.clip_key(0)


def vae_batch(
    seed: int, step: int, geo: Geometry, cfg: VAETrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single frames (B, 3, 1, H, W) and their background colours (B, 3), both in [-1, 1]."""
    rng = _step_rng(seed, step, "vae")
    frames, bgs = [], []
    for _ in range(cfg.frame_batch):
        key = random_key(rng)
        frames.append(render_frames(key, geo, [rng.randrange(geo.shot_frames)])[0])
        bgs.append(background_value(key))
    return torch.stack(frames)[:, :, None].contiguous(), torch.stack(bgs)


def lr_at(step: int, cfg: VAETrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, p))))


def vae_loss(
    model: AutoencoderKLWan, x: torch.Tensor, bg: torch.Tensor, cfg: VAETrainConfig, gen=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted L1 + beta KL of one batch (x (B, 3, T, H, W), bg (B, 3))."""
    posterior = model.encode(x).latent_dist
    z = posterior.sample(generator=gen)
    out = model.decode(z).sample
    weight = 1.0 + cfg.object_weight * object_pixels(x, bg)
    l1 = ((out - x).abs() * weight).sum() / (weight.sum() * x.shape[1])
    kl = posterior.kl().mean() / z[0].numel()
    loss = l1 + cfg.kl_weight * kl
    return loss, {"l1": float(l1.detach()), "kl": float(kl.detach())}


def train_vae_step(
    model: AutoencoderKLWan,
    opt: torch.optim.Optimizer,
    seed: int,
    step: int,
    geo: Geometry,
    cfg: VAETrainConfig,
) -> dict[str, float]:
    """One optimiser step (data and posterior noise keyed by (seed, step))."""
    x, bg = vae_batch(seed, step, geo, cfg)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    gen = torch.Generator().manual_seed(stable_seed(seed, step, "vae-noise"))
    loss, logs = vae_loss(model, x, bg, cfg, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return logs


def make_optimizer(model: torch.nn.Module, cfg: VAETrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)


@torch.no_grad()
def latent_stats(
    model: AutoencoderKLWan, geo: Geometry, seed: int, frames: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior mean over rendered frames."""
    rng = random.Random(f"stats:{seed}")
    x = torch.cat(
        [
            render_frames(random_key(rng), geo, [rng.randrange(geo.shot_frames)])
            for _ in range(frames)
        ]
    )
    mu = torch.cat([model.encode(b[:, :, None]).latent_dist.mode() for b in x.split(32)])
    mu = mu.transpose(0, 1).flatten(1)  # (C, N*h*w)
    return mu.mean(dim=1), mu.std(dim=1).clamp_min(1e-4)


@torch.no_grad()
def fold_normalisation(model: AutoencoderKLWan, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make the posterior mean unit-scale in place: mu' = (mu - mean) / std out of quant_conv,
    and post_quant_conv(std * mu' + mean) on the way back; exact, so latents_mean 0, std 1."""
    z = mean.numel()
    q = model.quant_conv
    q.weight[:z] /= std.view(-1, 1, 1, 1, 1)
    q.bias[:z] = (q.bias[:z] - mean) / std
    pq = model.post_quant_conv
    w = pq.weight[:, :, 0, 0, 0].clone()  # (out, in)
    pq.bias += w @ mean
    pq.weight.mul_(std.view(1, -1, 1, 1, 1))
