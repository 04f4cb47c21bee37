"""Context selection: the spec's table of worked examples, cuts, and candidates."""

from __future__ import annotations

import pytest

from model.context import candidate_offsets, context_counts, select_context, spread

# docs/design/generator.md §8: shot s (0-based), counts, pixel indices, flags — for 81-frame shots
TABLE = [
    (1, [6], [0, 16, 32, 48, 64, 80], [0] * 6),
    (2, [3, 3], [0, 40, 80, 81, 121, 161], [0, 0, 0, 1, 1, 1]),
    (3, [2, 2, 2], [0, 80, 81, 161, 162, 242], [0, 0, 1, 1, 2, 2]),
    (4, [1, 1, 2, 2], [0, 81, 162, 242, 243, 323], [0, 1, 2, 2, 3, 3]),
    (5, [1, 1, 1, 1, 2], [0, 81, 162, 243, 324, 404], [0, 1, 2, 3, 4, 4]),
    (6, [1] * 6, [0, 81, 162, 243, 324, 405], [0, 1, 2, 3, 4, 5]),
    (7, [0, 1, 1, 1, 1, 1, 1], [81, 162, 243, 324, 405, 486], [1, 2, 3, 4, 5, 6]),
]


@pytest.mark.parametrize("shot, counts, indices, flags", TABLE, ids=[f"shot{r[0]}" for r in TABLE])
def test_worked_examples(shot, counts, indices, flags):
    assert context_counts(shot, 6) == counts
    picks = select_context([81] * shot, 6)
    assert [p.index for p in picks] == indices
    assert [p.shot for p in picks] == flags


def test_first_shot_has_no_context():
    assert select_context([], 6) == []


def test_half_to_even_in_float32():
    # linspace(0, 20, 6) = 0, 4, 8, 12, 16, 20; linspace(0, 5, 3) = 0, 2.5, 5 -> 2.5 rounds to 2
    assert spread(0, 5, 3) == [0, 2, 5]
    assert spread(10, 10, 1) == [10]


def test_shot_cut_short_uses_its_actual_range():
    """A shot cut after 2 chunks (9 + 12 = 21 frames) then a full one."""
    picks = select_context([21, 81], 6)
    assert [p.index for p in picks] == [0, 10, 20, 21, 61, 101]
    assert [p.offset for p in picks] == [0, 10, 20, 0, 40, 80]


def test_candidates_cover_every_later_boundary():
    """Whatever boundary comes later, the frames it picks from a shot are candidates."""
    cands = set(candidate_offsets(81, 6))
    assert len(cands) <= 11
    for later in range(1, 12):
        for p in select_context([81] * later, 6):
            assert p.offset in cands


def test_candidates_cover_every_later_boundary_for_shots_of_any_length():
    """Cuts end shots at any frame, so shots have any length and sit anywhere: whatever
    the lengths, every frame a later boundary picks from a finished shot is among that
    shot's candidates (computed where the shot sits: rounding half to even depends on it)."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 90) for _ in range(rng.randint(1, 9))]
        for k in range(1, len(lengths) + 1):
            for p in select_context(lengths[:k], 6):
                start = sum(lengths[: p.shot])
                cands = candidate_offsets(
                    lengths[p.shot], context_counts(p.shot + 1, 6)[p.shot], start
                )
                assert p.offset in cands, (lengths[:k], p)
