"""The demo model's data: vocabulary parsing, the renderer, the tokenizer and the probe.

The probe is what eval-demo (and the end-to-end tests) trust, so it is held to ~100 % on
ground-truth renders (also after uint8 rounding) and to about chance on noise.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from model.text import CaptionSpec, tokenize_caption
from model.vae import to_uint8
from training.probe import STILL_SPEED, read_chunk, read_frame
from training.render import (
    STEP,
    ClipKey,
    Geometry,
    Story,
    all_scenes,
    held_out_scenes,
    render_clip,
    sample_story,
)
from training.tokenizer import build_tokenizer
from training.vocab import (
    COLOURS,
    FRAMINGS,
    MOTIONS,
    PALETTE,
    SHAPES,
    Scene,
    ShotSpec,
    parse_global,
    parse_shot,
    vocabulary,
)

GEO = Geometry()


# -- vocabulary -----------------------------------------------------------------------
def test_palette_is_the_issue_palette():
    assert PALETTE["red"] == (220, 40, 40) and PALETTE["gray"] == (128, 128, 128)
    assert len(PALETTE) == 10 and SHAPES == ("circle", "square", "triangle")


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on a blue background",
        "A Red Circle On A Blue Background.",
        "  a   red circle  on a blue background .",
        "A RED CIRCLE ON A BLUE BACKGROUND",
    ],
)
def test_global_caption_parsing_is_tolerant(text):
    assert parse_global(text) == Scene("red", "circle", "blue")


@pytest.mark.parametrize(
    "text, spec, shape",
    [
        ("wide shot, the square moves left", ShotSpec("wide", "left"), "square"),
        ("Close-up shot, the triangle stays still.", ShotSpec("close-up", "still"), "triangle"),
        (
            "close-up  shot ,  the circle turns Cyan and moves UP",
            ShotSpec("close-up", "up", "cyan"),
            "circle",
        ),
        (
            "wide shot, the circle turns white and stays still",
            ShotSpec("wide", "still", "white"),
            "circle",
        ),
    ],
)
def test_shot_caption_parsing_is_tolerant(text, spec, shape):
    assert parse_shot(text) == (spec, shape)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on a red background",
        "a purple circle on a blue background",
        "a red hexagon on a blue background",
        "a red circle",
        "",
    ],
)
def test_outside_the_vocabulary_is_none(text):
    assert parse_global(text) is None


def test_captions_round_trip_through_the_parser():
    for scene in all_scenes():
        assert parse_global(scene.caption) == scene
    for spec in (ShotSpec("wide", m, t) for m in MOTIONS for t in (None, "orange")):
        assert parse_shot(spec.caption("square")) == (spec, "square")


def test_vocabulary_json_lists_every_word():
    v = vocabulary()
    assert list(v["colours"]) == list(COLOURS) and v["colours"]["blue"] == [40, 80, 220]
    assert v["shapes"] == list(SHAPES)


# -- tokenizer ------------------------------------------------------------------------
def test_tokenizer_ignores_case_spacing_and_full_stops():
    tok = build_tokenizer()

    def ids(g, s):
        return tok.encode(CaptionSpec(g, 3, s).text, add_special_tokens=False).ids

    base = ids("a red circle on a blue background", "wide shot, the circle moves left")
    assert ids("A Red Circle on a blue background.", "Wide shot, the circle moves left.") == base
    assert 2 not in base  # no <unk>: every word of the vocabulary is a token
    unknown = tok.encode("a purple hexagon", add_special_tokens=False).ids
    assert unknown.count(2) == 2  # out-of-vocabulary words still tokenize, as <unk>


def test_production_tokenization_of_long_shot_indices():
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    spec = CaptionSpec(
        "a red circle on a blue background", 123, "close-up shot, the circle stays still"
    )
    tc = tokenize_caption(fast, spec, 32)
    assert tc.truncated_tokens == 0 and tc.ids[-1] == fast.eos_token_id
    words = fast.convert_ids_to_tokens(list(tc.ids[:-1]))
    assert words[6:11] == ["shot", "1", "2", "3", ":"] and "<unk>" not in words


def test_a_colour_word_carries_its_role_in_its_token():
    """The background colour and a recolouring are tokens of their own, however spaced or
    cased, so the first sampler step (text only) needs no word order to tell them apart."""
    tok = build_tokenizer()

    def tokens(text):
        return tok.encode(text, add_special_tokens=False).tokens

    assert tokens("a red circle on a blue background") == [
        "a",
        "red",
        "circle",
        "on",
        "a",
        "blue_background",
    ]
    assert tokens("A Blue Circle on a  RED   Background.") == [
        "a",
        "blue",
        "circle",
        "on",
        "a",
        "red_background",
    ]
    assert tokens("wide shot, the circle turns  green and stays still")[4] == "turns_green"
    ids = tok.encode("red red_background turns_red", add_special_tokens=False).ids
    assert len(set(ids)) == 3 and 2 not in ids  # three roles, three known tokens


# -- renderer and story sampling ---------------------------------------------------------
def test_render_uses_the_exact_palette_and_stays_in_frame():
    for framing in ("wide", "close-up"):
        for motion in MOTIONS:
            clip = render_clip(ClipKey("blue", "yellow", "triangle", framing, motion), GEO)
            assert clip.shape == (GEO.shot_frames, 3, GEO.height, GEO.width)
            u8 = to_uint8(clip)
            corner = tuple(u8[0, 0, 0].tolist())
            assert corner == PALETTE["blue"]
            border = torch.cat([u8[:, 0], u8[:, -1], u8[:, :, 0], u8[:, :, -1]], dim=1)
            assert (border == torch.tensor(PALETTE["blue"], dtype=torch.uint8)).all()
            centre_colours = {tuple(p.tolist()) for p in u8[:, GEO.height // 2].reshape(-1, 3)}
            if framing == "close-up":  # the object crosses the middle row
                assert PALETTE["yellow"] in centre_colours


def test_centred_shots_start_at_the_centre_and_stay_in_frame_to_the_end():
    for framing in FRAMINGS:
        half = GEO.size(framing) / 2
        for motion in MOTIONS:
            c = GEO.centres(framing, motion, GEO.shot_frames)
            assert c[0].tolist() == [GEO.width / 2, GEO.height / 2]
            assert (c[:, 0] >= half).all() and (c[:, 0] <= GEO.width - half).all()
            assert (c[:, 1] >= half).all() and (c[:, 1] <= GEO.height - half).all()
            vx, vy = GEO.speed(framing, motion)
            sx, sy = STEP[motion]
            assert (vx, vy) == (0.0, 0.0) if motion == "still" else vx * sx + vy * sy > 0
            if motion != "still":  # fast enough for the probe to tell from still
                assert abs(vx) + abs(vy) > STILL_SPEED


def test_crossing_shots_cross_the_frame_vertically_and_stay_in_frame():
    """The crossing layout: still and sideways shots as in the centred one; a vertical shot
    starts on the side opposite its motion, passes the centre at mid-shot and moves twice
    as fast as a centred one, inside the frame throughout."""
    cross = Geometry(layout="crossing")
    mid = (cross.shot_frames - 1) // 2
    for framing in FRAMINGS:
        half = cross.size(framing) / 2
        assert cross.size(framing) == GEO.size(framing)
        for motion in MOTIONS:
            c = cross.centres(framing, motion, cross.shot_frames)
            assert (c[:, 0] >= half).all() and (c[:, 0] <= cross.width - half).all()
            assert (c[:, 1] >= half).all() and (c[:, 1] <= cross.height - half).all()
            if motion in ("up", "down"):
                sign = 1 if motion == "down" else -1
                assert sign * (c[0, 1] - cross.height / 2) < -half / 2  # opposite its motion
                torch.testing.assert_close(
                    c[mid], torch.tensor([cross.width / 2, cross.height / 2], dtype=c.dtype)
                )
                vy, centred_vy = cross.speed(framing, motion)[1], GEO.speed(framing, motion)[1]
                assert vy == pytest.approx(2 * centred_vy)
            else:
                assert torch.equal(c, GEO.centres(framing, motion, GEO.shot_frames))


def test_anchored_layout_keeps_the_first_versions_paths():
    old = Geometry(layout="anchored")
    assert old.size("close-up") == 0.5 * old.height and GEO.size("close-up") < old.size("close-up")
    still = old.centres("wide", "still", 1)[0].tolist()
    assert still == [0.35 * old.width, 0.40 * old.height]
    right = old.centres("wide", "right", old.shot_frames)
    assert right[(old.shot_frames - 1) // 2].tolist() == [old.width / 2, 0.40 * old.height]
    assert right[0, 0] < old.width / 2  # it starts on the side opposite its motion
    with pytest.raises(ValueError, match="layout"):
        Geometry(layout="diagonal")


def test_render_is_deterministic():
    key = ClipKey("black", "red", "circle", "wide", "left")
    assert torch.equal(render_clip(key, GEO), render_clip(key, GEO))


def test_story_sampling_is_deterministic_and_balanced():
    scenes = all_scenes()
    a = [sample_story(random.Random(5), 3, scenes) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    stories = [sample_story(rng, 3, scenes) for _ in range(3000)]
    for attr, values in (("colour", COLOURS), ("background", COLOURS), ("shape", SHAPES)):
        counts = Counter(getattr(s.scene, attr) for s in stories)
        assert set(counts) == set(values)
        assert max(counts.values()) / min(counts.values()) < 1.35, (attr, counts)
    later = [shot for s in stories for shot in s.shots[1:]]
    motions = Counter(shot.motion for shot in later)
    assert max(motions.values()) / min(motions.values()) < 1.2
    turns = sum(shot.turn is not None for shot in later) / len(later)
    assert 0.35 < turns < 0.45
    for s in stories:  # a turn is visible: not the background, not the current colour
        for shot, before in zip(s.shots, [s.scene.colour, *s.colours()[:-1]], strict=True):
            assert shot.turn not in (s.scene.background, before)


def test_colour_turns_persist_into_later_shots():
    scene = Scene("red", "square", "black")
    story = Story(
        scene,
        (ShotSpec("wide", "left"), ShotSpec("wide", "up", "green"), ShotSpec("close-up", "still")),
    )
    assert story.colours() == ["red", "green", "green"]
    assert story.clip_key(2) == ClipKey("black", "green", "square", "close-up", "still")


def test_held_out_scenes_are_fixed():
    held = held_out_scenes()
    assert len(held) == 27 and held == held_out_scenes()
    assert len({s.colour for s in held}) >= 6 and len({s.shape for s in held}) == 3


# -- probe ------------------------------------------------------------------------------
def _chunks_of(clip):
    """Chunks as the generator emits them: 9 frames, then 12."""
    out, start = [], 0
    for n in (9, 12, 12, 12):
        out.append(to_uint8(clip[start : start + n]))
        start += n
    return out


def test_probe_reads_every_render_correctly():
    rng = random.Random(1)
    scenes = all_scenes()
    hits, total = Counter(), 0
    for _ in range(36):
        key = sample_story(rng, 1, scenes, first_turn_prob=0.0).clip_key(0)
        for chunk in _chunks_of(render_clip(key, GEO))[::2]:
            for attr, ok in read_chunk(chunk).agreement(key).items():
                hits[attr] += ok
            total += 1
    assert {k: v / total for k, v in hits.items()} == {
        "background": 1.0,
        "colour": 1.0,
        "shape": 1.0,
        "framing": 1.0,
        "motion": 1.0,
    }


def test_probe_hardest_cases():
    """Smallest objects (wide triangles), slowest motion (vertical), closest colours."""
    for key in (
        ClipKey("yellow", "orange", "triangle", "wide", "up"),
        ClipKey("orange", "yellow", "circle", "wide", "down"),
        ClipKey("white", "gray", "square", "wide", "still"),
        ClipKey("black", "gray", "triangle", "close-up", "down"),
    ):
        for chunk in _chunks_of(render_clip(key, GEO)):
            assert all(read_chunk(chunk).agreement(key).values()), key


def test_probe_is_at_chance_on_noise():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(2)
    scenes = all_scenes()
    hits, total = Counter(), 0
    for _ in range(30):
        key = sample_story(rng, 1, scenes).clip_key(0)
        noise = torch.randint(
            0, 256, (12, GEO.height, GEO.width, 3), generator=gen, dtype=torch.uint8
        )
        for attr, ok in read_chunk(noise).agreement(key).items():
            hits[attr] += ok
        total += 1
    rates = {k: v / total for k, v in hits.items()}
    assert rates["background"] <= 0.3 and rates["colour"] <= 0.3
    assert rates["shape"] <= 0.6 and rates["motion"] <= 0.45


def test_probe_on_a_flat_frame_finds_no_object():
    flat = torch.full((GEO.height, GEO.width, 3), 128, dtype=torch.uint8)
    r = read_frame(flat)
    assert r.background == "gray" and r.colour is None and r.shape is None
    assert read_chunk(flat[None].expand(9, -1, -1, -1)).motion is None
