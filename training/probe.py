"""A pixel probe for demo-vocabulary video: what colour, shape, framing and motion a clip shows.

It reads uint8 RGB frames (what the generator emits and what a decoded stream gives back)
and knows nothing of the model:

    background  the median of a 2-pixel border, named by the nearest palette colour
    object      pixels soft-assigned along the line from the background colour to the most
                distinct colour present (the median of the top 1% of contrast); its colour is
                the median of its core pixels, named by the nearest palette colour
    shape       the best soft IoU against a circle, square and triangle of the same area and
                centroid (render.py's shape definitions)
    framing     the fitted shape's size against the frame height (wide vs close-up)
    motion      the least-squares slope of the object's centroid over the chunk's frames;
                `still` below `still_speed` pixels per frame, else the dominant axis

`read_chunk(frames)` reads a chunk; `ChunkReading.agreement(key)` compares it with the
`ClipKey` the prompt asked for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from training.render import SIZE, ClipKey, coverage
from training.vocab import PALETTE, SHAPES

BORDER = 2  # pixels of border that vote for the background colour
MIN_CONTRAST = 30.0  # an object differs from the background by at least this (0..255 RGB)
MIN_AREA = 12.0  # pixels; smaller blobs are not an object
STILL_SPEED = 0.3  # pixels per frame; the centred layout moves 0.36 to 0.79 (render.py)
FRAMING_SPLIT = (SIZE["wide"] * SIZE["close-up"]) ** 0.5  # size / height between the two

_NAMES = list(PALETTE)
_RGB = torch.tensor([PALETTE[n] for n in _NAMES], dtype=torch.float32)


def nearest_colour(rgb: torch.Tensor) -> str:
    """Palette name nearest to an RGB triple (0..255)."""
    return _NAMES[int(torch.argmin((_RGB - rgb).norm(dim=1)))]


@dataclass(frozen=True)
class FrameReading:
    """What one frame shows; object fields are None when no object stands out."""

    background: str
    background_rgb: tuple[float, ...]
    colour: str | None = None
    colour_rgb: tuple[float, ...] | None = None
    shape: str | None = None
    framing: str | None = None
    centre: tuple[float, float] | None = None  # (x, y) in pixels
    area: float = 0.0  # pixels covered (soft)
    size: float = 0.0  # bbox side of the fitted shape, pixels


def _as_float_frames(frames) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) or (H, W, 3) RGB frames, got {tuple(x.shape)}")
    return x.to(torch.float32)


def read_frame(frame) -> FrameReading:
    """Read one (H, W, 3) uint8 RGB frame."""
    f = _as_float_frames(frame)[0]
    h, w, _ = f.shape
    b = BORDER
    border = torch.cat(
        [
            f[:b].reshape(-1, 3),
            f[-b:].reshape(-1, 3),
            f[b:-b, :b].reshape(-1, 3),
            f[b:-b, -b:].reshape(-1, 3),
        ]
    )
    bg = border.median(dim=0).values
    reading = FrameReading(nearest_colour(bg), tuple(bg.tolist()))
    diff = f - bg
    dist = diff.norm(dim=-1)
    top = torch.quantile(dist.flatten(), 0.99)
    if top < MIN_CONTRAST:
        return reading
    seed = f[dist >= 0.6 * top].median(dim=0).values
    axis = seed - bg
    length2 = axis.dot(axis)
    if length2 < MIN_CONTRAST**2:
        return reading
    # soft coverage: position along the background -> object line, off-line pixels dropped
    cov = (diff @ axis / length2).clamp(0.0, 1.0)
    off_line = (diff - cov[..., None] * axis).norm(dim=-1) > 0.5 * length2.sqrt()
    cov = torch.where(off_line | (cov < 0.25), torch.zeros_like(cov), cov)
    area = float(cov.sum())
    if area < MIN_AREA:
        return reading
    core = cov > 0.75
    obj = f[core].median(dim=0).values if core.any() else seed
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    cx, cy = float((cov * xs).sum()) / area, float((cov * ys).sum()) / area
    shape, size = _fit_shape(cov, area, cx, cy)
    framing = "close-up" if size / h > FRAMING_SPLIT else "wide"
    return FrameReading(
        reading.background,
        reading.background_rgb,
        nearest_colour(obj),
        tuple(obj.tolist()),
        shape,
        framing,
        (cx, cy),
        area,
        size,
    )


def _fit_shape(cov: torch.Tensor, area: float, cx: float, cy: float) -> tuple[str, float]:
    """The shape (and its size) whose template of equal area and centroid overlaps best."""
    h, w = cov.shape
    best = ("circle", 0.0, -1.0)
    for shape in SHAPES:
        if shape == "circle":
            size, centre = 2 * (area / np.pi) ** 0.5, (cx, cy)
        elif shape == "square":
            size, centre = area**0.5, (cx, cy)
        else:  # the centroid of the upward triangle lies size/6 below its bbox centre
            size = (2 * area) ** 0.5
            centre = (cx, cy - size / 6)
        tpl = coverage(shape, torch.tensor([centre], dtype=torch.float64), size, h, w, 2)[0]
        iou = float(torch.minimum(cov, tpl).sum() / torch.maximum(cov, tpl).sum())
        if iou > best[2]:
            best = (shape, size, iou)
    return best[0], best[1]


def _mode(values: list) -> object:
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


@dataclass(frozen=True)
class ChunkReading:
    """What a chunk of frames shows: majority votes over its frames, and the motion."""

    background: str
    colour: str | None
    shape: str | None
    framing: str | None
    motion: str | None  # left/right/up/down/still; None if the object is mostly missing
    velocity: tuple[float, float] | None  # pixels per frame (x right, y down)
    frames: tuple[FrameReading, ...]

    def agreement(self, key: ClipKey) -> dict[str, bool]:
        """Which attributes match what the prompt asked for."""
        return {
            "background": self.background == key.background,
            "colour": self.colour == key.colour,
            "shape": self.shape == key.shape,
            "framing": self.framing == key.framing,
            "motion": self.motion == key.motion,
        }


def read_chunk(frames, still_speed: float = STILL_SPEED) -> ChunkReading:
    """Read a chunk of (T, H, W, 3) uint8 RGB frames (T >= 2 for a motion reading)."""
    readings = tuple(read_frame(f) for f in _as_float_frames(frames))
    found = [(t, r.centre) for t, r in enumerate(readings) if r.centre is not None]
    motion, velocity = None, None
    if len(found) >= max(2, (len(readings) + 1) // 2):
        t = torch.tensor([i for i, _ in found], dtype=torch.float64)
        c = torch.tensor([xy for _, xy in found], dtype=torch.float64)
        tc = t - t.mean()
        slope = (tc[:, None] * (c - c.mean(dim=0))).sum(dim=0) / (tc * tc).sum()
        vx, vy = float(slope[0]), float(slope[1])
        velocity = (vx, vy)
        if max(abs(vx), abs(vy)) < still_speed:
            motion = "still"
        elif abs(vx) >= abs(vy):
            motion = "right" if vx > 0 else "left"
        else:
            motion = "down" if vy > 0 else "up"
    return ChunkReading(
        background=str(_mode([r.background for r in readings])),
        colour=_mode([r.colour for r in readings]),  # type: ignore[arg-type]
        shape=_mode([r.shape for r in readings]),  # type: ignore[arg-type]
        framing=_mode([r.framing for r in readings]),  # type: ignore[arg-type]
        motion=motion,
        velocity=velocity,
        frames=readings,
    )
