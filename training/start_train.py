"""Phases 3 to 9 of the demo recipe: the first chunk of a shot learns to place the object
where its noise says (3), and to keep it there through the sampler's later steps (4);
phases 5 and 6 repeat 4 with the object's latent pixels weighted up (`object_weight`), 6 on
longer stories with more colour turns; phase 7 repeats 5 in the centred layout
(training/render.py), where every shot starts with the object at the frame's centre, so the
noise places nothing (`noise_start` serves the anchored layout of phases 3 to 6 only);
phase 8 repeats 7 at a lower learning rate, phase 9 at a lower one still with the motion
term below.

Why. The DiT has no absolute position: RoPE is relative, and at sigma = 1 the first chunk of
a shot sees only noise, a context of identical (zero or other-shot) frames and text. Such a
network cannot put an object at a fixed anchor; the x0-MSE optimum it can reach is the
average over places, a flat field (checked: after the teacher-forced phase the first step
draws the right background and no object). The sampler then re-noises with fresh noise, so
the later steps see no object either, and none ever appears. A distilled student maps
noise to a committed sample; this phase teaches the same thing directly, with a placement
rule a position-blind network can compute: the object's first-frame centre is the centre
of the DiT token (patch) whose 2x2-pooled channel-0 noise in the chunk's first latent
frame is the largest (`noise_start`). Training is x0-MSE on the first chunk of sampled
shots (history and captions as in phase 2), the target rendered from that start and moving
as its caption says; phase 3 uses sigma = 1 only. Phase 4 mixes in the later levels: their
input is re-noised with fresh noise (the placement noise would tell them where the object
is; the sampler's never does) from the clean chunk faded toward its mean (`fade_min`), so
a faint first-step object is kept where it is. (Feeding them the model's own chain instead,
as phase 2's `unroll_prob` does, was tried: the target's place is then invisible to them
and they learn to erase; StartTrainer refuses `unroll_prob`.) Phase 4 trains the whole shot
(`whole_shot`): the target is rendered from the first chunk's noise start and goes on as its
caption says, and later chunks, at any level, see fresh noise and the clean history. Without
them the placement rule leaked into later chunks, which are not trained in phase 3: each
chunk put the object anew where its own noise said, so it jumped from chunk to chunk.

Three options aim at motion (all off by default; in the anchored layout none made objects
move as their captions say; phase 9 of the full recipe, in the centred layout, uses the
first and the third, with per-chunk motion 0.48 -> 0.52 on the held-out stories):
`motion_weight` adds the error of each chunk's frame-to-frame change to the loss,
`onset_prob` trains shots that start moving at a later chunk from a still history (the
still chunks carry no loss), and `freeze_prob` hands later levels a still object (the
chunk's first frame held) while the target moves.

One option aims at shape (off in both recipes): `round_prob` hands later levels the same
shot with its object drawn as a circle (same place, size, colour and motion) while the
target keeps the caption's shape, so the later steps learn to put back corners that a
first step drew round. An undertrained DiT draws most squares and many triangles round.
In the quick recipe's last phase (model card) it raised shape from 0.53-0.55 to 0.66-0.68
over two draws of stories, and lowered switches and framing.

Every batch is a pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from training.dit_train import Batch, DiTTrainer, Example, build_batch, encode_text
from training.render import stable_seed
from training.teacher_forcing import shot_blocks


def noise_start(eps0: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Object centres (B, 2) as (x, y) pixels for first-frame noise latents (B, C, h, w): the
    centre of the token whose mean channel-0 noise is the largest."""
    _, ph, pw = cfg.dit.patch_size
    pooled = F.avg_pool2d(eps0[:, :1], (ph, pw))[:, 0]  # (B, grid_h, grid_w)
    idx = pooled.flatten(1).argmax(dim=1)
    ty, tx = idx // cfg.grid_w, idx % cfg.grid_w
    cell_h, cell_w = cfg.height / cfg.grid_h, cfg.width / cfg.grid_w
    return torch.stack([(tx + 0.5) * cell_w, (ty + 0.5) * cell_h], dim=1).to(torch.float64)


class StartTrainer(DiTTrainer):
    """Phases 3 to 6: the first chunk (or, with `whole_shot`, every chunk) at the phase's
    levels, the target shot placed by `noise_start` of the first chunk's noise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tc.unroll_prob:
            raise ValueError("start_train does not unroll the chain (see the module docstring)")
        cfg = self.cfg
        self.n_chunks = (self.tc.train_chunks or cfg.chunks_per_shot) if self.tc.whole_shot else 1
        if self.n_chunks > cfg.chunks_per_shot:
            raise ValueError(f"train_chunks {self.n_chunks} > chunks_per_shot")
        self.mask = shot_blocks(
            cfg.context_frames, self.n_chunks, cfg.chunk_frames, cfg.tokens_per_frame
        )

    def noise(self, step: int) -> torch.Tensor:
        """The first chunk's sigma = 1 input (B, chunk_frames, C, h, w)."""
        gen = torch.Generator().manual_seed(stable_seed(self.seed, step, "start-noise"))
        shape = (self.tc.batch, self.cfg.chunk_frames, *self.cfg.latent_shape)
        return torch.randn(shape, generator=gen)

    def examples(self, step: int) -> list[Example]:
        out = super().examples(step)
        if not self.tc.still_only:
            return out
        still = []
        for ex in out:
            shots = ex.story.shots[:-1] + (replace(ex.story.shots[-1], motion="still"),)
            still.append(replace(ex, story=replace(ex.story, shots=shots)))
        return still

    def _prepare(self, step: int) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        examples = self.examples(step)
        eps = self.noise(step)
        keys = [ex.story.clip_key(len(ex.story.shots) - 1) for ex in examples]
        if self.tc.layout == "anchored":  # the first version: the noise places the object
            starts = noise_start(eps[:, 0], self.cfg).tolist()
            keys = [k._replace(start=(x, y)) for k, (x, y) in zip(keys, starts, strict=True)]
        keys, weight = self.onsets(step, keys)
        frames = self.n_chunks * self.cfg.chunk_frames
        batch = build_batch(examples, self.cfg, self.cache, self.tokenizer, keys, frames)
        rounds = None
        if self.tc.round_prob:  # the same shots with the object drawn as a circle
            circles = [k._replace(shape="circle") for k in keys]
            rounds = torch.stack(self.cache.clips(circles, frames))
        return batch, eps, weight, rounds

    def onsets(self, step: int, keys: list) -> tuple[list, torch.Tensor]:
        """With `onset_prob` (whole shots only), moving target shots that start moving at a
        later chunk c (the object still through chunk c - 1, moved from chunk c's first
        frame on), and the per-chunk loss weights (B, n_chunks) that leave chunks before c
        out."""
        weight = torch.ones(len(keys), self.n_chunks)
        if not self.tc.onset_prob or self.n_chunks < 2:
            return keys, weight
        rng = random.Random(stable_seed(self.seed, step, "start-onset"))
        cf, out = self.cfg.chunk_frames, []
        for i, key in enumerate(keys):
            if key.motion != "still" and rng.random() < self.tc.onset_prob:
                c = rng.randint(1, self.n_chunks - 1)
                key = key._replace(onset=self.cache.offsets[c * cf - 1])
                weight[i, :c] = 0.0
            out.append(key)
        return out, weight

    def sigmas(self, step: int, b: int) -> torch.Tensor:
        """Per-chunk noise levels (B, n_chunks): each one of the sampler's levels, drawn with
        the phase's `level_weights` (sigma = 1 of the first chunk is the point of the
        phases; the other levels keep the later steps following an object wherever the
        first one put it, and later chunks following their history)."""
        gen = torch.Generator().manual_seed(stable_seed(self.seed, step, "start-sigma"))
        weights = torch.tensor(self.tc.level_weights, dtype=torch.float32)
        drawn = torch.multinomial(weights, b * self.n_chunks, replacement=True, generator=gen)
        return self.levels[drawn].view(b, self.n_chunks)

    def loss(self, prepared, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch, eps, weight, rounds = prepared
        b, cf = eps.shape[0], self.cfg.chunk_frames
        sigma = self.sigmas(step, b)  # (B, n_chunks)
        s = self.per_frame(sigma)
        base = batch.clean
        if rounds is not None:
            # a later level that was handed a round object where the caption's has corners
            gen = torch.Generator().manual_seed(stable_seed(self.seed, step, "start-round"))
            swap = (torch.rand(sigma.shape, generator=gen) < self.tc.round_prob) & (sigma < 1)
            base = torch.where(self.per_frame(swap), rounds, base)
        if self.tc.freeze_prob:
            # a later level that was handed a still object: its chunk's first frame held
            # through the chunk, the target still moving as the caption says
            gen = torch.Generator().manual_seed(stable_seed(self.seed, step, "start-freeze"))
            frozen = (torch.rand(sigma.shape, generator=gen) < self.tc.freeze_prob) & (sigma < 1)
            chunks = base.view(b, -1, cf, *base.shape[2:])
            held = chunks[:, :, :1].expand_as(chunks).reshape(base.shape)
            pick = self.per_frame(frozen)
            base = torch.where(pick, held, base)
        if self.tc.fade_min < 1:
            gen = torch.Generator().manual_seed(stable_seed(self.seed, step, "start-fade"))
            u = torch.rand(sigma.shape, generator=gen)
            keep = self.tc.fade_min + (1 - self.tc.fade_min) * u
            keep = self.per_frame(torch.where(sigma < 1, keep, 1.0))
            field = base.mean(dim=(3, 4), keepdim=True)
            base = keep * base + (1 - keep) * field
        # Only the first chunk at sigma = 1 sees the placement noise; every other input is
        # re-noised with fresh noise, as in the sampler: the object itself (or the history,
        # for later chunks) must tell them where it is, never the noise.
        gen = torch.Generator().manual_seed(stable_seed(self.seed, step, "start-renoise"))
        noise = torch.randn(batch.clean.shape, generator=gen)
        placing = (sigma[:, 0] == 1)[:, None, None, None, None]
        noise[:, :cf] = torch.where(placing, eps, noise[:, :cf])
        noisy = (1 - s) * base + s * noise
        prompt = encode_text(self.text, batch.ids, batch.mask)
        return self.x0_loss(batch, noisy, sigma, prompt, weight)
