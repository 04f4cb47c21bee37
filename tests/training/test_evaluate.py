"""eval-demo's pooled story sets: one set of 27 held-out stories is too few to tell small
changes apart, so the figures pool several seeds' sets, and each set's own figures stay
beside them, equal to that seed evaluated alone."""

from __future__ import annotations

import pytest

from training.evaluate import BROKEN_DOWN, eval_stories, evaluate

METRICS = ("color_adherence", "shape_adherence", "motion_adherence", "framing_adherence")


def test_each_seed_draws_its_own_stories():
    a, b = eval_stories(None, 0), eval_stories(None, 1)
    assert len(a) == len(b) == 27  # every held-out scene once
    assert [e.story for e in a] != [e.story for e in b]
    assert {e.seed for e in a}.isdisjoint(e.seed for e in b)  # and its own noise


@pytest.fixture(scope="module")
def pooled():
    return evaluate(stories=2, seed=3, seeds=2)


def test_pooled_sets_keep_each_seeds_figures_and_add_up(pooled):
    alone = [evaluate(stories=2, seed=s) for s in (3, 4)]
    assert pooled["seeds"] == 2 and pooled["stories"] == 4
    assert set(pooled["by_seed"]) == {"3", "4"}
    for s, one in zip(("3", "4"), alone, strict=True):
        assert "by_seed" not in one
        for k in (*METRICS, "chunks", "shots", "stories"):
            assert pooled["by_seed"][s][k] == one[k], (s, k)
    assert pooled["chunks"] == sum(one["chunks"] for one in alone)
    for k in METRICS:  # the pooled fraction is the chunk-weighted mean of the sets'
        mean = sum(one[k] * one["chunks"] for one in alone) / pooled["chunks"]
        assert abs(pooled[k] - mean) < 1e-3, k


def test_the_breakdown_by_prompt_adds_up_to_the_pooled_figures(pooled):
    """Each grouping (prompted shape, motion, framing; shot; chunk) splits the same chunks,
    so its counts add up to them and its chunk-weighted figures to the pooled ones; the
    shape confusion's rows count each prompted shape's chunks, its diagonal the right ones."""
    groups = pooled["by_prompt"]
    assert set(groups) == {"shape", "motion", "framing", "shot", "chunk"}
    pooled_of = {
        "colour": pooled["color_adherence"],
        "shape": pooled["shape_adherence"],
        "motion": pooled["motion_adherence"],
        "framing": pooled["framing_adherence"],
    }
    for by, values in groups.items():
        assert sum(v["chunks"] for v in values.values()) == pooled["chunks"], by
        for k in BROKEN_DOWN:
            mean = sum(v[k] * v["chunks"] for v in values.values()) / pooled["chunks"]
            assert abs(mean - pooled_of[k]) < 1e-3, (by, k)
    assert set(groups["shot"]) == {"0", "1", "2"}  # three shots a story
    assert set(groups["chunk"]) <= {"0", "1", "2", "3"} and "0" in groups["chunk"]
    read = pooled["shape_read"]
    assert set(read) == set(groups["shape"])
    for shape, row in read.items():
        assert sum(row.values()) == groups["shape"][shape]["chunks"], shape
        right = row.get(shape, 0) / groups["shape"][shape]["chunks"]
        assert abs(right - groups["shape"][shape]["shape"]) < 1e-3, shape
