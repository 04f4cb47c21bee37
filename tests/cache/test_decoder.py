"""Per-session streaming decoder state: reset per shot, commit on success, byte accounting."""

from __future__ import annotations

import pytest
import torch

from cache.decoder import DecoderState
from model.config import VAEConfig
from model.vae import WanVAE

torch.set_flush_denormal(True)  # random-weight nets hit denormals on CPU (10-30x slower)

CFG = VAEConfig(base_dim=4)
H, W = 32, 48


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core host, OpenMP spin-waits made decodes 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE.random(CFG, seed=7)


def _latents(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, CFG.z_dim, H // 8, W // 8, generator=g)


# -- the state on its own ---------------------------------------------------------------
def test_nbytes_counts_each_storage_once():
    state = DecoderState(num_slots=4)
    a = torch.zeros(2, 3, dtype=torch.float32)  # 24 bytes
    b = torch.zeros(5, dtype=torch.bfloat16)  # 10 bytes
    state.commit([a, a, b, "Rep"], latent_frames=1)
    assert state.nbytes == 34
    assert state.live_slots == 3
    state.reset()
    assert state.nbytes == 0 and state.first and state.latent_frames == 0
    assert state.slots == [None] * 4


def test_working_copy_does_not_touch_the_state():
    state = DecoderState(num_slots=2)
    work = state.working_copy()
    work[0] = torch.ones(1)
    assert state.slots == [None, None] and state.first
    with pytest.raises(ValueError, match="expected 2 slots"):
        state.commit([None], latent_frames=1)
    state.commit(work, latent_frames=0)  # nothing decoded: still the start of a shot
    assert state.first


# -- with the real decoder ------------------------------------------------------------------
def test_first_chunk_of_every_shot_gives_9_frames(vae):
    """Reset at a shot cut: the new shot's first chunk is 9 frames and equals a fresh decode."""
    shot_a, shot_b = _latents(6, seed=1), _latents(3, seed=2)
    state = vae.new_decoder_state()
    counts = [vae.decode_chunk(state, c).shape[1] for c in shot_a.split(3, dim=1)]
    assert counts == [9, 12] and not state.first and state.latent_frames == 6
    grown = state.nbytes
    assert grown > 0 and state.live_slots == vae.num_decoder_slots - 1  # the shortcut conv

    carried = vae.decode_chunk(state, shot_b)  # wrong: no reset at the cut
    assert carried.shape[1] == 12

    state.reset()
    assert state.nbytes == 0
    after_cut = vae.decode_chunk(state, shot_b)
    fresh = vae.decode_chunk(vae.new_decoder_state(), shot_b)
    assert after_cut.shape[1] == 9
    assert torch.equal(after_cut, fresh)
    assert not torch.allclose(carried[:, -9:], fresh, atol=1e-3)  # the carried cache blends the cut


class Boom(RuntimeError):
    pass


def _fail_on_call(module: torch.nn.Module, n: int):
    """A forward pre-hook that raises on the module's n-th call (1-based)."""
    calls = {"n": 0}

    def hook(_mod, _args):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure on call {n}")

    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("chunk", [0, 1], ids=["first chunk", "later chunk"])
def test_failed_chunk_leaves_the_state_unchanged(vae, chunk):
    """An exception on the 2nd latent of a chunk: slots, flag and count are as before, and a
    retry gives exactly the frames of an undisturbed run."""
    z = _latents(6, seed=3)
    chunks = list(z.split(3, dim=1))
    clean_state = vae.new_decoder_state()
    expected = [vae.decode_chunk(clean_state, c) for c in chunks]

    state = vae.new_decoder_state()
    for c in range(chunk):
        vae.decode_chunk(state, chunks[c])
    before = list(state.slots)
    first, frames, nbytes = state.first, state.latent_frames, state.nbytes

    handle = _fail_on_call(vae.model.decoder.conv_out, 2)  # the decoder's last conv, 2nd latent
    try:
        with pytest.raises(Boom):
            vae.decode_chunk(state, chunks[chunk])
    finally:
        handle.remove()

    assert all(a is b for a, b in zip(state.slots, before, strict=True))
    assert (state.first, state.latent_frames, state.nbytes) == (first, frames, nbytes)
    retry = vae.decode_chunk(state, chunks[chunk])
    assert torch.equal(retry, expected[chunk])
