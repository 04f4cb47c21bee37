"""The per-session multi-shot generator on the tiny preset (random weights)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import get_preset
from model.generator import ShotStreamGenerator, load_model


@pytest.fixture(scope="module")
def model():
    return load_model(get_preset("tiny").replace(chunks_per_shot=3), seed=0)


@pytest.fixture
def pool(model):
    return StatePool(
        KVLayout.for_config(model.cfg), model.vae.new_decoder_state, model.dtype, model.device
    )


_owners = itertools.count()


def _run(model, pool, seed, shots=(("wide shot", 2), ("close-up", 3))):
    lease = pool.acquire(f"session-{next(_owners)}")
    gen = ShotStreamGenerator(model, lease, "a red circle on a blue background", seed=seed)
    out = []
    for text, n in shots:
        start = gen.start_shot(text)
        out.append(start)
        out.extend(gen.next_chunk() for _ in range(n))
    return gen, lease, out


def test_chunks_frames_and_shot_boundaries(model, pool):
    gen, lease, out = _run(model, pool, seed=1)
    starts = [o for o in out if hasattr(o, "context_indices")]
    chunks = [o for o in out if hasattr(o, "frames")]
    assert [c.frames.shape[0] for c in chunks] == [9, 12, 9, 12, 12]  # 9 first in each shot
    h, w = model.cfg.height, model.cfg.width
    assert all(c.frames.shape[1:] == (h, w, 3) and c.frames.dtype == torch.uint8 for c in chunks)
    assert starts[0].context_indices == []
    # the first shot was cut after 2 chunks (21 frames): its real range is used
    assert starts[1].context_indices == [0, 4, 8, 12, 16, 20]
    assert [c.last_in_shot for c in chunks] == [False, False, False, False, True]
    assert {"denoise_ms", "decode_ms", "refresh_ms"} <= set(chunks[0].timings)
    assert {"text_ms", "context_ms", "prefill_ms"} <= set(starts[1].timings)
    pool.release(lease)


def test_seeded_and_reproducible(model, pool):
    shots = (("wide", 1), ("close-up", 1))
    _, l1, a = _run(model, pool, seed=7, shots=shots)
    _, l2, b = _run(model, pool, seed=7, shots=shots)
    _, l3, c = _run(model, pool, seed=8, shots=shots)
    fa = [o.frames for o in a if hasattr(o, "frames")]
    fb = [o.frames for o in b if hasattr(o, "frames")]
    fc = [o.frames for o in c if hasattr(o, "frames")]
    assert all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True))
    assert not torch.equal(fa[0], fc[0])
    for lease in (l1, l2, l3):
        pool.release(lease)


def test_failed_chunk_commits_nothing(model, pool):
    """An exception in the refresh pass leaves decoder state, kept frames and counters as
    they were; the retried chunk then equals an undisturbed run."""
    gen, lease, _ = _run(model, pool, seed=3, shots=(("wide", 1),))
    ref_gen, ref_lease, _ = _run(model, pool, seed=3, shots=(("wide", 1),))
    slots, frames_before = list(lease.decoder.slots), lease.frames.names()
    real = gen.model.dit.forward

    def broken(x, t, pass_, need_output=True, record=None):
        if not need_output:  # the refresh pass, after the decode already ran
            raise RuntimeError("injected failure")
        return real(x, t, pass_, need_output, record)

    gen.model.dit.forward = broken
    try:
        with pytest.raises(RuntimeError, match="injected"):
            gen.next_chunk()
    finally:
        del gen.model.dit.forward
    assert gen.chunk == 1 and lease.frames.names() == frames_before
    assert all(a is b for a, b in zip(lease.decoder.slots, slots, strict=True))
    retry, expected = gen.next_chunk(), ref_gen.next_chunk()
    assert torch.equal(retry.frames, expected.frames)
    pool.release(lease)
    pool.release(ref_lease)


def test_pool_returns_to_zero_and_reuses_buffers(model, pool):
    _, lease, _ = _run(model, pool, seed=2, shots=(("wide", 1),))
    assert pool.bytes_in_use > lease.kv.nbytes  # decoder slots and frames count too
    kv = lease.kv
    pool.release(lease)
    pool.release(lease)  # idempotent
    assert pool.bytes_in_use == 0 and pool.leases == 0
    again = pool.acquire("next")
    assert again.kv is kv  # buffers reused, not reallocated
    pool.release(again)


def test_batched_chunks_equal_each_session_alone(model, pool):
    """Sessions at different chunk indices and shots, batched into one DiT pass, give what
    each gives alone (their own caches, captions, flags and noise)."""
    from model.generator import next_chunks

    def make(seed, chunks_before, shot_texts):
        gen = ShotStreamGenerator(
            model, pool.acquire(f"session-{next(_owners)}"), "a scene", seed=seed, trace={}
        )
        for text in shot_texts:
            gen.start_shot(text)
        for _ in range(chunks_before):
            gen.next_chunk()
        return gen

    setups = [(1, 0, ["wide"]), (2, 2, ["close-up"]), (3, 1, ["wide", "close-up"])]
    alone = [make(*s) for s in setups]
    batch = [make(*s) for s in setups]
    ref = [g.next_chunk() for g in alone]
    got = next_chunks(batch)
    for a, b, r, o in zip(alone, batch, ref, got, strict=True):
        key = ("chunk", r.shot, r.chunk)
        assert (o.shot, o.chunk) == (r.shot, r.chunk)
        assert (a.trace[key]["x0"] - b.trace[key]["x0"]).abs().max() < 1e-4
        assert (o.frames.int() - r.frames.int()).abs().max() <= 1
        assert b.chunk == a.chunk
    for g in alone + batch:
        pool.release(g.lease)


@pytest.mark.parametrize("keep", [0, 1, 2], ids=["replace-shot", "keep-1", "keep-2"])
def test_a_shot_rolled_back_equals_one_that_never_generated_those_chunks(model, pool, keep):
    """Shot A, then shot B for 3 chunks rolled back to its first `keep` chunks, then shot C:
    every chunk of C, bit for bit, and C's context, equal a run where B only ever made
    `keep` chunks (with keep 0, B never started: C takes its place). Also across a second
    boundary (shot D)."""

    def story(rolled_back: bool):
        lease = pool.acquire(f"session-{next(_owners)}")
        gen = ShotStreamGenerator(model, lease, "a red circle on a blue background", seed=5)
        gen.start_shot("shot A")
        for _ in range(3):
            gen.next_chunk()
        if rolled_back or keep:
            gen.start_shot("shot B")
            for _ in range(3 if rolled_back else keep):
                gen.next_chunk()
        if rolled_back:
            gen.truncate_shot(sum(model.cfg.chunk_pixel_frames(c) for c in range(keep)))
        after = []
        for text in ("shot C", "shot D"):
            start = gen.start_shot(text)
            after.append((start.shot, start.context_indices))
            after += [gen.next_chunk().frames for _ in range(2)]
        pool.release(lease)
        return after

    rolled, never = story(True), story(False)
    assert len(rolled) == len(never)
    for a, b in zip(rolled, never, strict=True):
        if isinstance(a, tuple):
            assert a == b
        else:
            assert torch.equal(a, b)


def test_a_cut_inside_a_chunk_keeps_that_chunks_first_frames(model, pool):
    """Shot B cut 4 frames into its second chunk (9 + 4 = 13 frames): the next shot's
    context is picked over B's 13 frames, and the picked frames are B's own pixels."""
    from model.context import select_context

    lease = pool.acquire(f"session-{next(_owners)}")
    trace: dict = {}
    gen = ShotStreamGenerator(model, lease, "caption", seed=6, trace=trace)
    gen.start_shot("A")
    a = [gen.next_chunk().frames for _ in range(2)]
    gen.start_shot("B")
    b = [gen.next_chunk().frames for _ in range(2)]
    gen.truncate_shot(13)
    start = gen.start_shot("C")
    picks = select_context([21, 13], model.cfg.context_frames)
    assert start.context_indices == [p.index for p in picks]
    seen = torch.cat([*a, *b])[: 21 + 13]  # what the viewer saw, as decoded uint8
    assert max(start.context_indices) < 34 and start.context_indices[-1] == 33
    pixels = trace["context_pixels"][-1]  # the frames encoded for C's context (float)
    from model.vae import to_uint8

    picked_b = [i for i in start.context_indices if i >= 21]
    assert torch.equal(to_uint8(pixels[-len(picked_b) :]), seen[picked_b])
    pool.release(lease)


def test_truncate_refuses_what_was_not_generated(model, pool):
    lease = pool.acquire(f"session-{next(_owners)}")
    gen = ShotStreamGenerator(model, lease, "caption", seed=2)
    with pytest.raises(ValueError):
        gen.truncate_shot(0)  # no shot yet
    gen.start_shot("a")
    gen.next_chunk()
    with pytest.raises(ValueError):
        gen.truncate_shot(10)  # only one chunk (9 frames) exists
    pool.release(lease)
