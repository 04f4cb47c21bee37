"""Replay of golden vectors recorded from the original implementation (../shared/golden).

A golden file is a safetensors file of every tensor that crossed a call boundary, with a
JSON sidecar of the same stem giving the sizes, the ordered calls and the tolerances.
Nothing here assumes the sizes of a particular file: they come from the sidecar.

Two replays, as the golden README describes:
- per call (teacher-forced): each generator call gets its recorded inputs; its outputs,
  caches and activations are compared (tolerance `per_call_abs`);
- chained (free-running): only noises (and, for the whole loop, token ids) are injected,
  everything else comes from our own outputs (tolerance `chain_abs`).

Results are `Check` rows grouped like the file's own `tolerances.observed` groups.

Tolerances. The sidecar states two: `per_call_abs` (1e-5) and `chain_abs` (1e-4). It also
records how far the reference moves from *itself* when only the order of its float32 sums
changes (`tolerances.observed`: the same code re-run on another thread count), per group.
A group's tolerance here is the stated one, or `NOISE_MULTIPLE` times that measured
spread when that is larger (`Golden.tolerance`); exact checks (tolerance 0) stay exact.

Why a multiple of the spread: two float32 programs that order their sums differently
each sit some distance from exact arithmetic, and their difference is the sum of both.
Measured on golden_shots8 (a base-width-4 VAE, whose decoder amplifies rounding): the
reference's shot-0 decode is 8.9e-6 from a float64 run of the same math, ours (oneDNN
convolutions) 1.1e-5, the two 2.0e-5 apart, while the reference's own spread for that
group is 6.9e-6. Either program alone is about 1.3-1.6 spreads from exact, so two can be
about 3 apart; 4 leaves room for other seeds and sizes. A real error (a wrong constant,
a missed mask, a swapped row) moves these tensors by far more than 1e-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from cache.kv import KVCache, KVLayout
from model.config import ModelConfig, config_from_golden
from model.dit import CausalDiT
from model.sampler import FlowSchedule
from model.steps import chunk_pass, denoise_chunk, prefill_context, refresh_cache
from model.weights import load_dit_state, strip_prefix


@dataclass
class Check:
    """One compared tensor: its group, name, max abs error and tolerance."""

    group: str
    name: str
    max_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


@dataclass
class GroupResult:
    """The checks of one tensor group, with the reference's own spread for it (if recorded)."""

    group: str
    tolerance: float
    spread: float | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def worst(self) -> str:
        return max(self.checks, key=lambda c: c.max_abs).name if self.checks else ""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


NOISE_MULTIPLE = 4.0
"""A group's tolerance may be this many times the reference's own measured spread."""


def observed_spread(tolerances: dict) -> dict[str, float]:
    """Per group, the largest spread the reference showed against itself (re-runs on
    another thread count), from the sidecar's `tolerances.observed`."""
    spread: dict[str, float] = {}
    for run in tolerances.get("observed", {}).values():
        for group, value in run.get("max_abs_by_group", {}).items():
            spread[group] = max(spread.get(group, 0.0), float(value))
    return spread


class Golden:
    """A golden file: lazy tensor access plus its JSON sidecar; tensors are handed out on
    `device` (a CUDA replay checks the same recording on the GPU, in float32)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        sidecar = self.path.with_suffix(".json")
        if not self.path.is_file():
            raise FileNotFoundError(f"golden tensors not found: {self.path}")
        if not sidecar.is_file():
            raise FileNotFoundError(f"golden sidecar not found beside it: {sidecar}")
        self.meta = json.loads(sidecar.read_text())
        if self.meta.get("format") != "shotstream-golden":
            raise ValueError(f"{sidecar}: not a shotstream-golden sidecar")
        self._file = safe_open(str(self.path), framework="pt")
        self._names = set(self._file.keys())
        self.cfg: ModelConfig = config_from_golden(self.meta)
        self.calls: list[dict] = self.meta["calls"]
        self.calls_by_id = {c["id"]: c for c in self.calls}
        tol = self.meta["tolerances"]
        self.per_call_tol = float(tol["per_call_abs"])
        self.chain_tol = float(tol["chain_abs"])
        self.spread = observed_spread(tol)
        self.num_shots = int(self.meta["config"]["shots"]["num_shots"])

    def tolerance(self, group: str, stated: float) -> float:
        """`stated`, or NOISE_MULTIPLE x the reference's own spread for `group` if larger
        (see the module docstring); a stated 0 (an exact check) stays 0."""
        if stated == 0.0:
            return 0.0
        return max(stated, NOISE_MULTIPLE * self.spread.get(group, 0.0))

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name).to(self.device)

    def weights(self, part: str) -> dict[str, torch.Tensor]:
        """Tensors of `weights.<part>.` with that prefix removed (the checkpoint's own keys)."""
        prefix = self.meta["weights"][part]["prefix"]
        return {k[len(prefix) :]: self[k] for k in self._names if k.startswith(prefix)}

    def shot_calls(self, shot: int, kinds: tuple[str, ...] = ("dit_prefill", "dit")) -> list[dict]:
        return [c for c in self.calls if c.get("shot") == shot and c["kind"] in kinds]

    def build_dit(self) -> CausalDiT:
        sd = strip_prefix(self.weights("generator"), "model.", where=str(self.path))
        return load_dit_state(self.cfg, sd, self.device, what=f"{self.path.name} generator")


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ours {tuple(a.shape)} vs golden {tuple(b.shape)}")
    return float((a.double() - b.to(a.device).double()).abs().max()) if a.numel() else 0.0


def caption_index_for(flags: torch.Tensor, n_captions: int) -> torch.Tensor:
    """Frame -> caption row: its shot flag when there are several captions, else row 0."""
    return flags.long() if n_captions > 1 else torch.zeros_like(flags, dtype=torch.long)


def new_cache(
    cfg: ModelConfig, dtype=torch.float32, device="cpu", captions: int | None = None
) -> KVCache:
    """A one-session cache; `captions` widens its caption slots past what a live shot uses.

    The live generator keeps only the captions of shots that contribute a context frame
    (at most `cfg.max_captions`), while the original encodes the caption of every shot so
    far, so a recording of more shots than context frames carries more caption rows than a
    live cache holds. The replay feeds the recorded rows as they are.
    """
    layout = KVLayout.for_config(cfg)
    if captions is not None and captions > layout.max_captions:
        layout = replace(layout, max_captions=captions)
    return KVCache(layout, batch=1, dtype=dtype, device=device)


# -- per-call replay of the generator ------------------------------------------------
def replay_dit_calls(g: Golden, dit: CausalDiT, schedule: FlowSchedule) -> Iterator[Check]:
    """Teacher-forced replay of every recorded generator call, shot by shot, in order."""
    cfg = g.cfg
    ctx = cfg.context_tokens

    def tol(group: str) -> float:
        return g.tolerance(group, g.per_call_tol)

    for shot in range(g.num_shots):
        calls = g.shot_calls(shot)
        if not calls:
            continue
        n_cap = g[calls[0]["inputs"]["prompt_embeds"]].shape[0]
        kv = new_cache(cfg, device=g.device, captions=n_cap)
        for call in calls:
            ins = call["inputs"]
            x = g[ins["x"]]
            flags = g[ins["shot_flags"]].long()[None]  # (1, F)
            prompt = g[ins["prompt_embeds"]][None]  # (1, S, T, text_dim)
            n_cap = prompt.shape[1]
            captions = caption_index_for(flags, n_cap)
            record: dict[str, torch.Tensor] | None = {} if call.get("activations") else None
            cid = call["id"]
            if call["kind"] == "dit_prefill":
                prefill_context(dit, kv, x, flags, captions, prompt, record=record)
                for name in call["caches"].get("ctx", []):
                    kind, layer = _cache_key(name)
                    ours = (kv.k if kind == "k" else kv.v)[layer, :, :ctx]
                    yield Check("dit.caches", name, max_abs(ours, g[name]), tol("dit.caches"))
                for name in call["caches"].get("xattn", []):
                    kind, layer = _cache_key(name)
                    ours = (kv.text_k if kind == "k" else kv.text_v)[layer, 0, :n_cap]
                    yield Check("dit.caches", name, max_abs(ours, g[name]), tol("dit.caches"))
            else:
                chunk = int(call["chunk"])
                pass_ = chunk_pass(dit, kv, chunk, flags[:, 0], captions[:, 0])
                t = g[ins["t"]].float()
                flow = dit(x, t, pass_, record=record)
                t_value = float(call["params"]["timestep_value"])
                x0 = schedule.to_x0(x, flow, schedule.sigma_at(t_value))
                yield Check(
                    "dit.flow",
                    call["outputs"]["flow"],
                    max_abs(flow, g[call["outputs"]["flow"]]),
                    tol("dit.flow"),
                )
                name = call["outputs"]["x0"]
                yield Check("dit.x0", name, max_abs(x0, g[name]), tol("dit.x0"))
                filled = int(call["params"]["local_end_index"])
                for name in call["caches"].get("local", []):
                    kind, layer = _cache_key(name)
                    ours = (kv.k if kind == "k" else kv.v)[layer, :, ctx : ctx + filled]
                    yield Check("dit.caches", name, max_abs(ours, g[name]), tol("dit.caches"))
                if "renoise" in call:
                    rn = call["renoise"]
                    t_next = float(g[rn["t_next"]][0])
                    x_next = schedule.renoise(x0, g[rn["noise"]], schedule.sigma_at(t_next))
                    name = rn["x_next"]
                    err = max_abs(x_next, g[name])
                    yield Check("scheduler.renoise", name, err, tol("scheduler.renoise"))
            if record is not None:
                for act, name in call["activations"].items():
                    if act == "text_embedding":
                        # computed once per shot, at the prefill: (S, T, D) for batch row 0
                        ours = record.get(act, dit.embed_text(prompt))[0]
                    else:
                        ours = record[act]
                    yield Check(
                        "dit.activations", name, max_abs(ours, g[name]), tol("dit.activations")
                    )
            del cid


def _cache_key(name: str) -> tuple[str, int]:
    """'shot0.prefill.cache.ctx.k.L1' -> ('k', 1)."""
    parts = name.split(".")
    return parts[-2], int(parts[-1][1:])


# -- chained replay of a shot's generator loop ---------------------------------------
def run_shot(
    dit: CausalDiT,
    schedule: FlowSchedule,
    ctx_latents: torch.Tensor,
    ctx_flags: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    renoise_for: Callable[[int], list[torch.Tensor]],
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    captions: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv: KVCache | None = None,
) -> torch.Tensor:
    """Generate one shot through the verbs: prefill, then per chunk denoise + refresh.

    ctx_latents (1, Fc, C, h, w), ctx_flags (1, Fc), prompt_embeds (1, S, T, text_dim),
    noise (1, F_shot, C, h, w); `renoise_for(chunk)` gives that chunk's re-noise draws.
    `captions` (context frames' rows (1, Fc), the shot's row (1,)) default to the
    original's layout, a caption per shot so far (row = shot flag). `kv` receives the
    caches (default: a fresh one). Returns the shot's latents (1, F_shot, C, h, w).
    """
    cfg = dit.cfg
    n_cap = prompt_embeds.shape[1]
    if kv is None:
        kv = new_cache(cfg, dit.dtype, ctx_latents.device, captions=n_cap)
    gen_flag = ctx_flags[:, -1] + 1
    if captions is None:
        captions = caption_index_for(ctx_flags, n_cap), caption_index_for(gen_flag, n_cap)
    ctx_captions, caption = captions
    prefill_context(dit, kv, ctx_latents, ctx_flags, ctx_captions, prompt_embeds)
    n_chunks = noise.shape[1] // cfg.chunk_frames
    out = []
    for c in range(n_chunks):
        pass_ = chunk_pass(dit, kv, c, gen_flag, caption)
        eps = noise[:, c * cfg.chunk_frames : (c + 1) * cfg.chunk_frames]
        x0 = denoise_chunk(dit, schedule, pass_, eps, renoise_for(c))
        if on_chunk is not None:
            on_chunk(c, x0)
        refresh_cache(dit, pass_, x0)
        out.append(x0)
    return torch.cat(out, dim=1)


def recorded_renoise(g: Golden, shot: int) -> Callable[[int], list[torch.Tensor]]:
    def draws(chunk: int) -> list[torch.Tensor]:
        steps = g.cfg.sampler.num_steps
        return [g[f"shot{shot}.chunk{chunk}.step{k}.renoise.noise"] for k in range(steps - 1)]

    return draws


def replay_dit_chain(g: Golden, dit: CausalDiT, schedule: FlowSchedule) -> Iterator[Check]:
    """Free-running replay of each shot's generator loop from its recorded conditioning:
    context latents and prompt embeddings as recorded, noises injected."""
    for shot in range(g.num_shots):
        prefill = g.calls_by_id.get(f"shot{shot}.prefill")
        if prefill is None:
            continue
        ins = prefill["inputs"]
        flags = g[ins["shot_flags"]].long()[None]
        latents = run_shot(
            dit,
            schedule,
            g[ins["x"]],
            flags,
            g[ins["prompt_embeds"]][None],
            g[f"shot{shot}.noise"],
            recorded_renoise(g, shot),
        )
        name = f"shot{shot}.latents"
        err = max_abs(latents, g[name])
        yield Check("latents (chain)", name, err, g.tolerance("latents (chain)", g.chain_tol))


# -- the selftest entry point ----------------------------------------------------------
Replay = Callable[[Golden], Iterator[Check]]


def dit_replays() -> list[tuple[str, Replay]]:
    def per_call(g: Golden) -> Iterator[Check]:
        yield from replay_dit_calls(g, g.build_dit(), FlowSchedule(g.cfg.sampler))

    def chain(g: Golden) -> Iterator[Check]:
        yield from replay_dit_chain(g, g.build_dit(), FlowSchedule(g.cfg.sampler))

    def schedule(g: Golden) -> Iterator[Check]:
        sch = FlowSchedule(g.cfg.sampler)
        for name, ours in (
            ("scheduler.sigmas", sch.sigmas),
            ("scheduler.timesteps", sch.timesteps),
            ("scheduler.denoising_step_list", torch.tensor(sch.step_timesteps)),
        ):
            yield Check("scheduler", name, max_abs(ours, g[name]), 0.0)

    return [("scheduler", schedule), ("dit per call", per_call), ("dit chain", chain)]


REPLAYS: list[Callable[[], list[tuple[str, Replay]]]] = [dit_replays]


def run_selftest(path: str | Path, device: str | torch.device = "cpu") -> list[GroupResult]:
    """Run every registered replay on one golden file; results grouped by tensor group."""
    g = Golden(path, device)
    groups: dict[str, GroupResult] = {}
    with torch.inference_mode():
        for make in REPLAYS:
            for _label, replay in make():
                for check in replay(g):
                    grp = groups.setdefault(
                        check.group,
                        GroupResult(check.group, check.tolerance, g.spread.get(check.group)),
                    )
                    grp.checks.append(check)
    return list(groups.values())


# -- text encoder and VAE ------------------------------------------------------------
def replay_t5_calls(g: Golden, encoder) -> Iterator[Check]:
    """Each recorded umT5 call from its recorded token ids: raw output and prompt_embeds."""
    for call in (c for c in g.calls if c["kind"] == "t5"):
        ins, outs = call["inputs"], call["outputs"]
        raw, embeds = encoder.encode_ids(g[ins["ids"]], g[ins["mask"]])
        for ours, name in ((raw, outs["t5_out"]), (embeds, outs["prompt_embeds"])):
            yield Check("t5", name, max_abs(ours, g[name]), g.tolerance("t5", g.per_call_tol))


def replay_vae_encode_calls(g: Golden, vae) -> Iterator[Check]:
    """Each recorded VAE encode: 1-frame clips through `encode_frames`, longer clips whole."""
    for call in (c for c in g.calls if c["kind"] == "vae_encode"):
        pixels, name = g[call["inputs"]["pixels"]], call["outputs"]["latents"]
        if pixels.shape[2] == 1:  # context frames, each its own 1-frame clip
            ours = vae.encode_frames(pixels[:, :, 0])[:, None]
        else:
            ours = vae.encode_clip(pixels)
        tol = g.tolerance("vae.encode", g.per_call_tol)
        yield Check("vae.encode", name, max_abs(ours, g[name]), tol)


def replay_vae_decode_calls(g: Golden, vae) -> Iterator[Check]:
    """Each shot's decode, whole and streamed chunk by chunk (state reset per shot),
    against the recorded whole-shot pixels; streamed chunks are compared as slices."""
    tol = g.tolerance("vae.decode", g.per_call_tol)
    for call in (c for c in g.calls if c["kind"] == "vae_decode"):
        latents, name = g[call["inputs"]["latents"]], call["outputs"]["pixels"]
        ref = g[name]
        whole = vae.decode_whole(latents)
        yield Check("vae.decode", name, max_abs(whole, ref), tol)
        step = int(call.get("chunk_latent_frames", g.cfg.chunk_frames))
        counts = call.get("chunk_pixel_frames", [])
        state = vae.new_decoder_state(batch=latents.shape[0])
        start, streamed = 0, []
        for c, z in enumerate(latents.split(step, dim=1)):
            px = vae.decode_chunk(state, z)
            want = counts[min(c, len(counts) - 1)] if counts else g.cfg.chunk_pixel_frames(c)
            frames = f"{name}[chunk {c}].frames"
            yield Check("vae.decode", frames, float(abs(px.shape[1] - want)), 0.0)
            part = ref[:, start : start + px.shape[1]]
            if part.shape == px.shape:
                yield Check("vae.decode", f"{name}[chunk {c}]", max_abs(px, part), tol)
            start += px.shape[1]
            streamed.append(px)
        streamed_all = torch.cat(streamed, dim=1)
        diff = max_abs(streamed_all, whole) if streamed_all.shape == whole.shape else float("inf")
        yield Check("vae.decode", f"{name} streamed vs whole", diff, tol)


def codec_replays() -> list[tuple[str, Replay]]:
    # Imported here so DiT-only replays do not pay for diffusers and transformers.
    from model.text import TextEncoder
    from model.vae import WanVAE

    def t5(g: Golden) -> Iterator[Check]:
        what = f"{g.path.name} t5"
        encoder = TextEncoder.from_original_state(
            g.cfg, g.weights("t5"), device=g.device, what=what
        )
        yield from replay_t5_calls(g, encoder)

    def vae_encode(g: Golden) -> Iterator[Check]:
        vae = WanVAE.from_original_state(
            g.cfg, g.weights("vae"), g.device, what=f"{g.path.name} vae"
        )
        yield from replay_vae_encode_calls(g, vae)

    def vae_decode(g: Golden) -> Iterator[Check]:
        vae = WanVAE.from_original_state(
            g.cfg, g.weights("vae"), g.device, what=f"{g.path.name} vae"
        )
        yield from replay_vae_decode_calls(g, vae)

    return [("t5 per call", t5), ("vae encode per call", vae_encode), ("vae decode", vae_decode)]


REPLAYS.append(codec_replays)


# -- the whole loop (scenario S2) through the production generator ---------------------
class RecordedNoise:
    """The golden run's noises in the generator's (shot, chunk, draw) order."""

    def __init__(self, g: Golden):
        self.g = g

    def draw(self, shot: int, chunk: int, draw: int, shape) -> torch.Tensor:
        if draw == 0:
            f = self.g.cfg.chunk_frames
            return self.g[f"shot{shot}.noise"][:, chunk * f : (chunk + 1) * f]
        return self.g[f"shot{shot}.chunk{chunk}.step{draw - 1}.renoise.noise"]


def recorded_caption_encoder(g: Golden, encoder):
    """Encode captions from the token ids the golden run recorded for the same strings
    (its stand-in tokenizer is not ours); everything after the ids is our code."""
    from model.text import TextEncoding

    ids_of: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for call in (c for c in g.calls if c["kind"] == "t5"):
        ids, mask = g[call["inputs"]["ids"]], g[call["inputs"]["mask"]]
        for i, text in enumerate(call["texts"]):
            ids_of[text] = (ids[i], mask[i])

    def encode(specs) -> TextEncoding:
        rows = [ids_of[spec.text] for spec in specs]
        ids, mask = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        _, embeds = encoder.encode_ids(ids, mask)
        lengths = [int(m.sum()) for m in mask]
        n = len(specs)
        return TextEncoding(embeds, lengths, [0] * n, [False] * n, [s.text for s in specs])

    return encode


def replay_loop(g: Golden) -> Iterator[Check]:
    """Scenario S2 free-running: token ids and noises injected; captions, context
    selection, context VAE encode, prefill, chunks and streaming decode are ours."""
    from cache.kv import KVLayout
    from cache.pool import StatePool
    from model.generator import LoadedModel, ShotStreamGenerator
    from model.text import TextEncoder
    from model.vae import WanVAE

    cfg, tol = g.cfg, g.chain_tol
    dev = g.device
    text = TextEncoder.from_original_state(
        cfg, g.weights("t5"), device=dev, what=f"{g.path.name} t5"
    )
    vae = WanVAE.from_original_state(cfg, g.weights("vae"), dev, what=f"{g.path.name} vae")
    model = LoadedModel(cfg, g.build_dit(), vae, text, dev, torch.float32, str(g.path), False)
    pool = StatePool(KVLayout.for_config(cfg), vae.new_decoder_state, torch.float32, dev)
    lease = pool.acquire("golden")
    script = g.meta["config"]["script"]
    trace: dict = {}
    gen = ShotStreamGenerator(
        model,
        lease,
        script["global_caption"],
        noise=RecordedNoise(g),  # type: ignore[arg-type]
        encode_captions=recorded_caption_encoder(g, text),
        trace=trace,
    )
    try:
        for s in range(g.num_shots):
            start = gen.start_shot(script["shots"][s])
            if s > 0:
                ours = torch.tensor(start.context_indices)
                name = f"shot{s}.ctx.indices"
                yield Check("context.indices", name, max_abs(ours, g[name]), 0.0)
                name = f"shot{s}.ctx.latents_vae"
                ours = trace[s]["context_latents"][0][:, None]  # (6, 1, C, h, w)
                yield Check("loop (chain)", name, max_abs(ours, g[name]), tol)
            flags = torch.cat(
                [
                    trace[s]["flags"][0],
                    (trace[s]["flags"][0, -1:] + 1).expand(cfg.latent_frames_per_shot),
                ]
            )
            name = f"shot{s}.shot_flags"
            yield Check("context.indices", name, max_abs(flags, g[name].long()), 0.0)
            for _ in range(cfg.chunks_per_shot):
                gen.next_chunk()
            chunks = [trace[("chunk", s, c)] for c in range(cfg.chunks_per_shot)]
            latents = torch.cat([c["x0"] for c in chunks], dim=1)
            yield Check(
                "loop (chain)", f"shot{s}.latents", max_abs(latents, g[f"shot{s}.latents"]), tol
            )
            pixels = torch.cat([c["pixels"] for c in chunks], dim=0)[None]
            name = f"shot{s}.decode.pixels"
            yield Check("loop (chain)", name, max_abs(pixels, g[name]), tol)
    finally:
        pool.release(lease)


REPLAYS.append(lambda: [("whole loop (S2)", replay_loop)])
