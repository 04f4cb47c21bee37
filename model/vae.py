"""The Wan2.1 VAE on diffusers' `AutoencoderKLWan`, with latent normalisation and a
per-session streaming decoder (docs/design/vae-and-text.md §1–§7).

Layouts: the DiT and everything outside this file keep latents as `(B, F, C, h, w)`;
the VAE works in `(B, C, T, H, W)`. Pixels leave here as `(B, T, 3, H, W)` float32 in
[-1, 1]. Latents are always the normalised ones, z = (mu - mean) / std.

The module is shared by all sessions, so nothing here uses the module's own feature
caches (`_feat_map`, `_enc_feat_map`): encode and streaming decode call `vae.encoder` /
`vae.decoder` with caches that belong to the call or to the session's `DecoderState`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from cache.decoder import DecoderState
from model.config import ModelConfig, VAEConfig
from model.weights import WeightsError, check_state_dict, read_state_dict, safetensors_shapes

ORIGINAL_FILE = "Wan2.1_VAE.pth"  # the original Wan2.1 release
DIFFUSERS_SUBFOLDER = "vae"  # the Wan2.1-T2V-1.3B-Diffusers release


def _vae_cfg(cfg: VAEConfig | ModelConfig) -> VAEConfig:
    return cfg.vae if isinstance(cfg, ModelConfig) else cfg


def _model_kwargs(cfg: VAEConfig) -> dict:
    """AutoencoderKLWan constructor arguments for a VAEConfig (Wan2.1: no residual path)."""
    return dict(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=list(cfg.temperal_downsample),
        dropout=0.0,
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
        is_residual=False,
    )


class _OneDNNCausalConv3d(WanCausalConv3d):
    """A `WanCausalConv3d` whose float32 CPU convolution runs through oneDNN.

    PyTorch picks oneDNN for a 3-D convolution only past a size heuristic tuned for 2-D
    ones; below it (a VAE at small widths: every conv of the tiny and demo presets) it
    takes the unblocked `slow_conv3d` path, measured 3-9x slower here and 65 % of a CPU
    chunk. Same arithmetic up to float rounding (about 1e-6); gradients flow as well.

    A single frame with nothing cached before it (every frame of a per-frame encode, the
    first frame of a shot) is padded with k - 1 zero frames in front, so only the kernel's
    last time slice meets data: it convolves with that slice alone, k times less work for
    the same sums (training's data pipeline encodes some hundred frames a step)."""

    def forward(self, x, cache_x=None):
        k = self.kernel_size[0]
        if (
            cache_x is None
            and k > 1
            and x.shape[2] == 1
            and self.stride[0] == 1
            and self._padding[4] == k - 1
        ):
            weight = self.weight[:, :, k - 1 :].contiguous()
            pad_w, pad_h = self._padding[0], self._padding[2]
            return self._conv_forward(x, weight, self.bias, (0, pad_h, pad_w))
        return super().forward(x, cache_x)

    def _conv_forward(self, x, weight, bias, padding=None):
        padding = self.padding if padding is None else padding  # (time, height, width)
        if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return F.conv3d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        return torch.mkldnn_convolution(
            x.contiguous(), weight, bias, padding, self.stride, self.dilation, self.groups
        )


class _SumSquaresRMSNorm(WanRMS_norm):
    """A `WanRMS_norm` that normalises float32 CPU inputs without `F.normalize`.

    `F.normalize(x, dim=1)` reduces over the channel dim of a (B, C, T, H, W) tensor with a
    generic strided reduction that is 30-60x slower on CPU than summing the squares over
    the same dim (measured: 29 % of a CPU chunk after the oneDNN convs). Same formula,
    x / max(||x||, 1e-12), up to float rounding."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        dim = 1 if self.channel_first else -1
        normalized = x / x.square().sum(dim, keepdim=True).sqrt().clamp_min(1e-12)
        return normalized * self.scale * self.gamma + self.bias


def use_fast_cpu_kernels(model: torch.nn.Module) -> int:
    """Route float32 CPU work of the VAE's hot ops to fast kernels (other devices and dtypes
    take the stock path, decided per call): the causal Conv3d through oneDNN where this
    torch build has it, the RMS norms through a plain sum of squares. The modules change
    class in place (parameters, state-dict keys and copies unaffected); idempotent; returns
    how many modules changed. Gradients flow through both, so training uses it too."""
    onednn = torch.backends.mkldnn.is_available()
    n = 0
    for mod in model.modules():
        if type(mod) is WanRMS_norm:
            mod.__class__ = _SumSquaresRMSNorm
            n += 1
        elif type(mod) is WanCausalConv3d and onednn and mod.padding_mode == "zeros":
            mod.__class__ = _OneDNNCausalConv3d
            n += 1
    return n


def build_autoencoder(cfg: VAEConfig | ModelConfig, meta: bool = False) -> AutoencoderKLWan:
    """An AutoencoderKLWan sized by `cfg`, with random weights or on the meta device, its
    float32 CPU work on the fast kernels (`use_fast_cpu_kernels`)."""
    cfg = _vae_cfg(cfg)
    if meta:
        with torch.device("meta"):
            model = AutoencoderKLWan(**_model_kwargs(cfg))
    else:
        model = AutoencoderKLWan(**_model_kwargs(cfg))
    use_fast_cpu_kernels(model)
    return model


# -- key names of the original Wan2.1_VAE.pth -----------------------------------------
# diffusers' converter maps original -> diffusers key by key. We also need the inverse,
# to check a file strictly *in its own key names* (an error should name the key the user
# can find in the file). The inverse is checked against the converter on every load.
_RESNET_PARTS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def _resnet_part(parts: list[str]) -> str:
    return ".".join([_RESNET_PARTS.get(parts[0], parts[0]), *parts[1:]])


def original_vae_key(key: str, num_res_blocks: int) -> str:
    """Original Wan2.1_VAE.pth name of a diffusers AutoencoderKLWan state-dict key."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    side, *rest = key.split(".")
    if side in top:
        return ".".join([top[side], *rest])
    head, tail = rest[0], rest[1:]
    if head == "conv_in":
        return ".".join([side, "conv1", *tail])
    if head == "norm_out":
        return ".".join([side, "head.0", *tail])
    if head == "conv_out":
        return ".".join([side, "head.2", *tail])
    if head == "mid_block":
        kind, i, *leaf = tail
        if kind == "attentions":
            return ".".join([side, "middle.1", *leaf])
        return f"{side}.middle.{2 * int(i)}." + _resnet_part(leaf)
    if side == "encoder" and head == "down_blocks":
        i, *leaf = tail
        if leaf[0] in ("resample", "time_conv"):
            return ".".join([side, "downsamples", i, *leaf])
        return f"{side}.downsamples.{i}." + _resnet_part(leaf)
    if side == "decoder" and head == "up_blocks":
        # The original decoder is one flat list: each stage's resnets, then its upsampler.
        stride = num_res_blocks + 2
        b, kind, *leaf = tail
        if kind == "resnets":
            r, *leaf = leaf
            return f"decoder.upsamples.{stride * int(b) + int(r)}." + _resnet_part(leaf)
        if kind == "upsamplers":
            return f"decoder.upsamples.{stride * int(b) + stride - 1}." + ".".join(leaf[1:])
    raise WeightsError(f"no original VAE key name known for diffusers key {key!r}")


def original_vae_shapes(cfg: VAEConfig | ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of the original-layout state dict for `cfg`, checked against the
    installed diffusers converter (which hard-codes the block indices of the real VAE)."""
    cfg = _vae_cfg(cfg)
    ours = {k: v.shape for k, v in build_autoencoder(cfg, meta=True).state_dict().items()}
    names = {k: original_vae_key(k, cfg.num_res_blocks) for k in ours}
    back = convert_wan_vae_to_diffusers({o: None for o in names.values()})
    if set(back) != set(ours):
        bad = sorted(set(back) ^ set(ours))[:5]
        raise WeightsError(
            f"diffusers' Wan VAE converter does not map the original keys of this VAE config "
            f"(it assumes dim_mult=[1,2,4,4], num_res_blocks=2); e.g. {bad}"
        )
    return {names[k]: s for k, s in ours.items()}


class WanVAE:
    """The Wan2.1 VAE with normalised latents: encode frames/clips and decode, whole or streamed."""

    def __init__(self, model: AutoencoderKLWan, cfg: VAEConfig | ModelConfig) -> None:
        self.cfg = _vae_cfg(cfg)
        self.model = model.eval().requires_grad_(False)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Per-channel constants stay fp32 and are cast to the latent dtype at use (as the reference).
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        self._mean = torch.tensor(self.cfg.latents_mean, device=self.device).view(shape)
        self._std = torch.tensor(self.cfg.latents_std, device=self.device).view(shape)
        self.num_decoder_slots = sum(
            isinstance(m, WanCausalConv3d) for m in model.decoder.modules()
        )
        use_fast_cpu_kernels(model)

    # -- constructors -------------------------------------------------------------
    @classmethod
    def random(
        cls, cfg: VAEConfig | ModelConfig, seed: int = 0, device="cpu", dtype=torch.float32
    ) -> WanVAE:
        """Random weights (tests and demos), reproducible from `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_autoencoder(cfg)
        # nn.Module.to, not diffusers' override: that one warns about an empty list of
        # fp32-only modules on every dtype cast.
        return cls(torch.nn.Module.to(model, device=device, dtype=dtype), cfg)

    @classmethod
    def from_original_state(
        cls,
        cfg: VAEConfig | ModelConfig,
        sd: Mapping[str, torch.Tensor],
        device="cpu",
        dtype=torch.float32,
        what: str = "VAE",
    ) -> WanVAE:
        """Load a `Wan2.1_VAE.pth`-layout state dict strictly, through diffusers' converter."""
        check_state_dict(original_vae_shapes(cfg), sd, what)
        converted = convert_wan_vae_to_diffusers(dict(sd))
        model = build_autoencoder(cfg, meta=True)
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        return cls(model, cfg)

    @classmethod
    def from_original(
        cls, cfg: VAEConfig | ModelConfig, path: str | Path, device="cpu", dtype=torch.float32
    ) -> WanVAE:
        """Load the original `Wan2.1_VAE.pth` file (or a safetensors file with its keys)."""
        return cls.from_original_state(cfg, read_state_dict(path), device, dtype, what=str(path))

    @classmethod
    def from_diffusers(
        cls, cfg: VAEConfig | ModelConfig, folder: str | Path, device="cpu", dtype=torch.float32
    ) -> WanVAE:
        """Load a diffusers-layout folder (`config.json` + safetensors), strictly."""
        cfg = _vae_cfg(cfg)
        folder = Path(folder)
        if (folder / DIFFUSERS_SUBFOLDER / "config.json").is_file():
            folder = folder / DIFFUSERS_SUBFOLDER
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise WeightsError(f"{folder}: no config.json of a diffusers AutoencoderKLWan")
        _check_diffusers_config(cfg, json.loads(config_file.read_text()), str(config_file))
        # Check names and shapes from the file headers first, so every problem is named.
        expected = {k: v.shape for k, v in build_autoencoder(cfg, meta=True).state_dict().items()}
        got = {k: torch.empty(s, device="meta") for k, s in safetensors_shapes(folder).items()}
        check_state_dict(expected, got, str(folder))
        try:
            model, info = AutoencoderKLWan.from_pretrained(
                str(folder), dtype=dtype, output_loading_info=True, low_cpu_mem_usage=False
            )
        except (OSError, RuntimeError, ValueError) as exc:
            # diffusers raises on shape mismatches (naming the key) and on unreadable files
            raise WeightsError(f"{folder}: {exc}") from exc
        problems = []
        for label in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if info.get(label):
                problems.append(f"{label.replace('_', ' ')}: {', '.join(map(str, info[label]))}")
        if problems:
            raise WeightsError(f"{folder}: " + "; ".join(problems))
        return cls(model.to(device=device), cfg)

    # -- latent normalisation (docs/design/vae-and-text.md §3) ---------------------------
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Posterior mean (B, C, T, h, w) -> normalised latent z."""
        return (mu - self._mean.to(mu.dtype)) / self._std.to(mu.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent z (B, C, T, h, w) -> the decoder's latent space."""
        return z * self._std.to(z.dtype) + self._mean.to(z.dtype)

    # -- encode (docs/design/vae-and-text.md §4) -----------------------------------------
    def _check_pixels(self, h: int, w: int) -> None:
        s = self.cfg.spatial_stride
        if h % s or w % s:
            raise ValueError(f"frame {h}x{w} is not a multiple of the VAE stride {s}")

    def _encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> posterior mean (B, C, F, h, w), with a cache local to the call."""
        enc = self.model.encoder
        cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in enc.modules())
        step = self.cfg.temporal_stride
        # the encoder eats 1, then `step`, `step`, ... frames: one latent frame per piece
        pieces = [x[:, :, :1]] + (list(x[:, :, 1:].split(step, dim=2)) if x.shape[2] > 1 else [])
        out = [enc(p, feat_cache=cache, feat_idx=[0]) for p in pieces]
        moments = self.model.quant_conv(torch.cat(out, dim=2))
        return moments[:, : self.cfg.z_dim]  # the mean; the log-variance is unused

    @torch.inference_mode()
    def encode_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1], T = 1 + 4k -> latents (B, 1 + k, C, h, w)."""
        b, c, t, h, w = pixels.shape
        self._check_pixels(h, w)
        if (t - 1) % self.cfg.temporal_stride:
            # the encoder would silently drop the tail; make the caller trim on purpose
            raise ValueError(f"clip of {t} frames: need 1 + {self.cfg.temporal_stride}k")
        mu = self._encode_mean(pixels.to(device=self.device, dtype=self.dtype))
        return self.normalize(mu).permute(0, 2, 1, 3, 4)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1], each its own 1-frame clip -> latents (N, C, h, w)."""
        return self.encode_clip(pixels[:, :, None])[:, 0]

    # -- decode (docs/design/vae-and-text.md §5) -----------------------------------------
    def new_decoder_state(self, batch: int = 1) -> DecoderState:
        """Empty streaming state for one session (`batch` rows decoded together)."""
        return DecoderState(self.num_decoder_slots, batch)

    @torch.inference_mode()
    def decode_chunk(self, state: DecoderState, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, n, C, h, w) -> pixels (B, T, 3, H, W) float32 in [-1, 1].

        Continues the shot held in `state`: a shot's first chunk of n latents gives
        1 + 4(n-1) frames, later chunks 4n. The state is updated only if the whole chunk
        decoded; on an exception it is left as it was.
        """
        if z.ndim != 5 or z.shape[0] != state.batch or z.shape[2] != self.cfg.z_dim:
            raise ValueError(
                f"latents {tuple(z.shape)}: expected (batch={state.batch}, n, {self.cfg.z_dim}, h, w)"
            )
        if state.num_slots != self.num_decoder_slots:
            raise ValueError("decoder state was made for another VAE")
        x = z.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)
        x = self.model.post_quant_conv(self.denormalize(x))  # 1x1x1: stateless, whole chunk
        slots = state.working_copy()
        first = state.first
        frames = []
        for t in range(x.shape[2]):
            idx = [0]  # a fresh slot counter per latent frame
            frames.append(
                self.model.decoder(
                    x[:, :, t : t + 1], feat_cache=slots, feat_idx=idx, first_chunk=first
                )
            )
            first = False
        out = torch.cat(frames, dim=2).float().clamp_(-1.0, 1.0)
        state.commit(slots, x.shape[2])
        return out.permute(0, 2, 1, 3, 4)

    @torch.inference_mode()
    def decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        """Whole-clip decode through diffusers' own path (tests, offline use; not thread-safe):
        normalised latents (B, F, C, h, w) -> pixels (B, 1 + 4(F-1), 3, H, W) float32."""
        x = self.denormalize(z.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4))
        out = self.model.decode(x).sample
        return out.float().clamp(-1.0, 1.0).permute(0, 2, 1, 3, 4)


def _check_diffusers_config(cfg: VAEConfig, conf: dict, where: str) -> None:
    """Refuse a diffusers config whose sizes differ from the preset we were asked for."""
    want = _model_kwargs(cfg)
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        if key in conf and conf[key] != want[key]:
            raise WeightsError(f"{where}: {key}={conf[key]} but the preset has {want[key]}")
    if conf.get("is_residual"):
        raise WeightsError(f"{where}: a residual (Wan2.2) VAE, not the Wan2.1 one")
    for key in ("latents_mean", "latents_std"):
        if key in conf and [round(v, 6) for v in conf[key]] != [round(v, 6) for v in want[key]]:
            raise WeightsError(f"{where}: {key} differs from the preset's latent statistics")


def load_vae(
    cfg: VAEConfig | ModelConfig, path: str | Path, device="cpu", dtype=torch.float32
) -> WanVAE:
    """Load the VAE from either layout, detected from the files present.

    `path` may be the original `Wan2.1_VAE.pth` (or a folder holding it), a diffusers
    `vae/` folder, or a diffusers repo folder that has one.
    """
    path = Path(path)
    if path.is_file():
        return WanVAE.from_original(cfg, path, device, dtype)
    if (path / ORIGINAL_FILE).is_file():
        return WanVAE.from_original(cfg, path / ORIGINAL_FILE, device, dtype)
    if (path / "config.json").is_file() or (path / DIFFUSERS_SUBFOLDER / "config.json").is_file():
        return WanVAE.from_diffusers(cfg, path, device, dtype)
    raise WeightsError(
        f"no VAE weights in {path}: expected {ORIGINAL_FILE} or a diffusers {DIFFUSERS_SUBFOLDER}/ folder"
    )


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (..., 3, H, W) in [-1, 1], e.g. (T, 3, H, W) -> (..., H, W, 3) uint8, rounded
    to nearest. The reference truncates instead, so frames differ from it by at most 1."""
    x = pixels.float().clamp(-1.0, 1.0)
    u8 = torch.floor(127.5 * (x + 1.0) + 0.5).to(torch.uint8)
    return u8.movedim(-3, -1).contiguous()
