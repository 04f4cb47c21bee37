"""Procedural multi-shot clips for the demo model: a flat background and one flat shape.

A shot's pixels depend only on its `ClipKey` (background, object colour, shape, framing,
motion), so the data is deterministic given the captions and the context: the few-step
sampler predicts a conditional mean, and whatever the conditioning left open would blur.

    framing  sets the size (bbox side as a fraction of the height) and where the object sits
             across its motion (close-up: centred; wide: off-centre)
    motion   a constant speed; the path is centred on the frame, so the object starts on
             the side opposite its motion and stays in frame for the whole shot
    turn     a shot may recolour the object; the new colour persists into later shots
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from training.vocab import COLOURS, FRAMINGS, MOTIONS, PALETTE, SHAPES, Scene, ShotSpec

# Object size: side of its bounding box, as a fraction of the frame height.
SIZE = {"wide": 0.3, "close-up": 0.5}
# Where a shot places the object (fractions of width, height) on the axes it does not move along.
ANCHOR = {"wide": (0.35, 0.40), "close-up": (0.5, 0.5)}
# Speed per frame: a fraction of the frame width (horizontal) or height (vertical).
SPEED = {"horizontal": 0.013, "vertical": 0.0094}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class Geometry:
    """Frame size and shot length the clips are rendered at."""

    height: int = 64
    width: int = 96
    shot_frames: int = 45  # pixel frames of a full shot
    supersample: int = 4  # anti-aliasing: render at this factor, then average

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> Geometry:
        return cls(cfg.height, cfg.width, cfg.pixel_frames_per_shot)

    def size(self, framing: str) -> float:
        return SIZE[framing] * self.height

    def speed(self, motion: str) -> tuple[float, float]:
        """Pixels per frame along x and y."""
        sx, sy = STEP[motion]
        return sx * SPEED["horizontal"] * self.width, sy * SPEED["vertical"] * self.height

    def centres(
        self,
        framing: str,
        motion: str,
        frames: int,
        start: tuple[float, float] | None = None,
        onset: int = 0,
    ) -> torch.Tensor:
        """Object centre (frames, 2) as (x, y) in pixels for the first `frames` of a shot:
        from `start` at frame 0 when given (it may leave the frame), else the framing's path.
        With a start, the object stands still until frame `onset`, then moves."""
        ax, ay = ANCHOR[framing]
        vx, vy = self.speed(motion)
        t = torch.arange(frames, dtype=torch.float64)
        if start is not None:
            t = (t - onset).clamp(min=0)
            return torch.stack([start[0] + vx * t, start[1] + vy * t], dim=1)
        mid = (self.shot_frames - 1) / 2  # the path is centred on the anchor at mid-shot
        cx = (ax if vx == 0 else 0.5) * self.width + vx * (t - mid)
        cy = (ay if vy == 0 else 0.5) * self.height + vy * (t - mid)
        return torch.stack([cx, cy], dim=1)


def coverage(
    shape: str, centres: torch.Tensor, size: float, height: int, width: int, supersample: int = 4
) -> torch.Tensor:
    """Fraction of each pixel the shape covers, (N, height, width) for centres (N, 2).

    Every shape fills a size x size bounding box centred on its centre: a circle of that
    diameter, a square of that side, a triangle pointing up with that base and height.
    """
    ss = supersample
    ys = (torch.arange(height * ss, dtype=torch.float64) + 0.5) / ss
    xs = (torch.arange(width * ss, dtype=torch.float64) + 0.5) / ss
    dx = xs[None, None, :] - centres[:, 0, None, None]
    dy = ys[None, :, None] - centres[:, 1, None, None]
    half = size / 2
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":
        depth = dy + half  # distance below the apex
        inside = (depth >= 0) & (depth <= size) & (dx.abs() <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = inside.to(torch.float32)
    return F.avg_pool2d(cov[:, None], ss)[:, 0] if ss > 1 else cov


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, the same in every process (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ClipKey(NamedTuple):
    """Everything a shot's pixels depend on."""

    background: str
    colour: str
    shape: str
    framing: str
    motion: str
    # the object's centre (x, y) in pixels at the shot's first frame; None: the framing's
    # anchored path (start_train places first chunks where their noise says instead)
    start: tuple[float, float] | None = None
    # with a start: the pixel frame the motion begins at (start_train's motion onsets)
    onset: int = 0


def background_value(key: ClipKey) -> torch.Tensor:
    """The background colour of `key`'s frames, (3,) in render_frames' [-1, 1] scale."""
    return torch.tensor(PALETTE[key.background], dtype=torch.float32) / 127.5 - 1.0


def object_pixels(x: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """1.0 where rendered frames x (B, 3, ...) differ from their background bg (B, 3) (the
    object and its anti-aliased edge), else 0.0; shape (B, 1, ...)."""
    bg = bg.view(*bg.shape, *([1] * (x.ndim - 2)))
    return ((x - bg).abs().amax(dim=1, keepdim=True) > 0.02).float()


def render_clip(key: ClipKey, geo: Geometry, frames: int | None = None) -> torch.Tensor:
    """The first `frames` (default: all) of a shot, (T, 3, H, W) float32 in [-1, 1]."""
    n = geo.shot_frames if frames is None else frames
    return render_frames(key, geo, list(range(n)))


def render_frames(key: ClipKey, geo: Geometry, offsets: list[int]) -> torch.Tensor:
    """Selected frames of a shot, (N, 3, H, W) in [-1, 1]; only those frames are drawn."""
    centres = geo.centres(key.framing, key.motion, max(offsets) + 1, key.start, key.onset)
    centres = centres[offsets]
    cov = coverage(
        key.shape, centres, geo.size(key.framing), geo.height, geo.width, geo.supersample
    )
    bg = torch.tensor(PALETTE[key.background], dtype=torch.float32)[None, :, None, None]
    fg = torch.tensor(PALETTE[key.colour], dtype=torch.float32)[None, :, None, None]
    rgb = bg + cov[:, None] * (fg - bg)  # sRGB 0..255, anti-aliased edges
    return rgb / 127.5 - 1.0


@dataclass(frozen=True)
class Story:
    """One multi-shot clip: the scene of the global caption and the shots in order."""

    scene: Scene
    shots: tuple[ShotSpec, ...]

    @property
    def global_caption(self) -> str:
        return self.scene.caption

    @property
    def shot_captions(self) -> list[str]:
        return [s.caption(self.scene.shape) for s in self.shots]

    def colours(self) -> list[str]:
        """Object colour in each shot: a turn recolours it from that shot on."""
        out, colour = [], self.scene.colour
        for shot in self.shots:
            colour = shot.turn or colour
            out.append(colour)
        return out

    def clip_key(self, i: int) -> ClipKey:
        s = self.shots[i]
        return ClipKey(
            self.scene.background, self.colours()[i], self.scene.shape, s.framing, s.motion
        )


def all_scenes() -> list[Scene]:
    return [
        Scene(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c
    ]  # 10 x 3 x 9 = 270


def held_out_scenes(fraction: float = 0.1, seed: int = 20250611) -> frozenset[Scene]:
    """Scenes (colour, shape, background) never used as a training global caption; fixed, so
    evaluation prompts are unseen whatever the training seed."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    return frozenset(scenes[: round(fraction * len(scenes))])


def sample_shot(rng: random.Random, background: str, colour: str, turn_prob: float) -> ShotSpec:
    """A shot with uniform framing and motion; with probability `turn_prob` a colour change
    to a colour unlike the background and the current colour."""
    turn = None
    if rng.random() < turn_prob:
        turn = rng.choice([c for c in COLOURS if c not in (background, colour)])
    return ShotSpec(rng.choice(FRAMINGS), rng.choice(MOTIONS), turn)


def sample_story(
    rng: random.Random,
    n_shots: int,
    scenes: list[Scene],
    turn_prob: float = 0.4,
    first_turn_prob: float = 0.1,
) -> Story:
    """A story over a uniformly drawn scene: every attribute uniform, colour turns in
    `turn_prob` of later shots (and `first_turn_prob` of first shots)."""
    scene = rng.choice(scenes)
    shots, colour = [], scene.colour
    for i in range(n_shots):
        shot = sample_shot(rng, scene.background, colour, first_turn_prob if i == 0 else turn_prob)
        colour = shot.turn or colour
        shots.append(shot)
    return Story(scene, tuple(shots))
