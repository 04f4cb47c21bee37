"""The fixed vocabulary of the demo model: palette, shapes, captions, and a tolerant parser.

Users and outside tests write prompts in it, so it is data, not a guess:

    global caption  a {colour} {shape} on a {colour} background      (colours differ)
    shot caption    {wide|close-up} shot, the {shape} moves {left|right|up|down}
                    {wide|close-up} shot, the {shape} stays still
                    {wide|close-up} shot, the {shape} turns {colour} and moves {direction}
                    {wide|close-up} shot, the {shape} turns {colour} and stays still

Parsing is case-insensitive and tolerates extra spaces and a trailing full stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Exact sRGB values used for rendering (and by the probe for nearest-colour naming).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "cyan": (40, 200, 210),
    "magenta": (200, 50, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
FRAMINGS: tuple[str, ...] = ("wide", "close-up")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTIONS: tuple[str, ...] = (*DIRECTIONS, "still")


@dataclass(frozen=True)
class Scene:
    """What the global caption fixes: the object's colour and shape, and the background."""

    colour: str
    shape: str
    background: str

    def __post_init__(self) -> None:
        _check(self.colour, COLOURS, "colour")
        _check(self.shape, SHAPES, "shape")
        _check(self.background, COLOURS, "background colour")
        if self.colour == self.background:
            raise ValueError(f"object and background are both {self.colour}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


@dataclass(frozen=True)
class ShotSpec:
    """What a shot caption fixes: framing, motion ('still' or a direction), optional new colour."""

    framing: str
    motion: str
    turn: str | None = None

    def __post_init__(self) -> None:
        _check(self.framing, FRAMINGS, "framing")
        _check(self.motion, MOTIONS, "motion")
        if self.turn is not None:
            _check(self.turn, COLOURS, "colour")

    def caption(self, shape: str) -> str:
        verb = "stays still" if self.motion == "still" else f"moves {self.motion}"
        change = f"turns {self.turn} and " if self.turn else ""
        return f"{self.framing} shot, the {shape} {change}{verb}"


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; one of {', '.join(allowed)}")


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace (also around commas), drop one trailing full stop."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    text = re.sub(r" ?, ?", ", ", text)
    return text[:-1].rstrip() if text.endswith(".") else text


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_GLOBAL = re.compile(rf"an? ({_C}) ({_S}) on an? ({_C}) background")
_SHOT = re.compile(
    rf"(wide|close-up) shot, the ({_S}) (?:turns ({_C}) and )?(?:moves (left|right|up|down)|stays still)"
)


def parse_global(text: str) -> Scene | None:
    """The Scene of a global caption in the vocabulary, else None."""
    m = _GLOBAL.fullmatch(normalize(text))
    if not m or m.group(1) == m.group(3):
        return None
    return Scene(colour=m.group(1), shape=m.group(2), background=m.group(3))


def parse_shot(text: str) -> tuple[ShotSpec, str] | None:
    """(ShotSpec, the shape word it names) of a shot caption in the vocabulary, else None."""
    m = _SHOT.fullmatch(normalize(text))
    if not m:
        return None
    framing, shape, turn, direction = m.groups()
    return ShotSpec(framing=framing, motion=direction or "still", turn=turn), shape


def vocabulary() -> dict:
    """The vocabulary as plain data (shipped beside the weights as vocabulary.json)."""
    return {
        "colours": {name: list(rgb) for name, rgb in PALETTE.items()},
        "shapes": list(SHAPES),
        "framings": list(FRAMINGS),
        "directions": list(DIRECTIONS),
        "global_caption": "a {colour} {shape} on a {colour} background",
        "shot_captions": [
            "{wide|close-up} shot, the {shape} moves {left|right|up|down}",
            "{wide|close-up} shot, the {shape} stays still",
            "{wide|close-up} shot, the {shape} turns {colour} and moves {left|right|up|down}",
            "{wide|close-up} shot, the {shape} turns {colour} and stays still",
        ],
        "matching": "case-insensitive; extra spaces and a trailing full stop are ignored",
    }
