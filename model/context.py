"""Context-frame selection at shot boundaries (docs/design/generator.md §8).

Before shot s >= 1, `context_frames` frames are spread over the previous shots: each gets
`n // s`, the last `n % s` shots one more, the oldest 0 once there are more shots than
frames. Within a shot of pixel range [a, e] a count m picks round(linspace(a, e, m)) in
float32 with half-to-even rounding. Each frame's source shot is its RoPE flag and caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContextPick:
    """One selected frame: global pixel index, its source shot, and index within that shot."""

    index: int
    shot: int
    offset: int


def context_counts(n_prev_shots: int, context_frames: int) -> list[int]:
    """Frames taken from each previous shot, oldest first."""
    if n_prev_shots <= 0:
        return []
    base, rem = divmod(context_frames, n_prev_shots)
    return [base + (1 if p >= n_prev_shots - rem else 0) for p in range(n_prev_shots)]


def spread(first: int, last: int, count: int) -> list[int]:
    """round(linspace(first, last, count)) in float32, half to even; count 1 gives `first`."""
    if count <= 0:
        return []
    pts = torch.linspace(first, last, count, dtype=torch.float32)
    return [int(v) for v in torch.round(pts).tolist()]


def select_context(shot_lengths: Sequence[int], context_frames: int) -> list[ContextPick]:
    """Pick the context frames over previous shots of the given pixel lengths.

    Shots are laid end to end in one global pixel index, as the original concatenates
    each shot's decoded frames; shots cut short simply have fewer frames.
    """
    picks: list[ContextPick] = []
    start = 0
    for shot, (length, count) in enumerate(
        zip(shot_lengths, context_counts(len(shot_lengths), context_frames), strict=True)
    ):
        for idx in spread(start, start + length - 1, count):
            picks.append(ContextPick(index=idx, shot=shot, offset=idx - start))
        start += length
    return picks


def candidate_offsets(length: int, max_count: int, start: int = 0) -> list[int]:
    """Offsets within a finished shot that any later boundary can select (counts never grow),
    so only these frames' latents need keeping: the union over c <= max_count of
    spread(start, start + length - 1, c) - start. The shot's global `start` matters: the
    spread rounds half to even over global indices, so a midpoint at x.5 lands on a parity
    that depends on where the shot sits (shots of any length: a cut can end one anywhere)."""
    return sorted(
        {o - start for c in range(1, max_count + 1) for o in spread(start, start + length - 1, c)}
    )


def caption_rows(picks: Sequence[ContextPick], shot: int) -> tuple[list[int], list[int]]:
    """The captions a shot's passes read, and each context frame's row among them.

    The original encodes a caption for every shot so far, but a frame only ever reads the
    caption of its own source shot, so the captions of shots that contribute no context
    frame (the oldest ones, once there are more shots than frames) are never read and are
    left out: `rows` is the sorted source shots of `picks`, then `shot` itself (last).
    """
    rows = sorted({p.shot for p in picks}) + [shot]
    return rows, [rows.index(p.shot) for p in picks]
