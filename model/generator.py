"""The multi-shot generator: shared networks (`LoadedModel`) and one session's stream
(`ShotStreamGenerator`), chunk by chunk, with the verbs of docs/design/generator.md §9:

    start_shot:  select_context -> encode context frames -> encode_prompts -> prefill_context
    next_chunk:  denoise_chunk -> decode_chunk -> refresh_cache  (committed only if all succeed)

A session's device state (KV cache, decoder state, kept frames) is a pool `Lease` passed
in, so it is created, owned and freed in one place. Noise comes from a seeded source keyed
by (shot, chunk, draw), so a session is reproducible whatever the timing of its prompts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache.pool import Lease
from model.attention import resolve_backend
from model.config import ModelConfig
from model.context import candidate_offsets, caption_rows, context_counts, select_context
from model.dit import CausalDiT, build_dit
from model.graphs import ChunkGraphs
from model.sampler import FlowSchedule
from model.steps import ChunkRow, batched_chunk_pass, denoise_chunk, prefill_context, refresh_cache
from model.text import CaptionSpec, TextEncoder, TextEncoding, load_tokenizer
from model.vae import WanVAE, to_uint8
from model.weights import WeightsError


# -- device and precision policy --------------------------------------------------------
def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec} requested but CUDA is not available")
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The one precision policy: bf16 weights and activations on GPU, float32 on CPU."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec]


# -- shared networks ----------------------------------------------------------------------
@dataclass
class LoadedModel:
    """The networks of one preset, shared by every session (weights are read-only)."""

    cfg: ModelConfig
    dit: CausalDiT
    vae: WanVAE
    text: TextEncoder
    device: torch.device
    dtype: torch.dtype
    weights: str  # where the weights came from, or "random (seed N)"
    real_weights: bool
    vocabulary: dict | None = None  # trained demo models: the prompt vocabulary they learned
    schedule: FlowSchedule = field(init=False)
    # Option: chunks run as captured CUDA graphs (model/graphs.py); None = plain passes.
    chunk_graphs: ChunkGraphs | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.schedule = FlowSchedule(self.cfg.sampler)

    @property
    def attention_backend(self) -> str:
        return self.dit.attn_backend

    def use_chunk_graphs(self, enabled: bool = True, max_graphs: int = 64) -> None:
        """Run every chunk's denoise and refresh passes as one replayed graph (or not)."""
        self.chunk_graphs = (
            ChunkGraphs(self.dit, self.schedule, self.device, max_graphs) if enabled else None
        )


def load_model(
    cfg: ModelConfig,
    weights: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    seed: int = 0,
    prompt_overflow: str = "truncate",
) -> LoadedModel:
    """Load real weights from a folder (see model.layout); without one, the preset's bundled
    weights (`demo`), else random ones for presets that allow them (tests, CPU demos)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if weights is None and cfg.bundled_weights_dir is not None:
        weights = cfg.bundled_weights_dir
        if not weights.is_dir():
            raise WeightsError(
                f"preset {cfg.name}: its bundled weights are missing ({weights}); "
                "train them with `shotstream train-demo` or pass --weights DIR"
            )
    vocabulary = None
    if weights is None:
        if not cfg.random_weights_ok:
            raise WeightsError(
                f"preset {cfg.name} needs real weights: pass --weights DIR (fetch them with `shotstream download`)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dit = build_dit(cfg).to(device=dev, dtype=dt).eval().requires_grad_(False)
        vae = WanVAE.random(cfg, seed=seed + 1, device=dev, dtype=dt)
        text = TextEncoder.random(
            cfg,
            seed=seed + 2,
            device=dev,
            dtype=dt,
            tokenizer=load_tokenizer(cfg.text),
            policy=prompt_overflow,
        )
        source, real = f"random (seed {seed})", False
    else:
        from model.layout import load_weights, read_vocabulary

        dit, vae, text = load_weights(cfg, weights, dev, dt, prompt_overflow=prompt_overflow)
        source, real = str(weights), True
        vocabulary = read_vocabulary(weights)
    dit.attn_backend = resolve_backend(attention, dev)
    return LoadedModel(cfg, dit, vae, text, dev, dt, source, real, vocabulary)


# -- noise ------------------------------------------------------------------------------
class NoiseSource:
    """Gaussian draws keyed by (shot, chunk, draw): draw 0 is a chunk's initial noise,
    draws 1.. its re-noises. Independent of generation timing, so reproducible."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype):
        self.seed, self.device, self.dtype = seed, device, dtype

    def _key(self, shot: int, chunk: int, draw: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{shot}:{chunk}:{draw}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)

    def draw(self, shot: int, chunk: int, draw: int, shape: Sequence[int]) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self._key(shot, chunk, draw))
        noise = torch.randn(tuple(shape), generator=gen, device=self.device, dtype=torch.float32)
        return noise.to(self.dtype)


# -- timing -------------------------------------------------------------------------------
class VerbClock:
    """Per-verb wall time; on CUDA, events read once the chunk's result is on the host."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def measure(self, name: str, fn: Callable, *args, **kwargs):
        start = self._now()
        out = fn(*args, **kwargs)
        self._marks.append((name, start, self._now()))
        return out

    def read(self) -> dict[str, float]:
        """ms per verb (call after the results were synchronised to the host)."""
        out: dict[str, float] = {}
        for name, a, b in self._marks:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3  # type: ignore[union-attr,operator]
            out[f"{name}_ms"] = out.get(f"{name}_ms", 0.0) + ms
        self._marks.clear()
        return out


# -- one session ----------------------------------------------------------------------------
@dataclass
class ShotStart:
    """What beginning a shot did: its index, caption truncation and timings."""

    shot: int
    truncated_tokens: int
    shot_text_cut: bool
    context_indices: list[int]
    timings: dict[str, float]


@dataclass
class ChunkOutput:
    """One chunk's pixels (uint8 HWC on the host) and where it sits in the stream."""

    frames: torch.Tensor  # (n, H, W, 3) uint8, CPU
    shot: int
    chunk: int  # index within the shot
    last_in_shot: bool  # the shot reached its full length
    timings: dict[str, float]


CaptionEncoder = Callable[[list[CaptionSpec]], TextEncoding]


class ShotStreamGenerator:
    """One session's generation state: its shots so far, its caches (from a lease) and noise.

    Not thread-safe: one engine worker drives it. `trace`, when a dict, records the
    intermediate tensors of each shot start (for the golden replay).
    """

    def __init__(
        self,
        model: LoadedModel,
        lease: Lease,
        global_caption: str,
        seed: int = 0,
        noise: NoiseSource | None = None,
        encode_captions: CaptionEncoder | None = None,
        trace: dict | None = None,
    ):
        self.model, self.cfg = model, model.cfg
        self.lease = lease
        self.global_caption = global_caption
        self.noise = noise or NoiseSource(seed, model.device, model.dtype)
        self.encode_captions = encode_captions or model.text.encode
        self.trace = trace
        self.shot_texts: list[str] = []  # per shot started (index = shot)
        self.shot_lengths: list[int] = []  # pixel frames of each finished shot
        self.shot = -1  # current shot, -1 before the first
        self.chunk = 0  # next chunk index within the current shot
        self._frames_in_shot = 0
        self._gen_flag = torch.zeros(1, dtype=torch.long, device=model.device)
        self._caption_row = torch.zeros(1, dtype=torch.long, device=model.device)

    # -- properties ---------------------------------------------------------------
    @property
    def shot_complete(self) -> bool:
        return self.shot >= 0 and self.chunk >= self.cfg.chunks_per_shot

    @property
    def in_shot(self) -> bool:
        return self.shot >= 0 and not self.shot_complete

    # -- shot boundary --------------------------------------------------------------
    def start_shot(self, shot_text: str) -> ShotStart:
        """End the current shot (if any) and begin a new one with `shot_text`."""
        m, cfg = self.model, self.cfg
        clock = VerbClock(m.device)
        if self.shot >= 0 and self._frames_in_shot == 0:
            self.shot_texts.pop()  # the current shot never produced a frame: replace it
        elif self.shot >= 0:
            self._finish_shot()
        s = len(self.shot_lengths)

        picks = select_context(self.shot_lengths, cfg.context_frames)
        rows, ctx_rows = caption_rows(picks, s)
        texts = [*self.shot_texts, shot_text]
        specs = [CaptionSpec(self.global_caption, i, texts[i]) for i in rows]
        enc = clock.measure("text", self.encode_captions, specs)
        prompt = enc.embeds.to(device=m.device, dtype=m.dtype)[None]

        if picks:
            latents = clock.measure("context", self._context_latents, picks)[None]
            flags = torch.tensor([[p.shot for p in picks]], device=m.device)
            captions = torch.tensor([ctx_rows], device=m.device)
        else:  # first shot: six exact-zero latents, flag 0, caption 0 (docs/design/generator.md §8)
            latents = torch.zeros(
                1, cfg.context_frames, *cfg.latent_shape, device=m.device, dtype=m.dtype
            )
            flags = torch.zeros(1, cfg.context_frames, dtype=torch.long, device=m.device)
            captions = torch.zeros_like(flags)
        clock.measure(
            "prefill", prefill_context, m.dit, self.lease.kv, latents, flags, captions, prompt
        )

        self.lease.decoder.reset()  # every shot decodes from a cleared causal cache
        self._gen_flag = flags[:, -1] + 1
        self._caption_row = torch.full((1,), len(rows) - 1, dtype=torch.long, device=m.device)
        self.shot_texts.append(shot_text)
        self.shot, self.chunk, self._frames_in_shot = s, 0, 0
        if self.trace is not None:
            self.trace[s] = {
                "context_indices": [p.index for p in picks],
                "context_latents": latents,
                "flags": flags,
                "prompt_embeds": prompt,
            }
        if m.device.type == "cuda":
            torch.cuda.current_stream(m.device).synchronize()
        return ShotStart(
            shot=s,
            truncated_tokens=enc.truncated_tokens[-1],
            shot_text_cut=enc.shot_text_cut[-1],
            context_indices=[p.index for p in picks],
            timings=clock.read(),
        )

    def truncate_shot(self, keep_frames: int) -> None:
        """Roll the current shot back to its first `keep_frames` frames, as if the rest was
        never generated (a cut that withdrew them before they were played). The cut may
        fall inside a chunk: that chunk keeps its first frames.

        What generated frames leave behind is the decoded frames themselves (kept until the
        shot ends, for context selection) and the shot's counts: those go. A chunk's K/V
        slot in the local cache is rewritten before anything reads it (a chunk writes its
        slot before attending, and the next shot's prefill starts the local cache afresh),
        its noise is keyed by (shot, chunk, draw), and the decoder state restarts with every
        shot, so the next `start_shot` sees exactly what it would have seen had the shot
        stopped there. With `keep_frames` 0 the shot is replaced by the next one, as one
        that never produced a frame is.
        """
        if self.shot < 0 or not 0 <= keep_frames <= self._frames_in_shot:
            raise ValueError(
                f"cannot keep {keep_frames} of {self._frames_in_shot} frames of shot {self.shot}"
            )
        store, kept, chunks = self.lease.frames, 0, 0
        for c in range(self.chunk):
            frames = store.pop(("cur", c))
            take = min(frames.shape[0], keep_frames - kept)
            if take > 0:
                store.put(("cur", c), frames[:take])
                kept, chunks = kept + take, c + 1
        self.chunk, self._frames_in_shot = chunks, keep_frames

    def _finish_shot(self) -> None:
        """Record the shot's length and keep only frames a later boundary may select."""
        s, store = self.shot, self.lease.frames
        frames = torch.cat([store.pop(("cur", c)) for c in range(self.chunk)], dim=0)
        self.shot_lengths.append(self._frames_in_shot)
        # A shot's count at the next boundary is the most it will ever get (counts only
        # shrink), so candidates for that count cover every later selection.
        counts = context_counts(len(self.shot_lengths), self.cfg.context_frames)
        starts = [sum(self.shot_lengths[:i]) for i in range(len(self.shot_lengths))]
        for offset in candidate_offsets(self._frames_in_shot, counts[s], starts[s]):
            store.put(("px", s, offset), frames[offset].clone())
        for key in store.names():
            if key[0] in ("px", "lat"):
                _, shot, offset = key
                if offset not in candidate_offsets(
                    self.shot_lengths[shot], counts[shot], starts[shot]
                ):
                    store.pop(key)

    def _context_latents(self, picks) -> torch.Tensor:
        """Latents of the picked frames, encoding (as 1-frame clips) those not memoised."""
        store = self.lease.frames
        missing = [p for p in picks if store.get(("lat", p.shot, p.offset)) is None]
        if missing:
            pixels = torch.stack([store.get(("px", p.shot, p.offset)) for p in missing])
            if self.trace is not None:
                self.trace.setdefault("context_pixels", []).append(pixels)
            latents = self.model.vae.encode_frames(pixels)
            for p, lat in zip(missing, latents, strict=True):
                store.put(("lat", p.shot, p.offset), lat)
                store.pop(("px", p.shot, p.offset))  # the latent is all a later pick needs
        return torch.stack([store.get(("lat", p.shot, p.offset)) for p in picks]).to(
            self.model.dtype
        )

    # -- one chunk ----------------------------------------------------------------------
    def next_chunk(self) -> ChunkOutput:
        """Generate, decode and cache one chunk of the current shot (see `next_chunks`)."""
        return next_chunks([self])[0]


def next_chunks(gens: Sequence[ShotStreamGenerator]) -> list[ChunkOutput]:
    """One chunk for each of several sessions: their DiT passes run as one batch (each row
    attends over its own cache), then each decodes with its own decoder state.

    Commit on success: if any verb raises, every session's decoder state, kept frames and
    chunk counter are as before (each chunk's local cache slot is rewritten by a retry
    before anything reads it), so a failed batch can be retried one session at a time.
    """
    for g in gens:
        if not g.in_shot:
            raise RuntimeError("no shot in progress: call start_shot first")
    m, cfg = gens[0].model, gens[0].cfg
    clock = VerbClock(m.device)
    shape = (1, cfg.chunk_frames, *cfg.latent_shape)
    noise = torch.cat([g.noise.draw(g.shot, g.chunk, 0, shape) for g in gens])
    renoise = [
        torch.cat([g.noise.draw(g.shot, g.chunk, k, shape) for g in gens])
        for k in range(1, m.schedule.num_steps)
    ]
    rows = [ChunkRow(g.lease.kv, g.chunk, g._gen_flag, g._caption_row) for g in gens]
    graphs = m.chunk_graphs
    if graphs is None:
        pass_ = batched_chunk_pass(m.dit, rows)
        x0 = clock.measure("denoise", denoise_chunk, m.dit, m.schedule, pass_, noise, renoise)
    else:  # denoise and refresh in one replay, timed as "denoise"
        x0 = clock.measure("denoise", graphs.run, rows, noise, renoise)
    decoders = [g.lease.decoder for g in gens]
    saved = [(d.slots, d.first, d.latent_frames) for d in decoders]
    try:
        pixels = clock.measure(
            "decode",
            lambda: [m.vae.decode_chunk(d, x0[i : i + 1])[0] for i, d in enumerate(decoders)],
        )
        if graphs is None:
            clock.measure("refresh", refresh_cache, m.dit, pass_, x0)
        frames = [to_uint8(p).cpu() for p in pixels]  # the step's one host sync
    except BaseException:
        for d, (slots, first, latent_frames) in zip(decoders, saved, strict=True):
            d.slots, d.first, d.latent_frames = slots, first, latent_frames
        raise
    timings = clock.read()
    outs = []
    for i, g in enumerate(gens):
        s, b = g.shot, g.chunk
        g.lease.frames.put(("cur", b), pixels[i].to(m.vae.dtype))
        if g.trace is not None:
            g.trace[("chunk", s, b)] = {"x0": x0[i : i + 1], "pixels": pixels[i]}
        g.chunk += 1
        g._frames_in_shot += pixels[i].shape[0]
        outs.append(ChunkOutput(frames[i], s, b, g.shot_complete, dict(timings)))
    return outs
