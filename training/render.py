"""Procedural multi-shot clips for the demo model: a flat background and one flat shape.

A shot's pixels depend only on its `ClipKey` (background, object colour, shape, framing,
motion), so the data is deterministic given the captions and the context: the few-step
sampler predicts a conditional mean, and whatever the conditioning left open would blur.

    framing  sets the size (bbox side as a fraction of the height)
    motion   a constant speed that keeps the object in frame for the whole shot
    turn     a shot may recolour the object; the new colour persists into later shots

Where a shot puts the object is the geometry's `layout`:

    centred   every shot starts with the object at the frame's centre and moves from there
              (0.9 of the room between the centre and the frame's edge in a whole shot);
              phases 7 to 13 of the shipped weights' recipe and the probe's framing split
    anchored  the first version's paths, centred on the frame at mid-shot: the object starts
              on the side opposite its motion, a still wide shot sits off-centre (0.35, 0.40)
    crossing  centred, except that a shot moving up or down starts near the edge opposite
              its motion and crosses the frame, passing the centre at mid-shot (twice the
              centred layout's vertical travel and speed, which the frame's 64 rows make
              the slowest); phases 14 and 15, what the shipped weights draw

Why centred: the DiT has no absolute position (RoPE is relative), so at sigma 1 a shot's
first chunk can place an object only where the edges of its token grid tell it to. The
frame's centre is the one place every edge agrees on: it is symmetric, so a token needs to
know how far it is from the edges, not which edge is which, and the object needs no help
from the noise to be put there. Anchored paths ask for the side (measured: first chunks
at sigma 1 from scratch end 15.9 px from an anchored start after 900 steps, 3.4 px from the
centre of an odd token grid after 450); the first version answered with a placement
decided by the noise (training/start_train.py), which the 4-step sampler could not keep
sharp.
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

LAYOUTS = ("centred", "anchored", "crossing")
# Object size per layout: side of its bounding box, as a fraction of the frame height.
SIZES = {"centred": {"wide": 0.3, "close-up": 0.45}, "anchored": {"wide": 0.3, "close-up": 0.5}}
SIZES["crossing"] = SIZES["centred"]  # the centred layout but for its vertical paths
SIZE = SIZES["centred"]  # the centred and crossing layouts', what the shipped weights draw
# centred: the share of the room between the frame's centre and its edge (less half the
# object) that a whole shot travels
TRAVEL = 0.9
# anchored: where a shot places the object (fractions of width, height) on the axes it does
# not move along, and its speed per frame as a fraction of the frame width / height
ANCHOR = {"wide": (0.35, 0.40), "close-up": (0.5, 0.5)}
SPEED = {"horizontal": 0.013, "vertical": 0.0094}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass(frozen=True)
class Geometry:
    """Frame size and shot length the clips are rendered at."""

    height: int = 64
    width: int = 96
    shot_frames: int = 45  # pixel frames of a full shot
    supersample: int = 4  # anti-aliasing: render at this factor, then average
    layout: str = "centred"  # see the module docstring

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")

    @classmethod
    def for_config(cls, cfg: ModelConfig, layout: str = "centred") -> Geometry:
        return cls(cfg.height, cfg.width, cfg.pixel_frames_per_shot, layout=layout)

    def size(self, framing: str) -> float:
        return SIZES[self.layout][framing] * self.height

    def speed(self, framing: str, motion: str) -> tuple[float, float]:
        """Pixels per frame along x and y."""
        sx, sy = STEP[motion]
        if self.layout == "anchored":
            return sx * SPEED["horizontal"] * self.width, sy * SPEED["vertical"] * self.height
        size, n = self.size(framing), self.shot_frames - 1
        room_x, room_y = (self.width - size) / 2, (self.height - size) / 2
        if self.layout == "crossing":  # vertical shots cross the frame: twice the travel
            room_y *= 2
        return sx * TRAVEL * room_x / n, sy * TRAVEL * room_y / n

    def centres(
        self,
        framing: str,
        motion: str,
        frames: int,
        start: tuple[float, float] | None = None,
        onset: int = 0,
    ) -> torch.Tensor:
        """Object centre (frames, 2) as (x, y) in pixels for the first `frames` of a shot:
        from `start` at frame 0 when given (it may leave the frame), else the layout's path.
        With a start, the object stands still until frame `onset`, then moves."""
        vx, vy = self.speed(framing, motion)
        t = torch.arange(frames, dtype=torch.float64)
        if start is not None:
            t = (t - onset).clamp(min=0)
            return torch.stack([start[0] + vx * t, start[1] + vy * t], dim=1)
        if self.layout == "centred":
            return torch.stack([self.width / 2 + vx * t, self.height / 2 + vy * t], dim=1)
        if self.layout == "crossing":  # a vertical shot is at the centre at mid-shot
            y0 = self.height / 2 - vy * (self.shot_frames - 1) / 2
            return torch.stack([self.width / 2 + vx * t, y0 + vy * t], dim=1)
        ax, ay = ANCHOR[framing]
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
    # the object's centre (x, y) in pixels at the shot's first frame; None: the layout's
    # path (in the anchored layout start_train places first chunks where their noise says)
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
