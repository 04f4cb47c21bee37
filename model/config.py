"""Model configuration: frozen dataclasses for every size, and the named presets.

Nothing downstream hard-codes a size: tokens per frame, frames per chunk, context
frames, text length, shot length and fps all come from a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cache.kv import KVLayout

# Per-channel latent statistics of the Wan2.1 VAE (docs/design/vae-and-text.md §3).
WAN_LATENT_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN_LATENT_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of the causal Wan DiT (docs/design/generator.md §1, §3)."""

    num_layers: int
    dim: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    freq_dim: int
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    """Sizes of the umT5 encoder and its tokenizer (docs/design/vae-and-text.md §8–§9)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    text_len: int
    num_buckets: int = 32
    max_distance: int = 128
    # "umt5": the google/umt5-xxl SentencePiece tokenizer from the weights folder;
    # "byt5": transformers' ByT5Tokenizer, which needs no files (same special ids).
    tokenizer: str = "umt5"


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of the Wan2.1 causal VAE (diffusers `AutoencoderKLWan`)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN_LATENT_STD
    spatial_stride: int = 8
    temporal_stride: int = 4


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow-matching schedule (docs/design/generator.md §7)."""

    num_train_timesteps: int = 1000
    shift: float = 8.0
    denoising_step_list: tuple[float, ...] = (1000, 740, 500, 260)
    warp_denoising_step: bool = True

    @property
    def num_steps(self) -> int:
        return len(self.denoising_step_list)


@dataclass(frozen=True)
class ModelConfig:
    """Everything sized for one preset: networks, frame geometry, chunking and fps."""

    name: str
    dit: DiTConfig
    text: TextConfig
    vae: VAEConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    height: int = 480
    width: int = 832
    fps: int = 16
    chunk_frames: int = 3  # latent frames per chunk (num_frame_per_block)
    chunks_per_shot: int = 7  # a full shot: 21 latent frames = 81 pixel frames
    context_frames: int = 6  # max_context_frames
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    rope_shot_phase: float = 1.0 / 6.0  # radians per shot flag, a constant of the model
    description: str = ""
    random_weights_ok: bool = False  # may run without weights (tests, demos)
    # Trained weights shipped inside the package (a folder under model/), loaded when no
    # weights folder is given; "" for none.
    bundled_weights: str = ""

    def __post_init__(self) -> None:
        s, p = self.vae.spatial_stride, self.dit.patch_size
        if self.height % (s * p[1]) or self.width % (s * p[2]):
            raise ValueError(
                f"{self.name}: frame {self.height}x{self.width} must be a multiple of "
                f"{s * p[1]}x{s * p[2]} (VAE stride x patch size)"
            )
        if self.dit.dim % self.dit.num_heads:
            raise ValueError(f"{self.name}: dim {self.dit.dim} not divisible by heads")
        if self.dit.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even for RoPE")

    @property
    def bundled_weights_dir(self) -> Path | None:
        """Absolute path of the bundled weights folder, or None."""
        return (
            Path(__file__).resolve().parent / self.bundled_weights if self.bundled_weights else None
        )

    # -- derived geometry -------------------------------------------------------
    @property
    def latent_h(self) -> int:
        return self.height // self.vae.spatial_stride

    @property
    def latent_w(self) -> int:
        return self.width // self.vae.spatial_stride

    @property
    def grid_h(self) -> int:
        return self.latent_h // self.dit.patch_size[1]

    @property
    def grid_w(self) -> int:
        return self.latent_w // self.dit.patch_size[2]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame

    @property
    def context_tokens(self) -> int:
        return self.context_frames * self.tokens_per_frame

    @property
    def latent_frames_per_shot(self) -> int:
        return self.chunks_per_shot * self.chunk_frames

    @property
    def shot_tokens(self) -> int:
        return self.latent_frames_per_shot * self.tokens_per_frame

    @property
    def pixel_frames_per_shot(self) -> int:
        return 1 + self.vae.temporal_stride * (self.latent_frames_per_shot - 1)

    def chunk_pixel_frames(self, chunk_index: int) -> int:
        """Pixel frames a chunk decodes to: the first latent frame of a shot gives one."""
        n = self.chunk_frames * self.vae.temporal_stride
        return n - (self.vae.temporal_stride - 1) if chunk_index == 0 else n

    @property
    def chunk_seconds(self) -> float:
        """Playout time of a steady chunk (a shot's first is shorter by 3 frames)."""
        return self.chunk_pixel_frames(1) / self.fps

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.dit.in_dim, self.latent_h, self.latent_w)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # -- cost model (docs/design/generator.md §11), used by benchmarks and admission --
    def dit_flops(self, queries: int, keys: int) -> float:
        """FLOPs (2 x MACs) of one DiT forward with `queries` tokens over `keys` self-attn keys."""
        d, f, n_layers = self.dit.dim, self.dit.ffn_dim, self.dit.num_layers
        linear = (8 * d * d + 4 * d * d + 4 * d * f) * queries
        self_attn = 4 * keys * d * queries
        cross = 4 * self.text.text_len * d * queries
        return float(n_layers * (linear + self_attn + cross))

    def chunk_flops(self, chunk_index: int) -> float:
        """DiT FLOPs of one chunk: `num_steps` denoise passes plus one refresh pass."""
        keys = self.context_tokens + self.chunk_tokens * (chunk_index + 1)
        return (self.sampler.num_steps + 1) * self.dit_flops(self.chunk_tokens, keys)

    def kv_bytes_per_session(self, dtype: torch.dtype) -> int:
        """Bytes of the dual cache and text K/V slots of one session (the cache's layout)."""
        return KVLayout.for_config(self).nbytes(1, dtype)

    @property
    def max_captions(self) -> int:
        """Caption rows a shot can use: one per context source shot plus the current one."""
        return self.context_frames + 1


def _wan_1_3b() -> ModelConfig:
    return ModelConfig(
        name="wan2.1-1.3b",
        dit=DiTConfig(
            num_layers=30, dim=1536, num_heads=12, ffn_dim=8960, text_dim=4096, freq_dim=256
        ),
        text=TextConfig(
            vocab_size=256384,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            text_len=512,
            tokenizer="umt5",
        ),
        vae=VAEConfig(base_dim=96),
        height=480,
        width=832,
        description="ShotStream causal student on Wan2.1-T2V-1.3B (needs the real weights)",
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        dit=DiTConfig(num_layers=2, dim=64, num_heads=2, ffn_dim=128, text_dim=32, freq_dim=32),
        text=TextConfig(
            vocab_size=384,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            text_len=128,
            tokenizer="byt5",
        ),
        vae=VAEConfig(base_dim=8),
        height=64,
        width=96,
        description="tiny test model: same code paths, small sizes, random weights",
        random_weights_ok=True,
    )


def _demo() -> ModelConfig:
    # Trained on procedural shapes (training/, model card in model/demo_weights/). Sizes
    # keep a chunk (4 denoise + refresh + decode) at >= 2x real time on one CPU core; the
    # VAE decoder dominates, so 64x96 frames and base_dim 8 (base 4 decodes ~1.6x faster
    # but learns colours far slower: its 4-channel full-resolution stage is a bottleneck).
    # No distillation, so the four steps reach low noise (shift 1, sigma 1, 0.5, 0.25, 0.1)
    # instead of the released sigma >= 0.74. The first step commits to a layout (see
    # training/start_train.py); a large second drop keeps its object visible to the next
    # step (measured on the same weights, eval-demo object colour: 0.23 with 1/.75/.5/.25,
    # 0.47 with these).
    return ModelConfig(
        name="demo",
        dit=DiTConfig(num_layers=4, dim=128, num_heads=4, ffn_dim=512, text_dim=64, freq_dim=64),
        text=TextConfig(
            vocab_size=96,
            d_model=64,
            d_kv=16,
            d_ff=256,
            num_layers=2,
            num_heads=4,
            text_len=32,
            tokenizer="umt5",  # a word-level tokenizer shipped in the weights' tokenizer/ folder
        ),
        # latent statistics are folded into the VAE's quant convs: unit-scale by construction
        vae=VAEConfig(base_dim=8, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
        sampler=SamplerConfig(
            shift=1.0, denoising_step_list=(1000, 500, 250, 100), warp_denoising_step=False
        ),
        height=64,
        width=96,
        chunks_per_shot=4,  # 45-frame shots: a moving close-up stays in frame
        description="demo model trained on procedural shapes: bundled weights, real time on a CPU",
        bundled_weights="demo_weights",
    )


PRESETS: dict[str, ModelConfig] = {c.name: c for c in (_wan_1_3b(), _tiny(), _demo())}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def default_preset(weights: str | None) -> str:
    """The preset when none is named: a weights folder is the real model's (loading it under
    another preset could only fail the strict key check); without one, `demo`, the small
    model trained on procedural shapes whose weights ship in the package."""
    return "wan2.1-1.3b" if weights else "demo"


def config_from_golden(meta: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a golden JSON sidecar (its `config` and `scheduler` blocks)."""
    c, sch = meta["config"], meta["scheduler"]
    dit, t5, vae, der = c["dit"], c["t5"], c["vae"], c["derived"]
    pipe = c["pipeline"]
    if dit["patch_size"][0] != 1:
        raise ValueError("only temporal patch size 1 is supported")
    d_kv = t5["dim_attn"] // t5["num_heads"]
    cfg = ModelConfig(
        name=meta.get("config_name", "golden"),
        dit=DiTConfig(
            num_layers=dit["num_layers"],
            dim=dit["dim"],
            num_heads=dit["num_heads"],
            ffn_dim=dit["ffn_dim"],
            text_dim=dit["text_dim"],
            freq_dim=dit["freq_dim"],
            in_dim=dit["in_dim"],
            out_dim=dit["out_dim"],
            patch_size=tuple(dit["patch_size"]),
            eps=dit["eps"],
        ),
        text=TextConfig(
            vocab_size=t5["vocab"],
            d_model=t5["dim"],
            d_kv=d_kv,
            d_ff=t5["dim_ffn"],
            num_layers=t5["num_layers"],
            num_heads=t5["num_heads"],
            text_len=dit["text_len"],
            num_buckets=t5["num_buckets"],
            tokenizer="recorded",
        ),
        vae=VAEConfig(
            base_dim=vae["base_dim"],
            z_dim=vae["z_dim"],
            dim_mult=tuple(vae["dim_mult"]),
            num_res_blocks=vae["num_res_blocks"],
            temperal_downsample=tuple(vae["temperal_downsample"]),
            latents_mean=tuple(c["vae_latent_mean"]),
            latents_std=tuple(c["vae_latent_std"]),
        ),
        sampler=SamplerConfig(
            num_train_timesteps=sch["num_train_timesteps"],
            shift=sch["shift"],
            denoising_step_list=tuple(sch["denoising_step_list_config"]),
            warp_denoising_step=sch["warp_denoising_step"],
        ),
        height=der["pixel_h"],
        width=der["pixel_w"],
        chunk_frames=pipe["num_frame_per_block"],
        chunks_per_shot=c["shots"]["chunks_per_shot"],
        context_frames=pipe["max_context_frames"],
        description="sized from a golden file",
        random_weights_ok=True,
    )
    # The JSON states derived sizes too: refuse a file whose sizes we would read differently.
    checks = {
        "tokens_per_frame": cfg.tokens_per_frame,
        "latent_frames_per_shot": cfg.latent_frames_per_shot,
        "pixel_frames_per_shot": cfg.pixel_frames_per_shot,
        "head_dim": cfg.dit.head_dim,
    }
    for key, ours in checks.items():
        if key in der and der[key] != ours:
            raise ValueError(f"golden config {key}={der[key]} but derived {ours}")
    if not math.isclose(cfg.rope_shot_phase, 1 / 6):
        raise ValueError("unexpected RoPE shot phase")
    return cfg
