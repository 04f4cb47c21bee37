"""Training pieces of the demo model: the per-frame VAE, the latent normalisation fold,
teacher-forced batches, and a few real optimiser steps of each phase (tiny, no timing)."""

from __future__ import annotations

import math

import torch

from model.config import get_preset
from model.vae import WanVAE, build_autoencoder
from training.render import ClipKey, Geometry, render_clip, render_frames
from training.vae_train import (
    VAETrainConfig,
    clip_frame_offsets,
    fold_normalisation,
    init_vae,
    make_optimizer,
    train_vae_step,
    vae_batch,
)

CFG = get_preset("demo")
GEO = Geometry.for_config(CFG)
OLD = Geometry.for_config(CFG, "anchored")  # the layout the noise-placed phases render
KEY = ClipKey("blue", "yellow", "circle", "wide", "right")


def _per_frame_vae(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    model = build_autoencoder(CFG.vae)
    init_vae(model)
    return WanVAE(model, CFG)


def test_render_frames_draws_exactly_the_clip_frames():
    offsets = [0, 7, 44]
    assert torch.equal(render_frames(KEY, GEO, offsets), render_clip(KEY, GEO)[offsets])


def test_per_frame_vae_clip_latents_are_image_latents_of_every_fourth_frame():
    vae = _per_frame_vae()
    clip = render_clip(KEY, GEO, 13)  # 1 + 4*3 frames -> 4 latent frames
    whole = vae.encode_clip(clip.permute(1, 0, 2, 3)[None])[0]
    offsets = clip_frame_offsets(CFG.vae, whole.shape[0])
    assert offsets == [0, 4, 8, 12]
    frames = vae.encode_frames(clip[offsets])
    torch.testing.assert_close(whole, frames, rtol=1e-4, atol=1e-5)
    # a different pick (frames 1, 5, 9) is not what the clip encodes: the check has teeth
    assert not torch.allclose(whole[1:], vae.encode_frames(clip[[1, 5, 9]]), atol=1e-3)


def test_single_frame_training_keeps_the_vae_per_frame():
    torch.manual_seed(0)
    model = build_autoencoder(CFG.vae)
    init_vae(model)
    tc = VAETrainConfig(steps=2, frame_batch=2)
    opt = make_optimizer(model, tc)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):
        train_vae_step(model, opt, seed=0, step=step, geo=GEO, cfg=tc)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    vae = WanVAE(model.eval(), CFG)
    clip = render_clip(KEY, GEO, 9)
    whole = vae.encode_clip(clip.permute(1, 0, 2, 3)[None])[0]
    torch.testing.assert_close(whole, vae.encode_frames(clip[[0, 4, 8]]), rtol=1e-4, atol=1e-5)


def test_vae_batches_are_a_function_of_seed_and_step():
    tc = VAETrainConfig(frame_batch=3)
    a, b = vae_batch(1, 5, GEO, tc), vae_batch(1, 5, GEO, tc)
    assert torch.equal(a[0], b[0]) and a[0].shape == (3, 3, 1, GEO.height, GEO.width)
    assert not torch.equal(a[0], vae_batch(1, 6, GEO, tc)[0])


def test_folding_the_latent_statistics_is_exact():
    vae = _per_frame_vae(1)
    x = render_clip(KEY, GEO, 5).permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        mu = vae.model.encode(x).latent_dist.mode()
        out = vae.model.decode(mu).sample
    mean = mu.mean(dim=(0, 2, 3, 4))
    std = mu.std(dim=(0, 2, 3, 4))
    fold_normalisation(vae.model, mean, std)
    with torch.no_grad():
        mu2 = vae.model.encode(x).latent_dist.mode()
        out2 = vae.model.decode(mu2).sample
    torch.testing.assert_close(
        mu2, (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-4)
    unit = mu2.transpose(0, 1).flatten(1)
    assert unit.mean(dim=1).abs().max() < 1e-4 and (unit.std(dim=1) - 1).abs().max() < 1e-3


def test_unrolled_levels_are_noised_from_the_models_own_previous_x0(tmp_path):
    """With unroll_prob 1, a chunk at sampler level k >= 1 is noised from the x0 the model
    itself made at level k - 1 (its no-grad chain), level 0 from the truth; the loss is the
    x0 error against the truth either way."""
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig, DiTTrainer
    from training.render import all_scenes
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    torch.manual_seed(0)
    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # a non-trivial prediction
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=2, level_prob=1.0, unroll_prob=1.0)
    trainer = DiTTrainer(CFG, dit, text, _per_frame_vae(), tok, all_scenes()[:6], tc, seed=4)
    try:
        step = 3
        batch = trainer.batch(step)
        loss, _ = trainer.loss(batch, step)
        # the same loss, computed by hand from the chain
        from training.dit_train import _key, encode_text
        from training.teacher_forcing import teacher_forced_flow

        b, n, f = 2, CFG.chunks_per_shot, CFG.chunk_frames
        sigma = trainer.sigmas(step, b)
        level = (sigma[..., None] - trainer.levels).abs().argmin(dim=-1)
        gen = torch.Generator().manual_seed(_key(4, step, "noise"))
        eps = torch.randn(batch.clean.shape, generator=gen)
        prompt = encode_text(text, batch.ids, batch.mask)
        chain = trainer.own_chain(batch, prompt.detach(), step)
        assert len(chain) == len(trainer.levels) - 1
        base = batch.clean.clone()
        for i in range(b):
            for c in range(n):
                if level[i, c] > 0:
                    base[i, c * f : (c + 1) * f] = chain[level[i, c] - 1][i, c * f : (c + 1) * f]
        assert (level > 0).any() and not torch.equal(base, batch.clean)
        s = sigma.repeat_interleave(f, dim=1)[..., None, None, None]
        noisy = (1 - s) * base + s * eps
        flow = teacher_forced_flow(
            dit,
            batch.context,
            batch.context_flags,
            batch.clean,
            noisy,
            sigma * 1000,
            batch.gen_flag,
            prompt,
            batch.caption_index,
            trainer.mask,
        )
        err = ((noisy - s * flow) - batch.clean).pow(2).mean(dim=(2, 3, 4)).view(b, n, f).mean(2)
        torch.testing.assert_close(loss, (err / sigma).mean(), rtol=1e-5, atol=1e-6)
    finally:
        trainer.close()


def test_noise_start_is_the_centre_of_the_token_with_the_largest_pooled_noise():
    from training.start_train import noise_start

    eps = torch.zeros(2, *CFG.latent_shape)
    _, ph, pw = CFG.dit.patch_size
    eps[0, 0, 1 * ph : 2 * ph, 4 * pw : 5 * pw] = 1.0  # token (row 1, col 4)
    eps[1, 0, 3 * ph, 0] = 5.0  # one latent pixel of token (3, 0)
    eps[1, 1, 0:ph, 0:pw] = 9.0  # other channels do not count
    cell_h, cell_w = CFG.height / CFG.grid_h, CFG.width / CFG.grid_w
    expected = torch.tensor([[4.5 * cell_w, 1.5 * cell_h], [0.5 * cell_w, 3.5 * cell_h]])
    torch.testing.assert_close(noise_start(eps, CFG), expected.double())


def test_a_start_places_the_object_and_its_motion_goes_on_from_there():
    from training.probe import read_frame

    key = KEY._replace(start=(30.0, 20.0))  # wide, moving right
    frames = render_frames(key, GEO, [0, 8])
    u8 = ((frames.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    first, later = read_frame(u8[0]), read_frame(u8[1])
    assert abs(first.centre[0] - 30.0) < 0.5 and abs(first.centre[1] - 20.0) < 0.5
    vx, _ = GEO.speed("wide", "right")
    assert abs(later.centre[0] - (30.0 + 8 * vx)) < 0.5 and abs(later.centre[1] - 20.0) < 0.5
    # no start: the layout's path, unchanged
    assert torch.equal(render_frames(KEY, GEO, [0]), render_clip(KEY, GEO, 1))


def test_start_phase_targets_sit_where_the_noise_says_and_a_step_trains(tmp_path):
    """Phase 3 batches: the first chunk's target has its object at `noise_start` of the same
    step's noise, the batch is a function of (seed, step), and a step moves the weights."""
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.probe import read_frame
    from training.render import all_scenes
    from training.run import init_dit
    from training.start_train import StartTrainer, noise_start
    from training.tokenizer import save_tokenizer

    torch.manual_seed(0)
    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=3, steps=2, lr=1e-3, warmup=1, layout="anchored")
    vae = _per_frame_vae()
    trainer = StartTrainer(CFG, dit, text, vae, tok, all_scenes()[:12], tc, seed=1)
    try:
        batch, eps, *_ = trainer._prepare(5)
        assert batch.clean.shape == (3, CFG.chunk_frames, *CFG.latent_shape)
        assert batch.caption_index.shape == (3, CFG.context_frames + CFG.chunk_frames)
        again, eps2, *_ = trainer._prepare(5)
        assert torch.equal(eps, eps2) and torch.equal(batch.clean, again.clean)
        starts = noise_start(eps[:, 0], CFG)
        for i, ex in enumerate(trainer.examples(5)):
            key = ex.story.clip_key(len(ex.story.shots) - 1)
            key = key._replace(start=tuple(starts[i].tolist()))
            want = vae.encode_frames(render_frames(key, OLD, [0]))[0]
            torch.testing.assert_close(batch.clean[i, 0], want, rtol=1e-4, atol=1e-5)
            u8 = ((render_frames(key, OLD, [0])[0].permute(1, 2, 0) + 1) * 127.5).to(torch.uint8)
            centre = read_frame(u8).centre
            if centre is not None:  # an object starting at an edge may be cut by the frame
                assert abs(centre[0] - starts[i, 0]) < 3 and abs(centre[1] - starts[i, 1]) < 3
        before = [p.detach().clone() for p in dit.parameters()]
        logs = trainer.step(0)
        assert torch.isfinite(torch.tensor(logs["loss"]))
        assert any(not torch.equal(a, p) for a, p in zip(before, dit.parameters(), strict=True))
    finally:
        trainer.close()


def test_start_phase_later_levels_see_fresh_noise_and_faded_objects(tmp_path, monkeypatch):
    """At sigma = 1 the first chunk's input is the placement noise itself; at later levels it
    is re-noised with other noise (the sampler's fresh noise, which says nothing about where
    the object is) from a clean chunk faded toward its mean by a factor in [fade_min, 1]."""
    import training.start_train as st
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    seen = []

    def capture(batch, noisy, sigma, prompt):
        seen.append((noisy, sigma * CFG.sampler.num_train_timesteps))
        return torch.zeros_like(noisy)

    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=8, level_weights=(0.5, 0.5, 0.0, 0.0), fade_min=0.2)
    trainer = st.StartTrainer(CFG, dit, text, _per_frame_vae(), tok, all_scenes()[:12], tc, 2)
    try:
        monkeypatch.setattr(trainer, "flow", capture)
        prepared = trainer._prepare(0)
        batch, eps, *_ = prepared
        trainer.loss(prepared, 0)
        (noisy, t), sigma = seen[0], trainer.sigmas(0, 8)[:, 0]
        second = trainer.levels[1].item()
        assert set(sigma.tolist()) == {1.0, second}  # both kinds in this batch
        for i in range(8):
            if sigma[i] == 1:
                assert torch.equal(noisy[i], eps[i])
                continue
            noise = (noisy[i] - (1 - second) * batch.clean[i]) / second  # if it were not faded
            assert not torch.allclose(noise, eps[i], atol=0.1)  # not the placement noise
            field = batch.clean[i].mean(dim=(2, 3), keepdim=True)
            fitted = []  # the fade factor that explains the input best, per latent frame
            for f in range(CFG.chunk_frames):
                resid = noisy[i, f] - (1 - second) * field[f]
                d = (1 - second) * (batch.clean[i, f] - field[f])
                fitted.append(float((resid * d).sum() / (d * d).sum()))
            assert all(0.2 - 0.15 < k < 1 + 0.15 for k in fitted), fitted
        assert torch.allclose(t[:, 0], sigma * 1000)
    finally:
        trainer.close()


def test_whole_shot_phase_later_chunks_follow_the_placed_shot_with_fresh_noise(
    tmp_path, monkeypatch
):
    """Phase 4 with `whole_shot`: the target is the whole shot rendered from the first
    chunk's noise start (so later chunks continue from where it was placed), every chunk gets
    its own level, and only the first chunk at sigma = 1 sees the placement noise: later
    chunks at sigma = 1 see fresh noise, so they must follow their history, not their noise."""
    import training.start_train as st
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    seen = []

    def capture(batch, noisy, sigma, prompt):
        seen.append((noisy, sigma))
        return torch.zeros_like(noisy)

    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(
        batch=6, level_weights=(0.5, 0.5, 0.0, 0.0), whole_shot=True, layout="anchored"
    )
    vae = _per_frame_vae()
    trainer = st.StartTrainer(CFG, dit, text, vae, tok, all_scenes()[:12], tc, 3)
    try:
        monkeypatch.setattr(trainer, "flow", capture)
        prepared = trainer._prepare(0)
        batch, eps, *_ = prepared
        n, cf = CFG.chunks_per_shot, CFG.chunk_frames
        assert batch.clean.shape == (6, CFG.latent_frames_per_shot, *CFG.latent_shape)
        starts = st.noise_start(eps[:, 0], CFG)
        offsets = clip_frame_offsets(CFG.vae, CFG.latent_frames_per_shot)
        for i, ex in enumerate(trainer.examples(0)):
            key = ex.story.clip_key(len(ex.story.shots) - 1)
            key = key._replace(start=tuple(starts[i].tolist()))
            want = vae.encode_frames(render_frames(key, OLD, offsets))
            torch.testing.assert_close(batch.clean[i], want, rtol=1e-4, atol=1e-5)
        trainer.loss(prepared, 0)
        noisy, sigma = seen[0]
        assert sigma.shape == (6, n)
        assert bool((sigma[:, 1:] == 1).any())  # some later chunk at sigma = 1 in this batch
        for i in range(6):
            for c in range(n):
                x = noisy[i, c * cf : (c + 1) * cf]
                if sigma[i, c] != 1:
                    continue
                if c == 0:
                    assert torch.equal(x, eps[i])
                else:
                    assert not torch.allclose(x, eps[i], atol=0.1)
    finally:
        trainer.close()


def test_motion_term_weighs_the_frame_to_frame_change_within_each_chunk(tmp_path):
    """motion_weight adds the 1/sigma-weighted error of each chunk's frame-to-frame change:
    nothing for a prediction off by a constant per chunk, the hand-computed change error
    for a still prediction of a moving shot."""
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig, DiTTrainer
    from training.render import all_scenes
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=2, motion_weight=3.0)
    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    trainer = DiTTrainer(CFG, dit, text, _per_frame_vae(), tok, all_scenes()[:6], tc, seed=2)
    try:
        batch = trainer.batch(0)
        b, n, f = 2, CFG.chunks_per_shot, CFG.chunk_frames
        sigma = torch.tensor([[1.0, 0.5, 0.25, 0.1], [0.5, 1.0, 0.1, 0.25]])
        s = sigma.repeat_interleave(f, dim=1)[..., None, None, None]
        noisy = torch.randn(batch.clean.shape)
        prompt = torch.zeros(1)
        clean = batch.clean.view(b, n, f, *batch.clean.shape[2:])
        assert clean.diff(dim=2).abs().amax() > 0.1  # something moves or changes

        def loss_for(pred: torch.Tensor, weight: float) -> torch.Tensor:
            trainer.tc = DiTTrainConfig(batch=2, motion_weight=weight)
            trainer.flow = lambda *a: (noisy - pred) / s  # the model's x0 is then `pred`
            return trainer.x0_loss(batch, noisy, sigma, prompt)[0]

        offset = torch.randn(b, n, 1, *batch.clean.shape[2:]).expand_as(clean)
        shifted = (clean + offset).reshape(batch.clean.shape)
        torch.testing.assert_close(loss_for(shifted, 3.0), loss_for(shifted, 0.0))

        still = clean[:, :, :1].expand_as(clean).reshape(batch.clean.shape)
        change = clean.diff(dim=2).pow(2).mean(dim=(2, 3, 4, 5))  # (B, n): still vs moving
        expected = loss_for(still, 0.0) + 3.0 * (change / sigma).mean()
        torch.testing.assert_close(loss_for(still, 3.0), expected)
    finally:
        trainer.close()


def test_a_motion_onset_keeps_the_object_still_until_its_frame():
    key = KEY._replace(start=(30.0, 20.0), onset=8)
    centres = GEO.centres(key.framing, key.motion, 20, key.start, key.onset)
    assert torch.equal(centres[:9], centres[:1].expand(9, 2))  # still through frame 8
    vx, _ = GEO.speed(key.framing, key.motion)
    torch.testing.assert_close(
        centres[9:, 0] - centres[8, 0], vx * torch.arange(1.0, 12.0).double()
    )
    px = render_frames(key, GEO, [0, 8, 12])
    assert torch.equal(px[0], px[1]) and not torch.equal(px[1], px[2])


def test_onset_shots_start_moving_at_a_later_chunk_and_train_only_from_it(tmp_path):
    """onset_prob 1: every moving target shot stands still through chunk c - 1 and moves
    from chunk c on; chunks before c carry no loss (their prediction does not change it),
    still shots train every chunk."""
    import training.start_train as st
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=6, whole_shot=True, onset_prob=1.0, layout="anchored")
    vae = _per_frame_vae()
    trainer = st.StartTrainer(CFG, dit, text, vae, tok, all_scenes()[:12], tc, 5)
    try:
        step = next(
            s
            for s in range(20)
            if len({ex.story.shots[-1].motion == "still" for ex in trainer.examples(s)}) == 2
        )
        batch, eps, weight, _ = prepared = trainer._prepare(step)
        n, cf = CFG.chunks_per_shot, CFG.chunk_frames
        starts = st.noise_start(eps[:, 0], CFG)
        offsets = clip_frame_offsets(CFG.vae, CFG.latent_frames_per_shot)
        for i, ex in enumerate(trainer.examples(step)):
            key = ex.story.clip_key(len(ex.story.shots) - 1)
            c = int((weight[i] == 0).sum())
            if key.motion == "still":
                assert c == 0
                continue
            assert 1 <= c < n and torch.equal(weight[i, c:], torch.ones(n - c))
            key = key._replace(start=tuple(starts[i].tolist()), onset=offsets[c * cf - 1])
            want = vae.encode_frames(render_frames(key, OLD, offsets))
            torch.testing.assert_close(batch.clean[i], want, rtol=1e-4, atol=1e-5)
            still = batch.clean[i, : c * cf]
            torch.testing.assert_close(still, still[:1].expand_as(still), rtol=0, atol=1e-5)
            assert (batch.clean[i, c * cf] - batch.clean[i, c * cf - 1]).abs().amax() > 1e-3
        # the loss ignores what the model predicts for the left-out chunks
        loss, _ = trainer.loss(prepared, step)
        flow = trainer.flow
        out = (weight == 0).repeat_interleave(cf, dim=1)[..., None, None, None]
        trainer.flow = lambda *a: torch.where(out, flow(*a) + 5.0, flow(*a))
        torch.testing.assert_close(trainer.loss(prepared, step)[0], loss)
        trainer.flow = lambda *a: flow(*a) + 5.0 * ~out
        assert trainer.loss(prepared, step)[0] > loss + 1.0
    finally:
        trainer.close()


def test_frozen_later_levels_see_a_still_object_and_learn_the_moving_one(tmp_path):
    """freeze_prob 1: a chunk at a later level is noised from its first frame held through
    the chunk, while the loss still compares with the moving target."""
    import training.start_train as st
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes, stable_seed
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    seen = []
    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(
        batch=4, level_weights=(0.0, 1.0, 0.0, 0.0), whole_shot=True, freeze_prob=1.0
    )
    trainer = st.StartTrainer(CFG, dit, text, _per_frame_vae(), tok, all_scenes()[:12], tc, 2)
    try:
        trainer.flow = lambda batch, noisy, sigma, prompt: seen.append(noisy) or 0 * noisy
        prepared = trainer._prepare(1)
        clean = prepared[0].clean
        loss, _ = trainer.loss(prepared, 1)
        gen = torch.Generator().manual_seed(stable_seed(2, 1, "start-renoise"))
        noise = torch.randn(clean.shape, generator=gen)
        cf = CFG.chunk_frames
        chunks = clean.view(4, -1, cf, *clean.shape[2:])
        held = chunks[:, :, :1].expand_as(chunks).reshape(clean.shape)
        torch.testing.assert_close(seen[0], 0.5 * held + 0.5 * noise)
        assert not torch.equal(held, clean)  # something moved within a chunk
        # the model's x0 is the noisy input itself (zero flow): the error is against the
        # moving target, weighted 1/sigma = 2
        torch.testing.assert_close(loss, 2 * (seen[0] - clean).pow(2).mean())
    finally:
        trainer.close()


def test_rounded_later_levels_see_a_circle_and_learn_the_captions_shape(tmp_path):
    """round_prob 1: a chunk at a later level is noised from the same shot with its object
    drawn as a circle, while the loss compares with the caption's shape."""
    import training.start_train as st
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes, stable_seed
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    seen = []
    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(
        batch=6, level_weights=(0.0, 1.0, 0.0, 0.0), whole_shot=True, round_prob=1.0
    )
    vae = _per_frame_vae()
    trainer = st.StartTrainer(CFG, dit, text, vae, tok, all_scenes(), tc, 2)
    try:
        trainer.flow = lambda batch, noisy, sigma, prompt: seen.append(noisy) or 0 * noisy
        step = next(
            s
            for s in range(20)
            if {"circle", "square"} <= {ex.story.scene.shape for ex in trainer.examples(s)}
        )
        prepared = trainer._prepare(step)
        clean, rounds = prepared[0].clean, prepared[3]
        loss, _ = trainer.loss(prepared, step)
        gen = torch.Generator().manual_seed(stable_seed(2, step, "start-renoise"))
        noise = torch.randn(clean.shape, generator=gen)
        torch.testing.assert_close(seen[0], 0.5 * rounds + 0.5 * noise)
        offsets = clip_frame_offsets(CFG.vae, CFG.latent_frames_per_shot)
        for i, ex in enumerate(trainer.examples(step)):
            key = ex.story.clip_key(len(ex.story.shots) - 1)
            want = vae.encode_frames(render_frames(key._replace(shape="circle"), GEO, offsets))
            torch.testing.assert_close(rounds[i], want, rtol=1e-4, atol=1e-5)
            # a circle is its own round version; a square or triangle is not
            assert torch.equal(rounds[i], clean[i]) == (key.shape == "circle")
        torch.testing.assert_close(loss, 2 * (seen[0] - clean).pow(2).mean())
    finally:
        trainer.close()


def test_object_mask_covers_the_objects_latent_pixels_and_one_around():
    """object_mask: the object's coverage of each latent pixel's 8x8 patch, dilated by one
    latent pixel; zero on the rest of the background."""
    from training.dit_train import object_mask
    from training.render import background_value

    stride = CFG.vae.spatial_stride
    key = KEY._replace(framing="close-up", motion="still", start=(44.0, 28.0))
    px = render_frames(key, GEO, [0])
    bg = background_value(key)[None]
    assert torch.equal(px[0, :, 0, 0], bg[0])  # the corner is background
    mask = object_mask(px, bg, stride)[0]
    assert mask.shape == (CFG.latent_h, CFG.latent_w)
    covered = ((px[0] - bg[0, :, None, None]).abs().amax(dim=0) > 0.02).float()
    frac = torch.nn.functional.avg_pool2d(covered[None, None], stride)[0, 0]
    assert torch.all(mask >= frac) and mask.max() == 1.0  # a close-up fills whole patches
    touched = torch.nn.functional.max_pool2d((frac > 0).float()[None], 3, 1, 1)[0] > 0
    assert torch.all(mask[~touched] == 0) and torch.all(mask[touched] > 0)
    assert 0 < int(touched.sum()) < mask.numel() // 2


def test_object_weight_counts_errors_on_the_object_more_and_train_chunks_trims_shots(tmp_path):
    """With object_weight w, a latent pixel's squared x0 error counts 1 + w * mask, normalised
    by the weights (so an error everywhere costs the same as without); train_chunks keeps
    the first chunks of each whole target shot."""
    import training.start_train as st
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes
    from training.run import init_dit
    from training.tokenizer import save_tokenizer

    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=2, whole_shot=True, train_chunks=2, object_weight=6.0)
    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    trainer = st.StartTrainer(CFG, dit, text, _per_frame_vae(), tok, all_scenes()[:6], tc, 1)
    try:
        batch, *_ = trainer._prepare(0)
        n, cf = 2, CFG.chunk_frames
        assert batch.clean.shape == (2, n * cf, *CFG.latent_shape)
        assert batch.object_mask.shape == (2, n * cf, 1, CFG.latent_h, CFG.latent_w)
        assert 0 < float(batch.object_mask.mean()) < 0.5
        sigma = torch.tensor([[1.0, 0.5], [0.25, 0.1]])
        s = sigma.repeat_interleave(cf, dim=1)[..., None, None, None]
        noisy = torch.randn(batch.clean.shape)

        def loss_for(pred: torch.Tensor, weight: float) -> torch.Tensor:
            trainer.tc = DiTTrainConfig(object_weight=weight)
            trainer.flow = lambda *a: (noisy - pred) / s  # the model's x0 is then `pred`
            return trainer.x0_loss(batch, noisy, sigma, torch.zeros(1))[0]

        everywhere = batch.clean + 0.5
        torch.testing.assert_close(loss_for(everywhere, 6.0), loss_for(everywhere, 0.0))
        on_object = batch.clean + 0.5 * (batch.object_mask > 0)
        px = 1 + 6.0 * batch.object_mask
        sq = 0.25 * (batch.object_mask > 0).float()
        per_frame = (sq * px).sum(dim=(2, 3, 4)) / px.sum(dim=(2, 3, 4))  # channels cancel
        expected = (per_frame.view(2, n, cf).mean(dim=2) / sigma).mean()
        torch.testing.assert_close(loss_for(on_object, 6.0), expected)
        assert loss_for(on_object, 6.0) > 2 * loss_for(on_object, 0.0)
    finally:
        trainer.close()


# -- phase 10: the decoder on the generator's own latents ----------------------------------
def test_the_decoder_phase_records_every_latent_with_the_frame_it_stands_for():
    from training.decoder_train import DecoderTrainConfig, generated_frames
    from training.evaluate import random_demo_model
    from training.render import all_scenes

    model = random_demo_model(CFG, seed=1)
    data = generated_frames(model, all_scenes()[:5], DecoderTrainConfig(stories=2), seed=4)
    again = generated_frames(model, all_scenes()[:5], DecoderTrainConfig(stories=2), seed=4)
    assert len(data) == len(again) and all(
        torch.equal(a.latent, b.latent) and a.key == b.key for a, b in zip(data, again, strict=True)
    )  # a function of the seed
    assert len(data) % CFG.chunk_frames == 0
    assert all(d.latent.shape == CFG.latent_shape for d in data)
    starts = [i for i, d in enumerate(data) if d.offset == 0]
    assert len(starts) == 6  # three shots per story, two stories
    for a, b in zip(starts, [*starts[1:], len(data)], strict=True):  # within a shot: 0, 4, 8, ...
        assert [d.offset for d in data[a:b]] == [4 * j for j in range(b - a)]
        assert len({d.key for d in data[a:b]}) == 1


def test_a_decoder_step_trains_the_decoder_and_nothing_else():
    from training.decoder_train import (
        DecoderTrainConfig,
        GeneratedFrame,
        decoder_step,
        make_decoder_optimizer,
    )

    vae = _per_frame_vae(seed=2)
    tc = DecoderTrainConfig(steps=3, frame_batch=4)
    geo = Geometry.for_config(CFG, "centred")
    px = render_frames(KEY, geo, [0, 4])
    data = [
        GeneratedFrame(z.clone(), KEY, o)
        for z, o in zip(vae.encode_frames(px), (0, 4), strict=True)
    ]
    before = {k: v.clone() for k, v in vae.model.state_dict().items()}
    opt = make_decoder_optimizer(vae, tc)
    losses = [decoder_step(vae, opt, data, geo, tc, seed=0, step=s)["l1"] for s in range(3)]
    assert all(math.isfinite(x) for x in losses)
    after = vae.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)


def test_the_sharpen_step_trains_on_rendered_frames_alone_with_its_own_batches():
    """real_share 1 needs no generated frames; data_seed offsets the run seed of the batches
    (the same steps as a run seeded that much higher, others than the run's own seed)."""
    from dataclasses import replace

    from training.decoder_train import DecoderTrainConfig, decoder_step, make_decoder_optimizer

    geo = Geometry.for_config(CFG, "centred")
    tc = DecoderTrainConfig(steps=2, stories=0, frame_batch=2, real_share=1.0)

    def trained(tc: DecoderTrainConfig, seed: int) -> dict[str, torch.Tensor]:
        vae = _per_frame_vae(seed=3)
        opt = make_decoder_optimizer(vae, tc)
        for s in range(2):
            assert math.isfinite(decoder_step(vae, opt, [], geo, tc, seed=seed, step=s)["l1"])
        return {k: v.clone() for k, v in vae.model.decoder.state_dict().items()}

    own = trained(replace(tc, data_seed=7), seed=1)
    same = trained(tc, seed=8)
    other = trained(tc, seed=1)
    assert all(torch.equal(own[k], same[k]) for k in own)
    assert any(not torch.equal(own[k], other[k]) for k in own)


def test_the_decoder_loss_weights_spilled_object_pixels_only_when_asked():
    """A decoded object larger than the target's: its spilled pixels weigh as much as the
    target's object with `weight_spill`, and as background without."""
    from training.decoder_train import DecoderTrainConfig, loss_weight
    from training.render import background_value, object_pixels

    geo = Geometry.for_config(CFG, "centred")
    wide = render_frames(KEY, geo, [0])
    close = render_frames(KEY._replace(framing="close-up"), geo, [0])  # same centre, larger
    bg = background_value(KEY)[None]
    target = object_pixels(wide, bg)[:, 0] > 0
    spill = (object_pixels(close, bg)[:, 0] > 0) & ~target
    assert spill.sum() > 50
    plain = loss_weight(close, wide, bg, DecoderTrainConfig())[:, 0]
    both = loss_weight(close, wide, bg, DecoderTrainConfig(weight_spill=True))[:, 0]
    assert torch.all(plain[target] == 5.0) and torch.all(both[target] == 5.0)
    assert torch.all(plain[spill] == 1.0)
    assert (both[spill] == 5.0).float().mean() > 0.9  # all but the faint anti-aliased rim
    assert torch.all(both[~target & ~spill] == 1.0)


def test_centred_start_phase_targets_ignore_the_noise(tmp_path):
    """In the centred layout the first chunk's target is the caption's own shot, starting at
    the frame's centre, whatever the placement noise says."""
    from model.text import build_umt5, load_tokenizer
    from training.dit_train import DiTTrainConfig
    from training.render import all_scenes
    from training.run import init_dit
    from training.start_train import StartTrainer
    from training.tokenizer import save_tokenizer

    dit, text = init_dit(CFG, 0), build_umt5(CFG.text)
    tok = load_tokenizer(CFG.text, save_tokenizer(tmp_path / "tok"))
    tc = DiTTrainConfig(batch=3, layout="centred")
    trainer = StartTrainer(CFG, dit, text, _per_frame_vae(), tok, all_scenes()[:12], tc, seed=1)
    try:
        batch, *_ = trainer._prepare(5)
        keys = [ex.story.clip_key(len(ex.story.shots) - 1) for ex in trainer.examples(5)]
        assert all(k.start is None for k in keys)
        expected = torch.stack(trainer.cache.clips(keys, CFG.chunk_frames))
        assert torch.equal(batch.clean, expected)
    finally:
        trainer.close()


def test_a_phase_data_seed_offsets_the_run_seed_of_its_batches(tmp_path):
    """train_start_phase draws a phase's batches with the run's seed plus the phase's
    `data_seed`: with 1 it trains exactly as a trainer seeded one higher, and not as the
    run's own seed (phase 9 sees stories the phases before it did not)."""
    from dataclasses import replace

    from model.text import build_umt5
    from training.dit_train import DiTTrainConfig
    from training.run import TrainDemoConfig, _tokenizer_and_scenes, init_dit, train_start_phase
    from training.start_train import StartTrainer

    vae = _per_frame_vae()
    phase = DiTTrainConfig(steps=1, batch=1, whole_shot=True, train_chunks=2, layout="centred")

    def fresh():
        torch.manual_seed(0)
        return init_dit(CFG, 0), build_umt5(CFG.text)

    def by_phase(data_seed: int) -> dict:
        dit, text = fresh()
        tc = TrainDemoConfig(seed=4, motion=replace(phase, data_seed=data_seed), workers=1)
        train_start_phase("motion", CFG, tc, tmp_path / f"w{data_seed}", vae, dit, text, False)
        return dit.state_dict()

    def by_trainer(seed: int) -> dict:
        dit, text = fresh()
        tok, scenes = _tokenizer_and_scenes(CFG, tmp_path / f"t{seed}")
        trainer = StartTrainer(CFG, dit, text, vae, tok, scenes, phase, seed)
        try:
            trainer.step(0)
        finally:
            trainer.close()
        return dit.state_dict()

    offset, direct, own = by_phase(1), by_trainer(5), by_phase(0)
    assert all(torch.equal(offset[k], direct[k]) for k in offset)
    assert any(not torch.equal(offset[k], own[k]) for k in offset)
