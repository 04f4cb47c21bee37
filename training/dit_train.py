"""Phase 2 of the demo recipe: the causal student and the umT5 encoder, trained jointly by
teacher-forced flow matching (docs/design/generator.md §12).

One example is one shot of a story with its history: the context frames are picked from
the earlier shots exactly as at inference (`select_context`, cut lengths included), encoded
as 1-frame clips, and flagged and captioned as the generator does; the first shot (and 10 %
of later ones) gets six zero latents. `teacher_forced_flow` runs
[context | clean shot | noisy shot] in one forward with the inference attention pattern.

Objective: each 3-frame chunk gets its own noise level, drawn from the sampler's four levels
(80 %; sigma = 1 twice as often as each of the others) or uniformly (20 %); the loss is the
x0 error of the sampler's own x0 = x_t - sigma v, weighted 1/sigma per chunk. The few-step
sampler consumes x0 predictions at exactly these levels; the high-noise ones decide colour,
shape and position, which plain x0-MSE weights most, and 1/sigma keeps enough weight on the
last level, which sets the final detail (plain flow matching, 1/sigma^2, would spend most of
a small budget there).

Every example is a pure function of (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import UMT5EncoderModel

from model.config import ModelConfig
from model.context import caption_rows, select_context
from model.dit import CausalDiT
from model.text import CaptionSpec, pad_ids, tokenize_caption
from model.vae import WanVAE
from training.render import (
    ClipKey,
    Geometry,
    Story,
    background_value,
    object_pixels,
    render_frames,
    sample_story,
    stable_seed,
)
from training.teacher_forcing import shot_blocks, teacher_forced_flow
from training.vae_train import clip_frame_offsets
from training.vocab import Scene


@dataclass(frozen=True)
class DiTTrainConfig:
    steps: int = 1000
    batch: int = 8
    lr: float = 1.5e-3
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # added to the run's seed for this phase's batches and noise: batches are keyed by
    # (seed, step), so a phase with its own offset draws stories the phases before it
    # did not (0: the run's own seed, as every phase of the first two versions)
    data_seed: int = 0
    level_prob: float = 0.8  # chance a chunk's sigma is one of the sampler's levels
    # how often each level is drawn when it is: the first (sigma 1, only text and context to
    # go on) sets colour and layout for the others and is the slowest to learn
    level_weights: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    # chance a chunk at a later sampler level is noised from the model's own x0 of the level
    # before (a no-grad run of the sampler's chain), not from the true x0: the later steps
    # then learn to correct the first step's errors instead of copying them (0: off)
    unroll_prob: float = 0.0
    turn_prob: float = 0.4  # later shots that recolour the object
    first_turn_prob: float = 0.1
    drop_context: float = 0.1  # later shots trained with zero context (as the reference)
    full_shot_prob: float = 0.5  # an earlier shot ran its full length (else it was cut)
    # number of earlier shots 0, 1, 2, ... (more than 6 gives every context frame its own shot)
    history_weights: tuple[float, ...] = (0.3, 0.25, 0.17, 0.12, 0.08, 0.05, 0.03)
    still_only: bool = False  # start_train: every target shot stays still
    # start_train, levels after the first: the clean input is faded toward its own spatial
    # mean by a factor drawn from [fade_min, 1], so a faint first-step object is kept and
    # sharpened where it is (1: off)
    fade_min: float = 1.0
    # start_train: train every chunk of the target shot, not only the first; later chunks
    # (fresh noise at any level) learn to follow their history rather than their noise
    whole_shot: bool = False
    # weight of the motion term: the error of the frame-to-frame change within each chunk,
    # (x0[t] - x0[t-1]) - (clean[t] - clean[t-1]), weighted 1/sigma like the x0 error; a
    # displacement of a few pixels per latent frame is a small part of the plain x0 error,
    # so the plain objective lets a still object pass for a moving one (0: off)
    motion_weight: float = 0.0
    # start_train with whole_shot: chance a moving target shot stands still for its first
    # chunks and starts moving at a later one (uniform); the still chunks are history only
    # (no loss), so a chunk learns to start the caption's motion from a still history, as it
    # must when an earlier chunk came out still (0: off)
    onset_prob: float = 0.0
    # start_train, levels after the first: chance a chunk's clean input is its first frame
    # held through the chunk (a still object) while the target moves as its caption says, so
    # the later steps learn to add the motion a still first step left out (0: off)
    freeze_prob: float = 0.0
    # start_train, levels after the first: chance a chunk's clean input draws the object as a
    # circle (same place, size, colour and motion) while the target keeps the caption's
    # shape, so the later steps learn to put back the corners of a first step that drew a
    # round blob; undertrained DiTs draw most squares and many triangles round (0: off)
    round_prob: float = 0.0
    # extra x0-error weight on latent pixels the object covers (its rendered coverage pooled
    # to the latent grid and dilated by one latent pixel): the object is a small part of the
    # frame, so the plain objective learns the background long before the object's colour
    # (0: off)
    object_weight: float = 0.0
    # start_train with whole_shot: chunks of the target shot trained per example (0: all of
    # them); later chunks differ from the second only in how much history they see
    train_chunks: int = 0
    # where shots put the object (training/render.py): "anchored" for the first version's
    # phases (and, in start_train, a first chunk placed where its noise says)
    layout: str = "centred"


@dataclass(frozen=True)
class Example:
    """One training shot: the story up to and including it, and how long earlier shots ran."""

    story: Story  # its last shot is the target
    prev_chunks: tuple[int, ...]  # chunks each earlier shot produced before it was cut
    drop_context: bool


def sample_example(
    rng: random.Random, scenes: list[Scene], cfg: ModelConfig, tc: DiTTrainConfig
) -> Example:
    n_prev = rng.choices(range(len(tc.history_weights)), weights=tc.history_weights)[0]
    story = sample_story(rng, n_prev + 1, scenes, tc.turn_prob, tc.first_turn_prob)
    full = cfg.chunks_per_shot
    prev = tuple(
        full if rng.random() < tc.full_shot_prob else rng.randint(1, full - 1)
        for _ in range(n_prev)
    )
    return Example(story, prev, n_prev > 0 and rng.random() < tc.drop_context)


def chunk_pixels(cfg: ModelConfig, chunks: int) -> int:
    return sum(cfg.chunk_pixel_frames(c) for c in range(chunks))


class LatentCache:
    """Latents of rendered shots and single frames, encoded once with the frozen VAE.

    The VAE is per-frame (vae_train), so a shot's latent frame j is the image latent of its
    pixel frame 4j, and every latent here is an image encode. A frame's pixels depend only
    on (ClipKey, offset), so each is encoded once, with its `object_mask`. Thread-safe: a
    prefetch thread fills it while training runs.
    """

    def __init__(self, vae: WanVAE, geo: Geometry, latent_frames: int):
        self.vae, self.geo = vae, geo
        self.offsets = clip_frame_offsets(vae.cfg, latent_frames)
        self._frames: dict[tuple[ClipKey, int], torch.Tensor] = {}
        self._masks: dict[tuple[ClipKey, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._frames)

    def clips(self, keys: list[ClipKey], latent_frames: int | None = None) -> list[torch.Tensor]:
        """Normalised latents (F, C, h, w) of whole shots (or of their first latent frames)."""
        offsets = self.offsets[:latent_frames]
        lat = self.frames([(k, o) for k in keys for o in offsets])
        n = len(offsets)
        return [torch.stack(lat[i * n : (i + 1) * n]) for i in range(len(keys))]

    def masks(self, keys: list[ClipKey], latent_frames: int | None = None) -> list[torch.Tensor]:
        """Object masks (F, 1, h, w) of the frames `clips` returns (they must be cached)."""
        offsets = self.offsets[:latent_frames]
        return [torch.stack([self._masks[(k, o)] for o in offsets])[:, None] for k in keys]

    def frames(self, wanted: list[tuple[ClipKey, int]]) -> list[torch.Tensor]:
        """Normalised latents (C, h, w) of single frames, each encoded as a 1-frame clip."""
        missing = list(dict.fromkeys(w for w in wanted if w not in self._frames))
        by_key: dict[ClipKey, list[int]] = {}
        for k, o in missing:
            by_key.setdefault(k, []).append(o)
        if missing:
            px = torch.cat([render_frames(k, self.geo, offs) for k, offs in by_key.items()])
            order = [(k, o) for k, offs in by_key.items() for o in offs]
            lat = torch.cat([self.vae.encode_frames(b).clone() for b in px.split(64)])
            bg = torch.stack([background_value(k) for k, offs in by_key.items() for _ in offs])
            masks = object_mask(px, bg, self.vae.cfg.spatial_stride)
            with self._lock:
                self._frames.update(zip(order, lat, strict=True))
                self._masks.update(zip(order, masks, strict=True))
        return [self._frames[w] for w in wanted]


def object_mask(px: torch.Tensor, bg: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, h, w) weights in 0..1 for frames px (N, 3, H, W) on backgrounds bg (N, 3): the
    fraction of each latent pixel's stride x stride patch the object covers, dilated by one
    latent pixel (the encoder spreads an object's edge into its neighbours)."""
    frac = F.avg_pool2d(object_pixels(px, bg), stride)
    return F.max_pool2d(frac, 3, stride=1, padding=1)[:, 0]


@dataclass
class Batch:
    context: torch.Tensor  # (B, Fc, C, h, w)
    context_flags: torch.Tensor  # (B, Fc)
    clean: torch.Tensor  # (B, Fs, C, h, w)
    gen_flag: torch.Tensor  # (B,)
    ids: torch.Tensor  # (B, S, T) caption token ids, padded
    mask: torch.Tensor  # (B, S, T)
    caption_index: torch.Tensor  # (B, Fc + Fs)
    object_mask: torch.Tensor  # (B, Fs, 1, h, w) `object_mask` of the clean shot


def build_batch(
    examples: list[Example],
    cfg: ModelConfig,
    cache: LatentCache,
    tokenizer,
    targets: list[ClipKey] | None = None,
    target_frames: int | None = None,
) -> Batch:
    """Latents, flags, caption rows and token ids of a batch, laid out as the generator does.

    `targets` replaces the last shots' keys (same captions, other placements);
    `target_frames` keeps only the first latent frames of each target shot."""
    n_ctx = cfg.context_frames
    n_shot = target_frames or cfg.latent_frames_per_shot
    keys = targets or [ex.story.clip_key(len(ex.story.shots) - 1) for ex in examples]
    targets = cache.clips(keys, target_frames)
    rows_of, picks_of = [], []
    for ex in examples:
        s = len(ex.story.shots) - 1
        picks = (
            []
            if ex.drop_context
            else select_context([chunk_pixels(cfg, c) for c in ex.prev_chunks], n_ctx)
        )
        picks_of.append(picks)
        rows_of.append(caption_rows(picks, s)[0])
    wanted = [
        (ex.story.clip_key(p.shot), p.offset)
        for ex, picks in zip(examples, picks_of, strict=True)
        for p in picks
    ]
    frame_lat = iter(cache.frames(wanted))
    b, n_rows = len(examples), max(len(r) for r in rows_of)
    z = torch.zeros(b, n_ctx, *cfg.latent_shape)
    flags = torch.zeros(b, n_ctx, dtype=torch.long)
    caption_index = torch.zeros(b, n_ctx + n_shot, dtype=torch.long)
    ids = torch.zeros(b, n_rows, cfg.text.text_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (ex, picks, rows) in enumerate(zip(examples, picks_of, rows_of, strict=True)):
        for j, p in enumerate(picks):
            z[i, j] = next(frame_lat)
            flags[i, j] = p.shot
            caption_index[i, j] = rows.index(p.shot)
        caption_index[i, n_ctx:] = len(rows) - 1
        texts = ex.story.shot_captions
        for r, shot in enumerate(rows):
            spec = CaptionSpec(ex.story.global_caption, shot, texts[shot])
            tc = tokenize_caption(tokenizer, spec, cfg.text.text_len)
            row_ids, row_mask = pad_ids(tc.ids, cfg.text.text_len, tokenizer.pad_token_id)
            ids[i, r], mask[i, r] = torch.tensor(row_ids), torch.tensor(row_mask)
    objects = torch.stack(cache.masks(keys, target_frames))
    return Batch(
        z, flags, torch.stack(targets), flags[:, -1] + 1, ids, mask, caption_index, objects
    )


def encode_text(text: UMT5EncoderModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, T) ids -> (B, S, T, d) embeddings with rows past each caption's length zeroed
    (as `TextEncoder.encode_ids`); empty rows (batch padding) come out all zero."""
    b, s, t = ids.shape
    flat_ids, flat_mask = ids.view(b * s, t), mask.view(b * s, t)
    used = flat_mask.sum(dim=1) > 0
    out = torch.zeros(b * s, t, text.config.d_model)
    hidden = text(input_ids=flat_ids[used], attention_mask=flat_mask[used]).last_hidden_state
    out[used] = hidden * flat_mask[used, :, None].to(hidden.dtype)
    return out.view(b, s, t, -1)


def lr_at(step: int, tc: DiTTrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, p))))


class DiTTrainer:
    """Owns the two networks, their optimiser and the data pipeline of phase 2."""

    def __init__(
        self,
        cfg: ModelConfig,
        dit: CausalDiT,
        text: UMT5EncoderModel,
        vae: WanVAE,
        tokenizer,
        scenes: list[Scene],
        tc: DiTTrainConfig,
        seed: int,
    ):
        self.cfg, self.dit, self.text, self.tc, self.seed = cfg, dit, text, tc, seed
        self.tokenizer, self.scenes = tokenizer, scenes
        self.geo = Geometry.for_config(cfg, tc.layout)
        self.cache = LatentCache(vae, self.geo, cfg.latent_frames_per_shot)
        params = [*dit.parameters(), *text.parameters()]
        self.opt = torch.optim.AdamW(
            params, lr=tc.lr, betas=(0.9, 0.99), weight_decay=tc.weight_decay
        )
        self.params = params
        self.mask = shot_blocks(
            cfg.context_frames, cfg.chunks_per_shot, cfg.chunk_frames, cfg.tokens_per_frame
        )
        self.levels = torch.tensor(_sampler_sigmas(cfg), dtype=torch.float32)
        if len(tc.level_weights) != len(self.levels):
            raise ValueError(
                f"level_weights has {len(tc.level_weights)} entries; the sampler has "
                f"{len(self.levels)} levels"
            )
        self._pool = ThreadPoolExecutor(max_workers=1)  # prefetch: data of step i+1 during step i
        # data-parallel phases (training/parallel.py): averages the gradients over the ranks
        self.reduce: Callable[[list[torch.nn.Parameter]], None] | None = None
        self._next: tuple[int, Future] | None = None

    def examples(self, step: int) -> list[Example]:
        rng = random.Random(f"dit:{self.seed}:{step}")
        return [sample_example(rng, self.scenes, self.cfg, self.tc) for _ in range(self.tc.batch)]

    def _prepare(self, step: int) -> Batch:
        return build_batch(self.examples(step), self.cfg, self.cache, self.tokenizer)

    def batch(self, step: int) -> Batch:
        fut = (
            self._next[1]
            if self._next and self._next[0] == step
            else self._pool.submit(self._prepare, step)
        )
        self._next = (step + 1, self._pool.submit(self._prepare, step + 1))
        return fut.result()

    def sigmas(self, step: int, b: int) -> torch.Tensor:
        """Per-chunk noise levels (B, n_chunks): sampler levels or uniform in (0, 1]."""
        gen = torch.Generator().manual_seed(_key(self.seed, step, "sigma"))
        n = self.cfg.chunks_per_shot
        weights = torch.tensor(self.tc.level_weights, dtype=torch.float32)
        drawn = torch.multinomial(weights, b * n, replacement=True, generator=gen).view(b, n)
        pick = self.levels[drawn]
        uniform = 1.0 - torch.rand(b, n, generator=gen)
        use_level = torch.rand(b, n, generator=gen) < self.tc.level_prob
        return torch.where(use_level, pick, uniform)

    def per_frame(self, x: torch.Tensor) -> torch.Tensor:
        """Per-chunk values (B, chunks) broadcast over their frames: (B, frames, 1, 1, 1)."""
        return x.repeat_interleave(self.cfg.chunk_frames, dim=1)[..., None, None, None]

    def flow(
        self, batch: Batch, noisy: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor
    ) -> torch.Tensor:
        """The model's flow for the noisy chunks of `batch` at per-chunk levels (B, chunks)."""
        return teacher_forced_flow(
            self.dit,
            batch.context,
            batch.context_flags,
            batch.clean,
            noisy,
            sigma * self.cfg.sampler.num_train_timesteps,
            batch.gen_flag,
            prompt,
            batch.caption_index,
            self.mask,
        )

    def own_chain(self, batch: Batch, prompt: torch.Tensor, step: int) -> list[torch.Tensor]:
        """The sampler's x0 at each of its levels but the last, run by the model itself (no
        grad) from pure noise over the whole shot, with the true clean history (as inference
        has its own): element j is the x0 that level j hands to level j + 1."""
        cfg, levels = self.cfg, self.levels.tolist()
        gen = torch.Generator().manual_seed(_key(self.seed, step, "chain"))
        b = batch.clean.shape[0]
        out, x0 = [], None
        with torch.no_grad():
            for j, sig in enumerate(levels[:-1]):
                eps = torch.randn(batch.clean.shape, generator=gen)
                x = eps if j == 0 else (1 - sig) * x0 + sig * eps
                x0 = x - sig * self.flow(
                    batch, x, torch.full((b, cfg.chunks_per_shot), sig), prompt
                )
                out.append(x0)
        return out

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        b = batch.clean.shape[0]
        sigma = self.sigmas(step, b)
        gen = torch.Generator().manual_seed(_key(self.seed, step, "noise"))
        eps = torch.randn(batch.clean.shape, generator=gen)
        s = self.per_frame(sigma)
        prompt = encode_text(self.text, batch.ids, batch.mask)
        base = batch.clean
        if self.tc.unroll_prob > 0:
            # chunks at level k >= 1 that take the model's own x0 of level k - 1
            dist, level = (sigma[..., None] - self.levels).abs().min(dim=-1)  # (B, n)
            is_level = dist < 1e-6
            coin = torch.rand(sigma.shape, generator=gen) < self.tc.unroll_prob
            use = is_level & (level > 0) & coin
            if bool(use.any()):
                chain = torch.stack(
                    self.own_chain(batch, prompt.detach(), step)
                )  # (L-1, B, Fs, ...)
                prev = (
                    (level - 1).clamp(min=0).repeat_interleave(cfg.chunk_frames, dim=1)
                )  # (B, Fs)
                own = chain.gather(
                    0, prev[None, ..., None, None, None].expand(1, *chain.shape[1:])
                )[0]
                pick = self.per_frame(use)
                base = torch.where(pick, own, batch.clean)
        noisy = (1 - s) * base + s * eps
        return self.x0_loss(batch, noisy, sigma, prompt)

    def x0_loss(
        self,
        batch: Batch,
        noisy: torch.Tensor,
        sigma: torch.Tensor,
        prompt: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective for `noisy` chunks at levels `sigma` (B, chunks): the x0 error of
        x0 = x_t - sigma v against the clean shot, per chunk, weighted 1/sigma (and by
        `weight` (B, chunks) when given: 0 leaves a chunk out), plus the motion term."""
        b, n = sigma.shape
        cf = self.cfg.chunk_frames
        s = self.per_frame(sigma)
        x0 = noisy - s * self.flow(batch, noisy, sigma, prompt)
        sq = (x0 - batch.clean).pow(2)
        if self.tc.object_weight:
            px = 1.0 + self.tc.object_weight * batch.object_mask  # (B, frames, 1, h, w)
            err = (sq * px).sum(dim=(2, 3, 4)) / (px.sum(dim=(2, 3, 4)) * sq.shape[2])
        else:
            err = sq.mean(dim=(2, 3, 4))  # (B, frames)
        per_chunk = err.view(b, n, cf).mean(dim=2)
        w = torch.ones_like(sigma) if weight is None else weight
        total = w.sum().clamp(min=1e-8)
        loss = (per_chunk / sigma * w).sum() / total
        logs = {"x0_mse": float((per_chunk * w).detach().sum() / total)}
        if self.tc.motion_weight:
            pred = x0.view(b, n, cf, *x0.shape[2:])
            true = batch.clean.view(b, n, cf, *x0.shape[2:])
            change = (pred.diff(dim=2) - true.diff(dim=2)).pow(2).mean(dim=(2, 3, 4, 5))
            loss = loss + self.tc.motion_weight * (change / sigma * w).sum() / total
            logs["motion_mse"] = float((change * w).detach().sum() / total)
        return loss, {"loss": float(loss.detach()), **logs}

    def step(self, step: int) -> dict[str, float]:
        batch = self.batch(step)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.tc)
        loss, logs = self.loss(batch, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce is not None:
            self.reduce(self.params)
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip))
        self.opt.step()
        return logs

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _key(seed: int, step: int, what: str) -> int:
    return stable_seed(seed, step, what)


def _sampler_sigmas(cfg: ModelConfig) -> tuple[float, ...]:
    from model.sampler import FlowSchedule

    return FlowSchedule(cfg.sampler).step_sigmas
