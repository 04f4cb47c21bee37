"""The last phase of the demo recipe: the VAE decoder fine-tuned on the generator's own latents.

Why. The DiT's x0 latents are not the encoder's: a 4-step sampler that was never distilled
lands near, not on, the latents of a clean frame, and a decoder trained only on the
encoder's latents turns that difference into soft edges, colour fringes and rounded
corners (the probe then reads a square as a circle). The decoder is the only reader of
the generator's latents: the context frames of later shots are re-encoded from decoded
pixels (docs/design/generator.md), so a sharper decode also hands later shots a cleaner
history. In the centred layout (training/render.py) every frame a chunk should show is a
function of its captions and of where it sits in its shot, so the decoder can be taught to
draw exactly that frame from the latents the generator really makes.

Data. The production generator (the weights of the phase before, exported and loaded as a
server would) runs `stories` training stories of three shots, each shot cut after one to
four chunks as streams are; every chunk's latents are recorded with the shot's `ClipKey`
and the pixel frame each latent frame stands for (the VAE is per-frame: latent frame j of a
shot is the image of pixel frame 4j). A quarter of each batch (`real_share`) is instead
the encoder's latents of rendered frames, so the decoder keeps decoding those.

The sharpen phase (the recipe's phase 11) runs the same step with `real_share` 1: the
encoder's latents of rendered frames only, no generator. Phase 1 trains the decoder for
only as long as the encoder needs; decoded round trips of held-out scenes still rounded
most wide squares into circles (the probe read 67 % of shapes right, `eval-demo
--round-trip`). A decoder trained on for longer draws their corners (99 %), and the
generator's chunks, which aim at the same latents, decode sharper with it.

Objective: L1 against the rendered frame, object pixels weighted up (as in phase 1). Only
the decoder and its post-quant conv train; the encoder, and with it every latent the DiT
was trained on, is unchanged. Every batch is a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from cache.kv import KVLayout
from cache.pool import StatePool
from model.generator import LoadedModel, ShotStreamGenerator
from model.vae import WanVAE
from training.render import (
    ClipKey,
    Geometry,
    Story,
    background_value,
    object_pixels,
    render_frames,
    sample_shot,
    stable_seed,
)
from training.vae_train import clip_frame_offsets, random_key
from training.vocab import Scene


@dataclass(frozen=True)
class DecoderTrainConfig:
    steps: int = 1500
    stories: int = 150  # generated training stories (about 1,100 chunks, 3,400 latent frames)
    lr: float = 5e-4
    warmup: int = 20
    frame_batch: int = 16
    real_share: float = 0.25  # share of a batch that is the encoder's latents of real frames
    object_weight: float = 4.0
    # the object weight also where the decoded frame shows an object the target does not
    # (its pixels off the background by more than `spill_threshold`): weighting the target's
    # object alone makes missing object pixels cost more than spilled ones, and the decoder
    # grows objects (wide shots read as close-ups)
    weight_spill: bool = False
    spill_threshold: float = 0.1
    grad_clip: float = 1.0
    # added to the run's seed for this phase's batches: the sharpen phase (real_share 1, no
    # generated stories) draws frames of its own instead of replaying the decoder phase's
    data_seed: int = 0


@dataclass(frozen=True)
class GeneratedFrame:
    latent: torch.Tensor  # (C, h, w) normalised, as the generator handed it to the decoder
    key: ClipKey
    offset: int  # the pixel frame of its shot it stands for


class _RecordingVAE:
    """The model's VAE, recording every chunk's latents on their way to the decoder."""

    def __init__(self, vae: WanVAE):
        self._vae = vae
        self.latents: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._vae, name)

    def decode_chunk(self, state, z: torch.Tensor) -> torch.Tensor:
        self.latents.append(z[0].detach().clone())
        return self._vae.decode_chunk(state, z)


def generated_frames(
    model: LoadedModel, scenes: list[Scene], tc: DecoderTrainConfig, seed: int, progress=None
) -> list[GeneratedFrame]:
    """Run the generator over `tc.stories` training stories; every latent frame it made."""
    cfg = model.cfg
    recorder = _RecordingVAE(model.vae)
    recording = dataclasses.replace(model, vae=recorder)
    pool = StatePool(
        KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    rng = random.Random(f"decoder:{seed}")
    out: list[GeneratedFrame] = []
    for i in range(tc.stories):
        scene = rng.choice(scenes)
        specs, colour = [], scene.colour
        for k in range(3):
            spec = sample_shot(rng, scene.background, colour, 0.1 if k == 0 else 0.5)
            colour = spec.turn or colour
            specs.append(spec)
        story = Story(scene, tuple(specs))
        lease = pool.acquire(f"decoder-{i}")
        try:
            gen = ShotStreamGenerator(
                recording, lease, story.global_caption, seed=stable_seed(seed, i, "decoder-story")
            )
            for s, text in enumerate(story.shot_captions):
                gen.start_shot(text)
                key = story.clip_key(s)
                for c in range(rng.choice((1, 2, 3, 4))):
                    gen.next_chunk()
                    z = recorder.latents.pop()
                    for f in range(z.shape[0]):
                        j = c * cfg.chunk_frames + f  # the latent frame's index in its shot
                        offset = clip_frame_offsets(cfg.vae, j + 1)[-1]
                        out.append(GeneratedFrame(z[f], key, offset))
        finally:
            pool.release(lease)
        if progress is not None:
            progress(i + 1)
    return out


def decoder_params(vae: WanVAE) -> list[torch.nn.Parameter]:
    return [*vae.model.decoder.parameters(), *vae.model.post_quant_conv.parameters()]


def make_decoder_optimizer(vae: WanVAE, tc: DecoderTrainConfig) -> torch.optim.Optimizer:
    vae.model.requires_grad_(False)
    params = decoder_params(vae)
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.99), weight_decay=0.0)


def lr_at(step: int, tc: DecoderTrainConfig) -> float:
    return tc.lr * min(1.0, (step + 1) / tc.warmup) * (0.1 + 0.9 * (1 - step / tc.steps))


def loss_weight(
    out: torch.Tensor, px: torch.Tensor, bg: torch.Tensor, tc: DecoderTrainConfig
) -> torch.Tensor:
    """Per-pixel L1 weight (B, 1, H, W) for decoded frames `out` against rendered frames
    `px` (B, 3, H, W) on backgrounds `bg` (B, 3): 1 + object_weight on the target's object,
    and with `weight_spill` also where `out` shows an object the target does not."""
    mask = object_pixels(px, bg)
    if tc.weight_spill:
        drawn = (out - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True)
        mask = torch.maximum(mask, (drawn > tc.spill_threshold).float())
    return 1.0 + tc.object_weight * mask


def decoder_step(
    vae: WanVAE,
    opt: torch.optim.Optimizer,
    data: list[GeneratedFrame],
    geo: Geometry,
    tc: DecoderTrainConfig,
    seed: int,
    step: int,
) -> dict[str, float]:
    """One optimiser step on generated and (a `real_share` of) encoded frames; with
    `real_share` 1 `data` may be empty (the sharpen phase)."""
    rng = random.Random(stable_seed(seed + tc.data_seed, step, "decoder-batch"))
    n_real = int(tc.frame_batch * tc.real_share)
    picks = [data[rng.randrange(len(data))] for _ in range(tc.frame_batch - n_real)]
    keys = [p.key for p in picks] + [random_key(rng) for _ in range(n_real)]
    offsets = [p.offset for p in picks] + [
        rng.randrange(0, geo.shot_frames, vae.cfg.temporal_stride) for _ in range(n_real)
    ]
    px = torch.cat([render_frames(k, geo, [o]) for k, o in zip(keys, offsets, strict=True)])
    latents = [p.latent for p in picks]
    if n_real:
        latents += list(vae.encode_frames(px[len(picks) :]).clone())
    z = torch.stack(latents)[:, :, None]  # (B, C, 1, h, w): each its own 1-frame clip
    for group in opt.param_groups:
        group["lr"] = lr_at(step, tc)
    out = vae.model.decode(vae.denormalize(z)).sample[:, :, 0]
    bg = torch.stack([background_value(k) for k in keys])
    weight = loss_weight(out.detach(), px, bg, tc)
    loss = ((out - px).abs() * weight).sum() / (weight.sum() * px.shape[1])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder_params(vae), tc.grad_clip)
    opt.step()
    return {"l1": float(loss.detach())}
