"""eval-demo's pooled story sets: one set of 27 held-out stories is too few to tell small
changes apart, so the figures pool several seeds' sets, and each set's own figures stay
beside them, equal to that seed evaluated alone."""

from __future__ import annotations

from training.evaluate import eval_stories, evaluate

METRICS = ("color_adherence", "shape_adherence", "motion_adherence", "framing_adherence")


def test_each_seed_draws_its_own_stories():
    a, b = eval_stories(None, 0), eval_stories(None, 1)
    assert len(a) == len(b) == 27  # every held-out scene once
    assert [e.story for e in a] != [e.story for e in b]
    assert {e.seed for e in a}.isdisjoint(e.seed for e in b)  # and its own noise


def test_pooled_sets_keep_each_seeds_figures_and_add_up():
    pooled = evaluate(stories=2, seed=3, seeds=2)
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
