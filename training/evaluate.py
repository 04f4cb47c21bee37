"""`shotstream eval-demo`: prompt adherence and consistency of the demo model, from pixels.

Stories are built on held-out scenes (colour, shape, background never used as a training
global caption). Each runs through the production path (`ShotStreamGenerator`: context
selection, caches, streamed decode, uint8 frames) with mid-stream prompts that cut the
current shot after 2 or 4 chunks. Every chunk is read by the probe and compared with the
ClipKey the prompts ask for.

    color_adherence         chunks whose background and object colours both match
    shape_adherence         chunks whose object has the prompted shape
    framing_adherence       chunks with the prompted size (wide vs close-up)
    motion_adherence        chunks moving the prompted way (or still)
    cross_shot_consistency  chunks of later shots without a colour change that keep the
                            object's colour and shape across the cut
    carry_over_after_turn   the same, where the colour came from an earlier shot's "turns"
                            caption, so only the context frames carry it
    switch_adherence        first chunks of shots started mid-stream whose colour, framing
                            and motion already follow the new prompt

`by_prompt` breaks the chunk figures down by what was prompted (shape, motion, framing)
and by where the chunk falls (its shot in the story, its chunk in the shot), and
`shape_read` counts the shapes the probe read for each prompted one: where a model's
shapes fail (the quick recipe's, for one, mostly draws squares round).

With `round_trip` it also reads the VAE alone: rendered shots of the held-out scenes,
encoded and decoded, chunk by chunk as the generator would emit them. No generator can
score above what its decoder draws from exact latents, so this is the ceiling of the
figures above (`vae_round_trip`: the same fractions, over those chunks).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import ModelConfig, get_preset
from model.dit import build_dit
from model.generator import LoadedModel, ShotStreamGenerator, load_model
from model.text import TextEncoder, load_tokenizer
from model.vae import WanVAE, to_uint8
from training.probe import read_chunk
from training.render import ClipKey, Geometry, Story, held_out_scenes, render_clip, sample_shot
from training.vocab import FRAMINGS, MOTIONS, ShotSpec


@dataclass(frozen=True)
class EvalStory:
    story: Story
    chunks: tuple[int, ...]  # chunks generated per shot before the next prompt cuts it
    seed: int


def eval_stories(n: int | None = None, seed: int = 0, shots: int = 3) -> list[EvalStory]:
    """Stories over the held-out scenes (all of them, or the first n), fixed by `seed`."""
    scenes = sorted(held_out_scenes(), key=lambda s: s.caption)
    rng = random.Random(f"eval:{seed}")
    rng.shuffle(scenes)
    out = []
    for i, scene in enumerate(scenes if n is None else scenes[:n]):
        specs: list[ShotSpec] = []
        colour = scene.colour
        for k in range(shots):
            spec = sample_shot(rng, scene.background, colour, 0.0 if k == 0 else 0.5)
            colour = spec.turn or colour
            specs.append(spec)
        chunks = tuple(rng.choice((2, 4)) for _ in range(shots))
        out.append(EvalStory(Story(scene, tuple(specs)), chunks, seed * 1000 + i))
    return out


@dataclass(frozen=True)
class ChunkResult:
    story: int
    shot: int
    chunk: int
    expected: dict
    read: dict
    agreement: dict[str, bool]


def run_story(model: LoadedModel, pool: StatePool, ev: EvalStory, index: int) -> list[ChunkResult]:
    """Generate one story through the production generator and probe every chunk."""
    lease = pool.acquire(f"eval-{index}")
    try:
        gen = ShotStreamGenerator(model, lease, ev.story.global_caption, seed=ev.seed)
        results = []
        for s, (text, n) in enumerate(zip(ev.story.shot_captions, ev.chunks, strict=True)):
            gen.start_shot(text)
            key = ev.story.clip_key(s)
            for c in range(n):
                reading = read_chunk(gen.next_chunk().frames)
                read = {
                    "background": reading.background,
                    "colour": reading.colour,
                    "shape": reading.shape,
                    "framing": reading.framing,
                    "motion": reading.motion,
                }
                results.append(
                    ChunkResult(index, s, c, key._asdict(), read, reading.agreement(key))
                )
        return results
    finally:
        pool.release(lease)


def _frac(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize(stories: list[EvalStory], results: list[ChunkResult]) -> dict:
    """The metrics of the module docstring, each a fraction in 0..1."""
    a = [r.agreement for r in results]
    by = {(r.story, r.shot): [] for r in results}
    for r in results:
        by[(r.story, r.shot)].append(r)
    consistent, carried, switch = [], [], []
    for (st, s), chunks in by.items():
        if s == 0:
            continue
        story = stories[st].story
        ok = [c.agreement["colour"] and c.agreement["shape"] for c in chunks]
        if story.shots[s].turn is None:
            consistent += ok
            if story.colours()[s] != story.scene.colour:
                carried += ok
        first = chunks[0].agreement
        switch.append(first["colour"] and first["framing"] and first["motion"])
    return {
        "color_adherence": _frac([x["background"] and x["colour"] for x in a]),
        "shape_adherence": _frac([x["shape"] for x in a]),
        "motion_adherence": _frac([x["motion"] for x in a]),
        "cross_shot_consistency": _frac(consistent),
        "switch_adherence": _frac(switch),
        "background_adherence": _frac([x["background"] for x in a]),
        "object_colour_adherence": _frac([x["colour"] for x in a]),
        "framing_adherence": _frac([x["framing"] for x in a]),
        "carry_over_after_turn": _frac(carried),
        "chunks": len(results),
        "shots": len(by),
        "stories": len(stories),
    }


BROKEN_DOWN = ("colour", "shape", "motion", "framing")  # the chunk attributes by_prompt gives


def breakdown(results: list[ChunkResult]) -> dict:
    """`by_prompt` and `shape_read` of the module docstring: for each group, the fraction
    of its chunks whose colour (background and object), shape, motion and framing agree,
    and its chunk count."""
    groups: dict[str, dict[str, list[dict[str, bool]]]] = {}
    shape_read: dict[str, dict[str, int]] = {}
    for r in results:
        where = {
            "shape": r.expected["shape"],
            "motion": r.expected["motion"],
            "framing": r.expected["framing"],
            "shot": str(r.shot),
            "chunk": str(r.chunk),
        }
        for by, value in where.items():
            groups.setdefault(by, {}).setdefault(value, []).append(r.agreement)
        read = str(r.read["shape"])  # "None": no object found
        row = shape_read.setdefault(r.expected["shape"], {})
        row[read] = row.get(read, 0) + 1

    def figures(agree: list[dict[str, bool]]) -> dict:
        return {
            "colour": _frac([a["background"] and a["colour"] for a in agree]),
            **{k: _frac([a[k] for a in agree]) for k in BROKEN_DOWN if k != "colour"},
            "chunks": len(agree),
        }

    return {
        "by_prompt": {
            by: {value: figures(agree) for value, agree in sorted(values.items())}
            for by, values in groups.items()
        },
        "shape_read": {k: dict(sorted(v.items())) for k, v in sorted(shape_read.items())},
    }


def round_trip(model: LoadedModel, every: int = 3) -> dict:
    """The probe on VAE round trips of whole rendered shots: held-out scene i with the
    (framing, motion) pairs k where (i + k) % every == 0, read in the generator's chunks."""
    cfg, vae = model.cfg, model.vae
    geo = Geometry.for_config(cfg)
    sizes = (cfg.chunk_pixel_frames(c) for c in range(cfg.chunks_per_shot))
    bounds = [0, *itertools.accumulate(sizes)]
    pairs = [(f, m) for f in FRAMINGS for m in MOTIONS]
    agree: list[dict[str, bool]] = []
    for i, scene in enumerate(sorted(held_out_scenes(), key=lambda s: s.caption)):
        for k, (framing, motion) in enumerate(pairs):
            if (i + k) % every:
                continue
            key = ClipKey(scene.background, scene.colour, scene.shape, framing, motion)
            pixels = render_clip(key, geo)  # (T, 3, H, W)
            z = vae.encode_clip(pixels.permute(1, 0, 2, 3)[None].to(model.dtype))
            frames = to_uint8(vae.decode_whole(z)[0])
            for a, b in itertools.pairwise(bounds):
                agree.append(read_chunk(frames[a:b]).agreement(key))
    return {
        "color_adherence": _frac([x["background"] and x["colour"] for x in agree]),
        "shape_adherence": _frac([x["shape"] for x in agree]),
        "motion_adherence": _frac([x["motion"] for x in agree]),
        "framing_adherence": _frac([x["framing"] for x in agree]),
        "chunks": len(agree),
    }


def random_demo_model(cfg: ModelConfig, seed: int = 0) -> LoadedModel:
    """The demo preset with random weights (the baseline), and its shipped tokenizer."""
    tok_dir = cfg.bundled_weights_dir / "tokenizer" if cfg.bundled_weights_dir else None
    if tok_dir is not None and tok_dir.is_dir():
        tokenizer = load_tokenizer(cfg.text, tok_dir)
    else:  # before the first export: build the same tokenizer in memory
        from training.tokenizer import save_tokenizer

        tokenizer = load_tokenizer(cfg.text, save_tokenizer(Path("artifacts/demo/tokenizer")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = build_dit(cfg).eval().requires_grad_(False)
    vae = WanVAE.random(cfg, seed=seed + 1)
    text = TextEncoder.random(cfg, seed=seed + 2, tokenizer=tokenizer)
    return LoadedModel(
        cfg, dit, vae, text, torch.device("cpu"), torch.float32, f"random (seed {seed})", False
    )


def evaluate(
    weights: str | Path | None = None,
    random_weights: bool = False,
    stories: int | None = None,
    seed: int = 0,
    progress: bool = False,
    with_round_trip: bool = False,
    seeds: int = 1,
) -> dict:
    """Run the evaluation; `weights` None = the bundled demo weights. `seeds` story sets
    (seeds `seed` .. `seed + seeds - 1`, each its own stories over the held-out scenes, cut
    points and noise) are pooled into one set of figures; `by_seed` keeps each set's own, so
    the spread between sets of 27 stories shows beside the pooled figure."""
    cfg = get_preset("demo")
    t0 = time.perf_counter()
    model = (
        random_demo_model(cfg, seed) if random_weights else load_model(cfg, weights, device="cpu")
    )
    pool = StatePool(
        KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    sets = {s: eval_stories(stories, s) for s in range(seed, seed + seeds)}
    evs = [ev for group in sets.values() for ev in group]
    results: list[ChunkResult] = []
    it = range(len(evs))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="eval-demo", unit="story")
    for i in it:
        results += run_story(model, pool, evs[i], i)
    out = summarize(evs, results)
    out.update(breakdown(results))
    if seeds > 1:
        out["by_seed"] = {}
        first = 0
        for s, group in sets.items():
            own = [r for r in results if first <= r.story < first + len(group)]
            own = [replace(r, story=r.story - first) for r in own]
            out["by_seed"][str(s)] = summarize(group, own)
            first += len(group)
    if with_round_trip:
        out["vae_round_trip"] = round_trip(model)
    out.update(
        weights=model.weights,
        preset=cfg.name,
        seed=seed,
        seeds=seeds,
        seconds=round(time.perf_counter() - t0, 1),
    )
    return out
