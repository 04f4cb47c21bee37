"""The Wan VAE wrapper: golden parity, streamed == whole decode, normalisation, strict loading."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from model.config import VAEConfig
from model.golden import Golden, replay_vae_decode_calls, replay_vae_encode_calls
from model.vae import (
    WanVAE,
    build_autoencoder,
    load_vae,
    original_vae_key,
    original_vae_shapes,
    to_uint8,
    use_fast_cpu_kernels,
)
from model.weights import WeightsError

torch.set_flush_denormal(True)  # random-weight nets hit denormals on CPU (10-30x slower)

GOLDEN_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("golden_*.safetensors"))
SMALL = VAEConfig(base_dim=4)  # same code paths as the real VAE, fast on CPU
H, W = 32, 48  # pixels; 4 x 6 latents


def _keys_file(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (GOLDEN_DIR / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ")
            out[key] = tuple(int(x) for x in shape.strip("[]").split(","))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core host, OpenMP spin-waits made decodes 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_vae() -> WanVAE:
    return WanVAE.random(SMALL, seed=3)


def _latents(frames: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, SMALL.z_dim, H // 8, W // 8, generator=g)


# -- golden parity ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def golden_vae(request) -> tuple[Golden, WanVAE]:
    g = Golden(request.param)
    return g, WanVAE.from_original_state(g.cfg, g.weights("vae"), what=g.path.name)


def test_golden_vae_encode_parity(golden_vae):
    """Every recorded VAE encode (context frames and the multi-frame clip) within tolerance."""
    g, vae = golden_vae
    checks = list(replay_vae_encode_calls(g, vae))
    assert len(checks) == sum(c["kind"] == "vae_encode" for c in g.calls) > 0
    worst = max(checks, key=lambda c: c.max_abs)
    print(f"vae.encode max abs {worst.max_abs:.3g} ({worst.name})")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_golden_vae_decode_parity_whole_and_streamed(golden_vae):
    """Each shot's whole decode and its chunk-by-chunk decode (9 then 12 frames) match, on
    the product's default path (the fast CPU kernels), within the documented tolerance."""
    g, vae = golden_vae
    assert use_fast_cpu_kernels(vae.model) == 0  # already routed: this is the served path
    checks = list(replay_vae_decode_calls(g, vae))
    shots = sum(c["kind"] == "vae_decode" for c in g.calls)
    assert sum(c.name.endswith("streamed vs whole") for c in checks) == shots > 0
    worst = max(checks, key=lambda c: c.max_abs)
    print(f"vae.decode max abs {worst.max_abs:.3g} ({worst.name})")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


class _Perturbed(Golden):
    """A golden file whose decoded pixels read `delta` higher than recorded."""

    def __init__(self, path, delta: float):
        super().__init__(path)
        self.delta = delta

    def __getitem__(self, name):
        t = super().__getitem__(name)
        return t + self.delta if name.endswith(".decode.pixels") else t


def test_decode_tolerance_is_the_stated_one_or_a_multiple_of_the_references_own_spread(golden_vae):
    """The rule of model/golden.py: max(per_call_abs, NOISE_MULTIPLE x the reference's own
    re-run spread for the group), still far below what a real error moves: pixels off by
    1e-4 (a 1/80 of a uint8 level) fail."""
    from model.golden import NOISE_MULTIPLE, observed_spread

    g, vae = golden_vae
    spread = observed_spread(g.meta["tolerances"])["vae.decode"]
    assert g.tolerance("vae.decode", g.per_call_tol) == max(1e-5, NOISE_MULTIPLE * spread)
    assert g.tolerance("vae.decode", 0.0) == 0.0  # exact checks stay exact
    assert g.tolerance("vae.decode", g.per_call_tol) < 1e-4
    bad = _Perturbed(g.path, 1e-4)
    checks = [
        c
        for c in replay_vae_decode_calls(bad, vae)
        if not c.name.endswith(("streamed vs whole", ".frames"))  # not against the recording
    ]
    assert checks and not any(c.ok for c in checks)


def test_full_size_original_keys_are_the_real_file_keys():
    """Our original-layout key set for the real VAE is the 194 names and shapes of Wan2.1_VAE.pth."""
    ours = {k: tuple(v) for k, v in original_vae_shapes(VAEConfig()).items()}
    assert ours == _keys_file("keys_vae.txt")


# -- streaming decode -------------------------------------------------------------------
def test_streamed_decode_equals_whole_decode(small_vae):
    """Three chunks of 3 latents with the carried state give 9, 12, 12 frames = the whole decode."""
    z = _latents(9)
    whole = small_vae.decode_whole(z)
    state = small_vae.new_decoder_state()
    chunks = [small_vae.decode_chunk(state, c) for c in z.split(3, dim=1)]
    assert [c.shape[1] for c in chunks] == [9, 12, 12]
    streamed = torch.cat(chunks, dim=1)
    assert whole.shape == streamed.shape == (1, 1 + 4 * 8, 3, H, W)
    diff = float((streamed - whole).abs().max())
    print(f"streamed vs whole decode max abs {diff:.3g}")
    assert diff <= 1e-6
    assert float(whole.abs().max()) <= 1.0 and whole.dtype == torch.float32


def test_one_latent_per_call_equals_whole_decode(small_vae):
    z = _latents(4, seed=1)
    state = small_vae.new_decoder_state()
    frames = [small_vae.decode_chunk(state, z[:, i : i + 1]) for i in range(4)]
    assert [f.shape[1] for f in frames] == [1, 4, 4, 4]
    assert torch.allclose(torch.cat(frames, 1), small_vae.decode_whole(z), atol=1e-6, rtol=0)


def test_decode_chunk_checks_batch_and_channels(small_vae):
    state = small_vae.new_decoder_state(batch=1)
    with pytest.raises(ValueError, match="batch"):
        small_vae.decode_chunk(state, _latents(3, batch=2))
    with pytest.raises(ValueError):
        small_vae.decode_chunk(state, torch.zeros(1, 3, SMALL.z_dim + 1, 4, 6))
    assert state.first and state.latent_frames == 0


def test_batched_sessions_decode_like_single_ones(small_vae):
    """Two sessions decoded as batch rows give the same frames as each alone."""
    z = _latents(3, seed=5, batch=2)
    both = small_vae.decode_chunk(small_vae.new_decoder_state(batch=2), z)
    one = small_vae.decode_chunk(small_vae.new_decoder_state(), z[1:])
    diff = float((both[1:] - one).abs().max())
    print(f"batched vs alone max abs {diff:.3g}")  # kernels sum in another order per batch size
    assert diff <= 1e-4  # pixels span [-1, 1]: 1e-4 is 1/80 of a uint8 level


# -- encode and normalisation ---------------------------------------------------------------
def test_encode_uses_posterior_mean_and_normalises(small_vae):
    """encode_clip == diffusers' own encode (latent_dist.mean), normalised with the Wan stats."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 5, H, W, generator=g) * 2 - 1
    ours = small_vae.encode_clip(x)  # (B, F, C, h, w)
    with torch.inference_mode():
        mu = small_vae.model.encode(x).latent_dist.mean  # (B, C, F, h, w)
    mean = torch.tensor(SMALL.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(SMALL.latents_std).view(1, -1, 1, 1, 1)
    expected = ((mu - mean) / std).permute(0, 2, 1, 3, 4)
    assert ours.shape == (2, 2, SMALL.z_dim, H // 8, W // 8)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)


def test_encode_frames_is_per_frame_and_first_latent_of_a_clip(small_vae):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, H, W, generator=g) * 2 - 1
    batch = small_vae.encode_frames(x)
    alone = torch.cat([small_vae.encode_frames(x[i : i + 1]) for i in range(3)])
    assert batch.shape == (3, SMALL.z_dim, H // 8, W // 8)
    assert torch.allclose(batch, alone, atol=1e-5, rtol=0)
    clip = torch.cat([x[:1, :, None], torch.rand(1, 3, 4, H, W, generator=g)], dim=2)
    assert torch.equal(small_vae.encode_clip(clip)[0, 0], alone[0])  # latent 0 sees pixel 0 only


def test_normalisation_round_trip(small_vae):
    z = _latents(2).permute(0, 2, 1, 3, 4)
    assert torch.allclose(small_vae.normalize(small_vae.denormalize(z)), z, atol=1e-6)


def test_encode_refuses_bad_frame_counts_and_sizes(small_vae):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        small_vae.encode_clip(torch.zeros(1, 3, 4, H, W))
    with pytest.raises(ValueError, match="multiple"):
        small_vae.encode_frames(torch.zeros(1, 3, H + 4, W))


def test_to_uint8_rounds_to_nearest():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.7]).view(7, 1, 1, 1).expand(7, 3, 2, 2)
    u8 = to_uint8(x)
    assert u8.shape == (7, 2, 2, 3) and u8.dtype == torch.uint8
    assert u8[:, 0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255, 255]
    truncated = (127.5 * (x.clamp(-1, 1) + 1)).to(torch.uint8).permute(0, 2, 3, 1)
    assert int((u8.int() - truncated.int()).abs().max()) <= 1  # the reference truncates


# -- strict loading, both layouts ------------------------------------------------------------
def _original_sd(model) -> dict[str, torch.Tensor]:
    return {original_vae_key(k, SMALL.num_res_blocks): v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(11)
    return build_autoencoder(SMALL).eval()


def _same_decode(a: WanVAE, b: WanVAE) -> bool:
    z = _latents(2, seed=9)
    return torch.equal(a.decode_whole(z), b.decode_whole(z))


def test_load_original_pth(tmp_path, source_model):
    torch.save(_original_sd(source_model), tmp_path / "Wan2.1_VAE.pth")
    loaded = load_vae(SMALL, tmp_path)  # the folder holding the file
    assert _same_decode(loaded, WanVAE(source_model, SMALL))
    assert _same_decode(load_vae(SMALL, tmp_path / "Wan2.1_VAE.pth"), loaded)


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_original_pth_faults_name_the_key(tmp_path, source_model, fault):
    sd = _original_sd(source_model)
    key = "decoder.upsamples.4.shortcut.weight"  # up stage 1's channel-changing shortcut
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        key = "decoder.upsamples.15.residual.2.weight"
        sd[key] = torch.zeros(1)
    else:
        sd[key] = torch.zeros(2, 2, 1, 1, 1)
    torch.save(sd, tmp_path / "vae.pth")
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_vae(SMALL, tmp_path / "vae.pth")


def test_wrong_files_are_weights_errors(tmp_path, source_model):
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="readable"):
        load_vae(SMALL, tmp_path / "garbage.pth")
    torch.save({"generator": {"x": torch.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(WeightsError, match="flat state dict"):
        load_vae(SMALL, tmp_path / "nested.pt")
    torch.save(source_model.state_dict(), tmp_path / "diffusers_keys.pth")  # wrong layout
    with pytest.raises(WeightsError, match="missing keys: conv1.bias"):
        load_vae(SMALL, tmp_path / "diffusers_keys.pth")
    torch.save(_original_sd(source_model), tmp_path / "other_size.pth")
    with pytest.raises(WeightsError, match="wrong shape"):
        load_vae(VAEConfig(base_dim=8), tmp_path / "other_size.pth")
    with pytest.raises(WeightsError, match="no VAE weights"):
        load_vae(SMALL, tmp_path / "empty")


def test_load_diffusers_folder(tmp_path, source_model):
    source_model.save_pretrained(tmp_path / "vae")
    loaded = load_vae(SMALL, tmp_path)  # a repo folder with vae/
    assert _same_decode(loaded, WanVAE(source_model, SMALL))


@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "config"])
def test_diffusers_folder_faults_name_the_key(tmp_path, source_model, fault):
    folder = tmp_path / "vae"
    source_model.save_pretrained(folder)
    weights = next(folder.glob("*.safetensors"))
    sd = load_file(str(weights))
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        key = "decoder.up_blocks.9.conv.weight"
        sd[key] = torch.zeros(1)
    elif fault == "shape":
        sd[key] = torch.zeros(2, 2, 1, 1, 1)
    else:
        conf = json.loads((folder / "config.json").read_text())
        conf["base_dim"] = 8
        (folder / "config.json").write_text(json.dumps(conf))
        key = "base_dim"
    save_file(sd, str(weights))
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_vae(SMALL, folder)


# -- fast CPU kernels ------------------------------------------------------------------
def test_fast_cpu_kernels_match_stock_diffusers_and_avoid_the_slow_paths():
    """The routed VAE (oneDNN convs, sum-of-squares RMS norm) computes what the stock
    diffusers module computes, forward and backward, and no longer runs the slow ops."""
    stock = AutoencoderKLWan(base_dim=SMALL.base_dim, z_dim=SMALL.z_dim, is_residual=False)
    routed = build_autoencoder(SMALL)  # routed on construction
    routed.load_state_dict(stock.state_dict())
    assert use_fast_cpu_kernels(routed) == 0  # idempotent
    stock_copy = copy.deepcopy(stock)
    hot = [
        m for m in stock_copy.modules() if type(m).__name__ in ("WanCausalConv3d", "WanRMS_norm")
    ]
    assert len(hot) > 20 and use_fast_cpu_kernels(stock_copy) == len(hot)
    # a copy of a routed module computes with its own parameters
    twin = copy.deepcopy(routed)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    probe = torch.zeros(1, 3, 1, H, W)
    assert (twin(probe).sample - routed(probe).sample).abs().max() > 1e-3
    x = torch.rand(1, 3, 5, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_stock = x.clone().requires_grad_(True)
    x_routed = x.clone().requires_grad_(True)
    y_stock = stock(x_stock).sample
    with torch.profiler.profile() as prof:
        y_routed = routed(x_routed).sample
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops
    assert not {"aten::slow_conv3d_forward", "aten::linalg_vector_norm"} & ops
    # float rounding only (a random-weight encoder + decoder amplifies it to ~3e-5)
    assert (y_routed - y_stock).abs().max().item() < 1e-4
    y_stock.square().mean().backward()
    y_routed.square().mean().backward()
    assert (x_routed.grad - x_stock.grad).abs().max() < 1e-3 * x_stock.grad.abs().max()
    for (name, a), b in zip(stock.named_parameters(), routed.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-3 * a.grad.abs().max() + 1e-12, name


def test_wan_vae_routes_its_model():
    vae = WanVAE.random(SMALL, seed=1)
    assert use_fast_cpu_kernels(vae.model) == 0  # already routed on construction
    assert all(type(m).__name__ != "WanRMS_norm" for m in vae.model.modules())


def test_a_lone_frame_convolves_with_the_kernels_last_time_slice_only():
    """A frame with nothing cached before it meets only the last time slice of a causal
    kernel (the slices before it see the zero padding): the routed conv computes with that
    slice alone, forward and backward, and says so in the weights it hands oneDNN."""
    stock = AutoencoderKLWan(base_dim=SMALL.base_dim, z_dim=SMALL.z_dim, is_residual=False)
    routed = build_autoencoder(SMALL)
    routed.load_state_dict(stock.state_dict())
    x = torch.rand(3, 3, 1, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = stock.encoder(x.clone(), feat_cache=[None] * 64, feat_idx=[0])
    with torch.profiler.profile(record_shapes=True) as prof:
        got = routed.encoder(x.clone(), feat_cache=[None] * 64, feat_idx=[0])
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
    kernels = [  # the 3-D convs' weights (the spatial downsamplers are 2-D convs)
        e.input_shapes[1]
        for e in prof.events()
        if e.name == "aten::mkldnn_convolution" and len(e.input_shapes[1]) == 5
    ]
    assert len(kernels) > 5 and all(k[2] == 1 for k in kernels)  # no 3-deep time kernel ran
    # with an earlier frame cached the whole kernel still runs (the streaming decode)
    conv = next(m for m in routed.encoder.modules() if getattr(m, "kernel_size", (1,))[0] == 3)
    frame = torch.rand(1, conv.in_channels, 1, 4, 6, generator=torch.Generator().manual_seed(2))
    cached = torch.rand(1, conv.in_channels, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    full = torch.nn.functional.conv3d(
        torch.nn.functional.pad(torch.cat([cached, frame], 2), (1, 1, 1, 1)), conv.weight, conv.bias
    )
    torch.testing.assert_close(conv(frame, cached), full, rtol=1e-5, atol=1e-6)
    alone = torch.nn.functional.conv3d(
        torch.nn.functional.pad(frame, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias
    )
    torch.testing.assert_close(conv(frame), alone, rtol=1e-5, atol=1e-6)
    # gradients reach the last slice and the input as the full kernel's would
    w = conv.weight.detach().clone().requires_grad_(True)
    f = frame.clone().requires_grad_(True)
    f2 = frame.clone().requires_grad_(True)
    ref = (
        torch.nn.functional.conv3d(torch.nn.functional.pad(f, (1, 1, 1, 1, 2, 0)), w, conv.bias)
        .square()
        .sum()
    )
    ref.backward()
    conv.weight.grad = None
    conv(f2).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f2.grad, f.grad, rtol=1e-4, atol=1e-6)
