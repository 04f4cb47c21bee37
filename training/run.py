"""`shotstream train-demo`: seventeen phases (the sixteenth in rounds) with checkpoints and
resume, then the export.

    work/vae.pt        phase 1 checkpoint (model, optimiser, step); vae_final.pt when done
    work/dit.pt        phase 2 checkpoint (DiT, text encoder, optimiser, step)
    work/start.pt      phase 3 checkpoint (first chunks place the object where their noise says)
    work/follow.pt     phase 4 checkpoint (whole shots keep that object through later steps
                       and later chunks)
    work/polish.pt     phase 5 checkpoint (phase 4 again, the object's pixels weighted up,
                       two chunks per shot)
    work/carry.pt      phase 6 checkpoint (phase 5 again on longer stories with more colour
                       turns; the quick recipe trains first chunks only on such stories)
    work/centre.pt     phase 7 checkpoint (phase 5 in the centred layout: every shot starts
                       with the object at the frame's centre)
    work/settle.pt     phase 8 checkpoint (phase 7 again from its result, a fresh optimiser
                       at a lower learning rate)
    work/motion.pt     phase 9 checkpoint (phase 8 again with the motion term, on stories
                       the phases before did not draw)
    work/decoder_input/  the weights after phase 9, loaded as a server would for phase 10
    work/decoder_data.pt phase 10's data: the generator's own latents and the frames they stand for
    work/decoder.pt    phase 10 checkpoint (the VAE decoder fine-tuned on those latents)
    work/sharpen.pt    phase 11 checkpoint (the VAE decoder trained on the encoder's latents
                       of rendered frames, to draw corners)
    work/refine.pt     phase 12 checkpoint (phase 8's config again, longer, from the DiT of
                       phase 9; the decoder phases need not run again: they train the decoder
                       only, and the DiT phases read the encoder's latents)
    work/fresh.pt      phase 13 checkpoint (phase 12 again on stories of its own)
    work/cross.pt      phase 14 checkpoint (phase 13 in the crossing layout: vertical shots
                       cross the frame, twice as fast)
    work/extend.pt     phase 15 checkpoint (phase 14 again on stories of its own)
    work/extra.pt      phase 16 checkpoint (phase 15 again on stories of its own); its later
                       rounds (each again on stories of its own) in extra2.pt, extra3.pt, ...
    work/whole.pt      phase 17 checkpoint (phase 16 with every chunk of a shot trained, not
                       the first two, on stories of its own)
    export/            generator.safetensors, vae/, text_encoder/, tokenizer/, vocabulary.json

Phases 1 to 6 render the first version's anchored layout, 7 to 13 the centred one, 14 to
17 the crossing one (training/render.py). `start_from` skips phases 1 to 6 and takes their
result from a weights folder instead (the first version's weights: how the shipped second
version was made from them, and the later ones from the checkpoints of the one before).

Checkpoints are written atomically every `checkpoint_s` seconds and at the end of a phase;
`resume` continues from them. Data and noise are keyed by (seed, step), so a resumed run
trains on the same batches as an uninterrupted one.

With `workers` > 1 (the quick recipe: 2) every DiT phase runs that many processes that
share each step (training/parallel.py): this process is rank 0 and writes the checkpoints,
the others are spawned for the phase from its weights and optimiser state, so `resume`
works as without them. Batches are then keyed by (seed, rank, step).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model.config import ModelConfig, get_preset
from model.dit import CausalDiT, build_dit
from model.generator import load_model
from model.text import build_umt5, load_tokenizer
from model.vae import WanVAE, build_autoencoder
from training.decoder_train import (
    DecoderTrainConfig,
    decoder_step,
    generated_frames,
    make_decoder_optimizer,
)
from training.dit_train import DiTTrainConfig, DiTTrainer
from training.parallel import PhaseJob, Ranks, rank_config
from training.render import ClipKey, Geometry, all_scenes, held_out_scenes, render_frames
from training.start_train import StartTrainer
from training.tokenizer import save_tokenizer
from training.vae_train import (
    VAETrainConfig,
    clip_frame_offsets,
    fold_normalisation,
    init_vae,
    latent_stats,
    make_optimizer,
    train_vae_step,
)
from training.vocab import vocabulary


def _whole_shots(steps: int, **changes) -> DiTTrainConfig:
    """A start_train phase over whole shots, every chunk at one of the sampler's levels (the
    first half the time: it places the object) and later levels fed faded objects."""
    base = dict(
        lr=5e-4,
        warmup=20,
        level_weights=(0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3),
        fade_min=0.2,
        whole_shot=True,
        layout="anchored",
    )
    return DiTTrainConfig(steps=steps, **{**base, **changes})


def _centred(steps: int) -> DiTTrainConfig:
    """The second version's DiT phase: the object-weighted two-chunk phase in the centred
    layout (every shot starts with the object at the frame's centre; training/render.py)."""
    return _whole_shots(steps, object_weight=6.0, train_chunks=2, layout="centred")


def _settle(steps: int) -> DiTTrainConfig:
    """Phase 7 again from its result, with a fresh optimiser at a lower peak learning rate
    (3e-4 instead of 5e-4): measured on the held-out stories, 1200 such steps after phase 7
    raised colour, framing and carry-over where phase 7's own end had levelled off."""
    return replace(_centred(steps), lr=3e-4)


def _motion(steps: int) -> DiTTrainConfig:
    """Phase 8 again at half its learning rate on stories it has not drawn (`data_seed` 1),
    with the motion term (the error of the frame-to-frame change, which the plain x0 error
    lets a still object pass for a moving one) and a quarter of the later levels fed a
    frozen object to set moving (`freeze_prob`)."""
    return replace(_centred(steps), lr=1.5e-4, motion_weight=1.0, freeze_prob=0.25, data_seed=1)


def _fresh(steps: int) -> DiTTrainConfig:
    """Phase 12 again, a fresh optimiser, on stories none of the phases before drew
    (`data_seed` 5)."""
    return replace(_settle(steps), data_seed=5)


def _cross(steps: int) -> DiTTrainConfig:
    """Phase 13 in the crossing layout (training/render.py), on stories of its own
    (`data_seed` 6)."""
    return replace(_settle(steps), layout="crossing", data_seed=6)


def _extend(steps: int) -> DiTTrainConfig:
    """Phase 14 again, a fresh optimiser, on stories of its own (`data_seed` 8)."""
    return replace(_cross(steps), data_seed=8)


def _extra(steps: int) -> DiTTrainConfig:
    """Phase 15 again, a fresh optimiser, on stories of its own (`data_seed` 9)."""
    return replace(_cross(steps), data_seed=9)


def _whole(steps: int) -> DiTTrainConfig:
    """Phase 16 with every chunk of a shot trained (phases 5 to 16 train the first two: a
    later chunk differs from the second only in how much history it sees), on stories of
    its own (`data_seed` 16). Measured after seven rounds of phase 16: the third and fourth
    chunks of a shot had drawn fewer shapes right (0.82, 0.76 against 0.90 for the first
    two) and the fourth had kept moving in under half of its shots."""
    return replace(_extra(steps), train_chunks=0, data_seed=16)


def _sharpen(steps: int) -> DecoderTrainConfig:
    """Phase 11: rendered frames only (no generated stories), batches of its own."""
    return DecoderTrainConfig(steps=steps, stories=0, real_share=1.0, data_seed=7)


def _placement(steps: int, **changes) -> DiTTrainConfig:
    """A start_train phase of first chunks at sigma 1 only, first shots that stay still."""
    return DiTTrainConfig(
        steps=steps,
        lr=1e-3,
        warmup=20,
        level_weights=(1.0, 0.0, 0.0, 0.0),
        history_weights=(1.0,),
        still_only=True,
        layout="anchored",
        **changes,
    )


def _quick_placement(steps: int) -> DiTTrainConfig:
    """The quick recipe's placement phase: object-weighted, in the crossing layout its later
    phases train in (every shot starts where its framing and motion put it)."""
    return replace(_placement(steps, object_weight=6.0), layout="crossing")


def _quick_carry(steps: int) -> DiTTrainConfig:
    """The quick recipe's phase 6: the placement phase's config (first chunks at sigma 1,
    the object weighted up) on stories with one to five earlier shots and colour turns in
    half the later shots and 70 % of the first ones, with any motion, on stories of its own
    (`data_seed` 3). The sigma = 1 step is the one that must take a turned colour from the
    context frames when the captions no longer name it, and a quick DiT had learnt to take
    the global caption's instead; first chunks only make its steps cheap."""
    return replace(
        _quick_placement(steps),
        still_only=False,
        turn_prob=0.5,
        first_turn_prob=0.7,
        history_weights=(0.0, 0.35, 0.25, 0.18, 0.12, 0.1),
        data_seed=3,
    )


def _carry(steps: int) -> DiTTrainConfig:
    """The object-weighted two-chunk phase on stories with more earlier shots and more colour
    turns (a later shot's colour comes from its own caption or from the context frames more
    often than from the global caption)."""
    return _whole_shots(
        steps,
        object_weight=6.0,
        train_chunks=2,
        turn_prob=0.5,
        history_weights=(0.1, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08),
    )


@dataclass(frozen=True)
class TrainDemoConfig:
    """The `quick` recipe (the defaults): under an hour on 2 CPU cores (52.4 minutes of
    phases measured; with one process and fewer steps 55.7, and before phase 6 54.5 and
    52.0 on two machines): the VAE phase, then four DiT phases in the crossing layout from
    a fresh DiT (placement, phase 6 as first chunks on stories whose colour turned in an
    earlier shot, phase 14's two-chunk config and phase 17's every-chunk one, each at a
    higher learning rate than the full recipe's) and, between the second and the third, a
    short phase 11 (the decoder). Two processes share every DiT step (`workers`;
    training/parallel.py), which bought the steps of the last three DiT phases (the model
    card). `full_recipe()` is the longer one the shipped weights come from."""

    seed: int = 0
    vae: VAETrainConfig = field(default_factory=lambda: VAETrainConfig(layout="anchored"))
    # phase 2: teacher-forced flow matching over every level and chunk from a fresh DiT;
    # the quick recipe skips it (the placement phase learns as fast from scratch)
    dit: DiTTrainConfig = field(default_factory=lambda: DiTTrainConfig(steps=0, layout="anchored"))
    # phase 3 (start_train): sigma = 1 only, first shots that stay still; quick: the object's
    # latent pixels weighted up (the plain objective learns the backgrounds long before the
    # object's colour), in the crossing layout of its later phases
    start: DiTTrainConfig = field(default_factory=lambda: _quick_placement(500))
    # phase 4 (start_train): any shot, every chunk at its own level: the first chunk at
    # sigma 1 keeps placing the object, its later levels keep it wherever it is (faint ones
    # included), and later chunks follow their history; the quick recipe skips it
    follow: DiTTrainConfig = field(default_factory=lambda: _whole_shots(0))
    # phase 5 (start_train): phase 4 with the object's latent pixels weighted up and two
    # chunks per shot (less than half the time per step; later chunks differ from the second
    # only in how much history they see); the quick recipe skips it
    polish: DiTTrainConfig = field(default_factory=lambda: _whole_shots(0))
    # phase 6 (start_train): phase 5 on longer stories with more colour turns; quick: first
    # chunks at sigma 1 on such stories (`_quick_carry`; measured at 600 steps from the
    # placement checkpoint with the later phases after it: carry-over 0.07 -> 0.25 and every
    # other figure held or rose; 800 since two workers made steps cheaper; the model card)
    carry: DiTTrainConfig = field(default_factory=lambda: _quick_carry(800))
    # phase 7 (start_train): phase 5 in the centred layout; the quick recipe skips it
    centre: DiTTrainConfig = field(default_factory=lambda: _centred(0))
    # phase 8 (start_train): phase 7 again at a lower learning rate; the quick recipe skips it
    settle: DiTTrainConfig = field(default_factory=lambda: _settle(0))
    # phase 9 (start_train): phase 8 with a motion term, new stories; the quick recipe skips it
    motion: DiTTrainConfig = field(default_factory=lambda: _motion(0))
    # phase 10 (decoder_train): the VAE decoder on the generator's own latents; quick skips it
    decoder: DecoderTrainConfig = field(default_factory=lambda: DecoderTrainConfig(steps=0))
    # phase 11 (decoder_train): the VAE decoder on the encoder's latents of rendered frames;
    # quick: 1000 steps (4 minutes: shape 0.37 -> 0.43 on the quick recipe's DiT)
    sharpen: DecoderTrainConfig = field(default_factory=lambda: _sharpen(1000))
    # phase 12 (start_train): phase 8's config again after the decoder phases; quick skips it
    refine: DiTTrainConfig = field(default_factory=lambda: _settle(0))
    # phase 13 (start_train): phase 12 again on stories of its own; quick skips it
    fresh: DiTTrainConfig = field(default_factory=lambda: _fresh(0))
    # phase 14 (start_train): phase 13 in the crossing layout; quick: the first DiT phase
    # after placement, at the placement phase's learning rate (1e-3: a DiT trained only to
    # place, not a settled one; measured with the last phase after it: 5e-4 and 2e-3 end
    # lower on shape, motion and switches: 0.41, 0.77, 0.33 and 0.47, 0.78, 0.35 against
    # 0.53, 0.97, 0.69); round_prob stays off: at 0.5 shape rose only to 0.59 after the
    # last phase, and carry-over fell to 0.02 (the model card)
    cross: DiTTrainConfig = field(default_factory=lambda: replace(_cross(4000), lr=1e-3))
    # phase 15 (start_train): phase 14 again on stories of its own; quick skips it
    extend: DiTTrainConfig = field(default_factory=lambda: _extend(0))
    # phase 16 (start_train): phase 15 again on stories of its own, in rounds (each a fresh
    # optimiser on stories of its own: round k draws data_seed + k - 1); quick skips it
    extra: DiTTrainConfig = field(default_factory=lambda: _extra(0))
    extra_rounds: int = 1
    # phase 17 (start_train): phase 16 with every chunk of a shot trained; quick: straight
    # after phase 14, at 2e-3 (measured from phase 14's result on the three story sets:
    # shape, motion and switches 0.43, 0.75, 0.31 at 5e-4; 0.51, 0.90, 0.53 at 1e-3; 0.54,
    # 0.93, 0.60 at 1.5e-3; 0.53, 0.97, 0.69 at 2e-3; at 2e-3 over three draws of the
    # phase's stories, motion 0.86 to 0.97 and switches 0.45 to 0.69, so 1.5e-3 is as good);
    # round_prob stays off: 0.25 or 0.5 raised shape by 0.11 to 0.15 on two draws and
    # ended with motion 0.84 to 0.85 and switches 0.43 to 0.47 (the model card)
    whole: DiTTrainConfig = field(default_factory=lambda: replace(_whole(2650), lr=2e-3))
    # processes that share every DiT step (training/parallel.py): each draws batch / workers
    # stories from a seed of its own, so the count is part of the recipe; quick: two (one
    # process left the second core half idle: 1.5 to 1.6 times the steps a second, which
    # bought phase 6 800 steps instead of 600, phase 14 4000 instead of 2500 and phase 17
    # 2650 instead of 1600: shape 0.59 -> 0.75, consistency 0.48 -> 0.70, carry-over
    # 0.25 -> 0.50, switches 0.72 -> 0.98; the model card)
    workers: int = 2
    checkpoint_s: float = 120.0


def full_recipe(seed: int = 0) -> TrainDemoConfig:
    """The recipe of the shipped weights: the first version's six phases (164 minutes on 2
    CPU cores: the teacher-forced DiT phase first, placement without the object weight, the
    plain whole-shot phase, then the object-weighted phases, each longer), then the centred
    layout at three learning rates (the last with the motion term), the two decoder phases,
    then six DiT phases at the second of those rates: two centred, four in the crossing
    layout, five of them on stories of their own. Measured on the three held-out story
    sets (the model card), each raised the figures, new stories more than more steps on
    the old ones (phase 12's batches, data_seed 0, are the ones phases 7 and 8 drew first);
    the crossing layout raised vertical motion from under 0.1 to 0.84 up and 0.67 down
    (phase 15). Phase 16 runs in rounds of new stories (seven: shape 0.67 -> 0.87,
    cross-shot consistency 0.62 -> 0.88, carry-over 0.57 -> 0.88, up 0.86, down 0.82); phase
    17 trains every chunk of a shot, where the phases before trained two: motion 1.00,
    shape 0.90, consistency 0.91."""
    return TrainDemoConfig(
        seed=seed,
        dit=DiTTrainConfig(layout="anchored"),
        start=_placement(1500),
        follow=_whole_shots(800),
        polish=_whole_shots(1500, object_weight=6.0, train_chunks=2),
        carry=_carry(1000),
        centre=_centred(3000),
        settle=_settle(1200),
        motion=_motion(1200),
        decoder=DecoderTrainConfig(steps=1000),
        sharpen=_sharpen(3000),
        refine=_settle(2000),
        fresh=_fresh(2000),
        cross=_cross(3000),
        extend=_extend(2000),
        extra=_extra(2000),
        extra_rounds=7,
        whole=_whole(2000),
        workers=1,
    )


RECIPES = {"quick": TrainDemoConfig, "full": full_recipe}  # name -> (seed) -> config


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


# the DiT phases after phase 2, in order
LATER_PHASES = ("start", "follow", "polish", "carry", "centre", "settle", "motion")
# the VAE decoder phases after them, in order
DECODER_PHASES = ("decoder", "sharpen")
# the DiT phases after the decoder phases
FINAL_PHASES = ("refine", "fresh", "cross", "extend", "extra")
# the DiT phases after the rounds of phase 16
AFTER_ROUNDS = ("whole",)
# every phase with a checkpoint of its own after phase 2, in the order they run
PHASE_ORDER = (*LATER_PHASES, *DECODER_PHASES, *FINAL_PHASES, *AFTER_ROUNDS)


def round_name(k: int) -> str:
    """The checkpoint name of phase 16's round `k` (1, 2, ...): extra, extra2, ..."""
    return "extra" if k == 1 else f"extra{k}"


def _round_of(name: str) -> int | None:
    """The round a phase name stands for (None: not a round of phase 16)."""
    if name == "extra":
        return 1
    rest = name.removeprefix("extra")
    return int(rest) if rest != name and rest.isdigit() and int(rest) > 1 else None


def extra_rounds(tc: TrainDemoConfig) -> list[tuple[str, DiTTrainConfig]]:
    """Phase 16's rounds, (name, config) each: round k draws the stories of
    `data_seed` + k - 1, with an optimiser of its own."""
    return [
        (round_name(k), replace(tc.extra, data_seed=tc.extra.data_seed + k - 1))
        for k in range(1, tc.extra_rounds + 1)
    ]


def _discard_after(work: Path, name: str) -> None:
    """Remove the checkpoints of every phase after `name` ("dit": all of them), which were
    built on weights that are about to change (the later rounds of phase 16 included)."""
    k = _round_of(name)
    if k is None:
        later = PHASE_ORDER[PHASE_ORDER.index(name) + 1 :] if name in PHASE_ORDER else PHASE_ORDER
        if "extra" in later:  # a phase before the rounds: every round comes after it
            k = 0
    else:  # a round: the later rounds and the phases after the rounds
        later = AFTER_ROUNDS
    for phase in later:
        (work / f"{phase}.pt").unlink(missing_ok=True)
    if "decoder" in later:
        (work / "decoder_data.pt").unlink(missing_ok=True)
    if k is None:  # a phase after the rounds
        return
    for path in work.glob("extra*.pt"):
        later_round = _round_of(path.stem)
        if later_round is not None and later_round > k:
            path.unlink(missing_ok=True)


def _run_phase(
    name: str, trainer: DiTTrainer, work: Path, checkpoint_s: float, resume: bool, workers: int = 1
) -> int:
    """Train `trainer`'s DiT and text encoder to its config's step count, checkpointing to
    work/NAME.pt (resumed from it with `resume`); returns the step it started at. When it
    trains at all, the later phases' checkpoints are discarded: they were built on other
    weights. With `workers` > 1, `trainer` is rank 0's (built with `rank_config`) and the
    other ranks are spawned for the phase (training/parallel.py)."""
    dit, text, opt, steps = trainer.dit, trainer.text, trainer.opt, trainer.tc.steps
    path = work / f"{name}.pt"
    start = 0
    ckpt = _load(path) if resume else None
    if ckpt is not None:
        dit.load_state_dict(ckpt["dit"])
        text.load_state_dict(ckpt["text"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    if start < steps:
        _discard_after(work, name)
    dit.train()
    text.train()

    def save(step: int) -> None:
        state = {"dit": dit.state_dict(), "text": text.state_dict(), "opt": opt.state_dict()}
        _save({**state, "step": step}, path)

    timer = _Checkpointer(checkpoint_s)
    bar = tqdm(range(start, steps), desc=name, unit="step", initial=start, total=steps)
    ranks = contextlib.nullcontext()
    if workers > 1 and start < steps:
        job = PhaseJob(
            type(trainer),
            trainer.cfg.name,
            replace(trainer.tc, batch=trainer.tc.batch * workers),
            trainer.seed,
            workers,
            start,
            str(work / f".{name}.handoff"),
            str(work / f".{name}.store"),
            str(work / "tokenizer"),
        )
        ranks = Ranks(trainer, job)
    try:
        with ranks:
            for step in bar:
                logs = trainer.step(step)
                bar.set_postfix(
                    loss=f"{logs['loss']:.4f}", x0=f"{logs['x0_mse']:.4f}", cache=len(trainer.cache)
                )
                if timer.due():
                    save(step + 1)
            if isinstance(ranks, Ranks):
                ranks.finish()
    finally:
        trainer.close()
    save(steps)
    dit.eval()
    text.eval()
    return start


class _Checkpointer:
    def __init__(self, every_s: float):
        self.every_s, self.last = every_s, time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            return True
        return False


def train_vae_phase(cfg: ModelConfig, tc: TrainDemoConfig, work: Path, resume: bool) -> WanVAE:
    """Phase 1; returns the VAE with its latent statistics folded in (unit-scale latents)."""
    final = work / "vae_final.pt"
    model = build_autoencoder(cfg.vae)
    if resume and final.is_file():
        model.load_state_dict(_load(final)["model"])
        tqdm.write(f"vae: done earlier ({final})")
        return WanVAE(model, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        init_vae(model, tc.vae.init_logvar)
    opt = make_optimizer(model, tc.vae)
    start = 0
    ckpt = _load(work / "vae.pt") if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    geo = Geometry.for_config(cfg, tc.vae.layout)
    model.train()
    timer = _Checkpointer(tc.checkpoint_s)
    bar = tqdm(
        range(start, tc.vae.steps), desc="vae", unit="step", initial=start, total=tc.vae.steps
    )
    for step in bar:
        logs = train_vae_step(model, opt, tc.seed, step, geo, tc.vae)
        bar.set_postfix(l1=f"{logs['l1']:.4f}")
        if timer.due():
            _save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                work / "vae.pt",
            )
    model.eval()
    mean, std = latent_stats(model, geo, tc.seed, tc.vae.stats_frames)
    fold_normalisation(model, mean, std)
    vae = WanVAE(model, cfg)
    check_per_frame(vae, geo)
    _save({"model": model.state_dict(), "mean": mean, "std": std}, final)
    return vae


def check_per_frame(vae: WanVAE, geo: Geometry) -> None:
    """The DiT phase encodes clips frame by frame; refuse a VAE for which that is wrong."""
    key = ClipKey("blue", "yellow", "circle", "wide", "right")
    clip = render_frames(key, geo, list(range(1 + 4 * 3)))
    whole = vae.encode_clip(clip.permute(1, 0, 2, 3)[None])[0]
    frames = vae.encode_frames(clip[clip_frame_offsets(vae.cfg, whole.shape[0])])
    err = float((whole - frames).abs().max())
    if err > 1e-3:
        raise RuntimeError(f"the VAE is not per-frame (max latent difference {err:.2e})")


def init_dit(cfg: ModelConfig, seed: int) -> CausalDiT:
    """Random init with a zero output head: the first prediction is x0 = x_t."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = build_dit(cfg)
    torch.nn.init.zeros_(dit.head.head.weight)
    torch.nn.init.zeros_(dit.head.head.bias)
    return dit


def _tokenizer_and_scenes(cfg: ModelConfig, work: Path) -> tuple:
    """The tokenizer (written to work/tokenizer) and the training scenes (all but the
    held-out ones) of the DiT phases."""
    return load_tokenizer(cfg.text, save_tokenizer(work / "tokenizer")), training_scenes()


def training_scenes() -> list:
    """Every scene but the held-out ones (training/render.py)."""
    held = held_out_scenes()
    return [s for s in all_scenes() if s not in held]


def train_dit_phase(
    cfg: ModelConfig, tc: TrainDemoConfig, work: Path, vae: WanVAE, resume: bool
) -> tuple[CausalDiT, torch.nn.Module, int]:
    """Phase 2: the causal student and the text encoder, jointly; also returns the step it
    started at (> 0 when resumed from a checkpoint)."""
    dit = init_dit(cfg, tc.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed + 2)
        text = build_umt5(cfg.text)
    tokenizer, scenes = _tokenizer_and_scenes(cfg, work)
    pc = rank_config(tc.dit, tc.workers)
    trainer = DiTTrainer(cfg, dit, text, vae, tokenizer, scenes, pc, tc.seed + tc.dit.data_seed)
    start = _run_phase("dit", trainer, work, tc.checkpoint_s, resume, tc.workers)
    return dit, text, start


def train_start_phase(
    name: str,
    cfg: ModelConfig,
    tc: TrainDemoConfig,
    work: Path,
    vae: WanVAE,
    dit: CausalDiT,
    text: torch.nn.Module,
    resume: bool,
    pc: DiTTrainConfig | None = None,
) -> None:
    """Phases 3 to 9 and 12 on (start_train, `name` one of LATER_PHASES, FINAL_PHASES or
    AFTER_ROUNDS, or a round of phase 16 with its config `pc`): a shot's first chunk places
    the object, then the whole shot keeps it through the sampler's later steps and later
    chunks; trains `dit` and `text` in place and leaves them in eval mode."""
    pc = getattr(tc, name) if pc is None else pc
    tokenizer, scenes = _tokenizer_and_scenes(cfg, work)
    seed = tc.seed + pc.data_seed
    trainer = StartTrainer(
        cfg, dit, text, vae, tokenizer, scenes, rank_config(pc, tc.workers), seed
    )
    _run_phase(name, trainer, work, tc.checkpoint_s, resume, tc.workers)


def export_weights(
    folder: Path, cfg: ModelConfig, dit: CausalDiT, text: torch.nn.Module, vae: WanVAE, meta: dict
) -> Path:
    """Write the weights folder the `demo` preset loads (model.layout's diffusers layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in dit.state_dict().items()},
        str(folder / "generator.safetensors"),
    )
    vae.model.save_pretrained(str(folder / "vae"), safe_serialization=True)
    conf_path = folder / "vae" / "config.json"  # a VAE loaded from a folder names it: drop that
    conf = json.loads(conf_path.read_text())
    if conf.pop("_name_or_path", None) is not None:
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    text.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    save_tokenizer(folder / "tokenizer")
    (folder / "vocabulary.json").write_text(json.dumps(vocabulary(), indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def train_decoder_phase(
    cfg: ModelConfig,
    tc: TrainDemoConfig,
    work: Path,
    dit: CausalDiT,
    text: torch.nn.Module,
    vae: WanVAE,
    resume: bool,
) -> WanVAE:
    """Phase 10 (decoder_train): returns the VAE with its decoder fine-tuned on the latents the
    generator makes with `dit` and `text` (`vae` itself when the phase has no steps)."""
    dc = tc.decoder
    if dc.steps == 0:
        return vae
    folder = export_weights(work / "decoder_input", cfg, dit, text, vae, {"phase": "decoder"})
    model = load_model(cfg, folder, device="cpu")
    data_path = work / "decoder_data.pt"
    saved = _load(data_path) if resume else None
    if saved is None:
        _, scenes = _tokenizer_and_scenes(cfg, work)
        bar = tqdm(total=dc.stories, desc="decoder data", unit="story")
        data = generated_frames(model, scenes, dc, tc.seed, progress=lambda n: bar.update(1))
        bar.close()
        _save({"data": data}, data_path)
    else:
        data = saved["data"]
    return _train_decoder("decoder", cfg, model.vae, data, dc, tc, work, resume)


def _train_decoder(
    name: str,
    cfg: ModelConfig,
    vae: WanVAE,
    data: list,
    dc: DecoderTrainConfig,
    tc: TrainDemoConfig,
    work: Path,
    resume: bool,
) -> WanVAE:
    """Train `vae`'s decoder for `dc.steps` decoder steps on `data` (generated frames) and
    encoded rendered ones, checkpointing to work/NAME.pt; returns `vae`, trained. When it
    trains at all, the phases after `name` are discarded."""
    opt = make_decoder_optimizer(vae, dc)
    path = work / f"{name}.pt"
    start = 0
    ckpt = _load(path) if resume else None
    if ckpt is not None:
        vae.model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    if start < dc.steps:
        _discard_after(work, name)
    geo = Geometry.for_config(cfg, "centred")

    def save(step: int) -> None:
        state = {"model": vae.model.state_dict(), "opt": opt.state_dict(), "step": step}
        _save(state, path)

    timer = _Checkpointer(tc.checkpoint_s)
    bar = tqdm(range(start, dc.steps), desc=name, unit="step", initial=start, total=dc.steps)
    for step in bar:
        logs = decoder_step(vae, opt, data, geo, dc, tc.seed, step)
        bar.set_postfix(l1=f"{logs['l1']:.4f}")
        if timer.due():
            save(step + 1)
    save(dc.steps)
    vae.model.eval().requires_grad_(False)
    return vae


def train_sharpen_phase(
    cfg: ModelConfig, tc: TrainDemoConfig, work: Path, vae: WanVAE, resume: bool
) -> WanVAE:
    """Phase 11 (decoder_train, `real_share` 1): returns the VAE with its decoder trained on
    the encoder's latents of rendered frames (`vae` itself when the phase has no steps)."""
    if tc.sharpen.steps == 0:
        return vae
    return _train_decoder("sharpen", cfg, vae, [], tc.sharpen, tc, work, resume)


def load_start(cfg: ModelConfig, folder: Path) -> tuple[CausalDiT, torch.nn.Module, WanVAE]:
    """The DiT, text encoder and VAE of a weights folder, ready to train further."""
    model = load_model(cfg, folder, device="cpu")
    return model.dit.requires_grad_(True), model.text.model.requires_grad_(True), model.vae


def train_demo(
    work: str | Path,
    export: str | Path | None,
    tc: TrainDemoConfig,
    resume: bool = False,
    threads: int = 1,
    vae_threads: int = 0,
    start_from: str | Path | None = None,
) -> Path:
    """Train the demo model end to end; returns the exported weights folder.

    `threads` serves the DiT phases: one by default, because their prefetch thread renders
    and encodes the next batch on another core, and on a busy 2-core host two OpenMP
    threads are often many times slower than one. The VAE and sharpen phases run alone, so
    they take `vae_threads` (0: every core; on 2 cores about 1.5x faster than one thread).
    `start_from`: a weights folder that stands for phases 1 to 6 (they are skipped)."""
    torch.set_flush_denormal(True)
    cfg = get_preset("demo")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, int] = {}
    vae_threads = vae_threads or os.cpu_count() or 1
    dit_start = 0

    def dit_phases(phases) -> None:  # start_train phases, (name, config) each, timed one by one
        for name, pc in phases:
            t0 = time.time()
            train_start_phase(name, cfg, tc, work, vae, dit, text, resume, pc)
            seconds[name] = round(time.time() - t0)

    if start_from is None:
        t0 = time.time()
        torch.set_num_threads(vae_threads)
        vae = train_vae_phase(cfg, tc, work, resume)
        torch.set_num_threads(threads)
        seconds["vae"] = round(time.time() - t0)
        t0 = time.time()
        dit, text, dit_start = train_dit_phase(cfg, tc, work, vae, resume)
        seconds["dit"] = round(time.time() - t0)
        names = LATER_PHASES
    else:
        torch.set_num_threads(threads)
        dit, text, vae = load_start(cfg, Path(start_from))
        names = LATER_PHASES[LATER_PHASES.index("centre") :]
    dit_phases([(name, getattr(tc, name)) for name in names])
    t0 = time.time()
    vae = train_decoder_phase(cfg, tc, work, dit, text, vae, resume)
    seconds["decoder"] = round(time.time() - t0)
    t0 = time.time()
    torch.set_num_threads(vae_threads)  # like the VAE phase it runs alone
    vae = train_sharpen_phase(cfg, tc, work, vae, resume)
    seconds["sharpen"] = round(time.time() - t0)
    torch.set_num_threads(threads)
    # the last of FINAL_PHASES, "extra", runs in rounds; AFTER_ROUNDS follow them
    dit_phases(
        [(name, getattr(tc, name)) for name in FINAL_PHASES[:-1]]
        + extra_rounds(tc)
        + [(name, getattr(tc, name)) for name in AFTER_ROUNDS]
    )
    meta = {
        "preset": cfg.name,
        "recipe": next((n for n, make in RECIPES.items() if make(tc.seed) == tc), "custom"),
        "config": asdict(tc),
        "seconds": seconds,
        "torch_threads": {"vae": vae_threads, "dit": threads},
        "resumed": resume,
        "dit_started_at_step": dit_start,
        "started_from": None if start_from is None else str(start_from),
    }
    out = Path(export) if export else work / "export"
    return export_weights(out, cfg, dit, text, vae, meta)


def run_train_demo(args) -> int:
    """`shotstream train-demo`."""
    base = RECIPES[args.recipe](seed=args.seed)
    vae = base.vae if args.vae_steps is None else replace(base.vae, steps=args.vae_steps)
    dit = base.dit
    if args.dit_steps is not None:
        dit = replace(dit, steps=args.dit_steps)
    if args.dit_batch is not None:
        dit = replace(dit, batch=args.dit_batch)
    if args.dit_unroll is not None:
        dit = replace(dit, unroll_prob=args.dit_unroll)
    later = {}  # each of PHASE_ORDER, with its --NAME-steps when given
    for name in PHASE_ORDER:
        phase, steps = getattr(base, name), getattr(args, f"{name}_steps")
        later[name] = phase if steps is None else replace(phase, steps=steps)
    if args.decoder_stories is not None:
        later["decoder"] = replace(later["decoder"], stories=args.decoder_stories)
    if args.extra_rounds is not None:
        base = replace(base, extra_rounds=args.extra_rounds)
    if args.workers is not None:
        base = replace(base, workers=args.workers)
    tc = replace(base, vae=vae, dit=dit, **later)
    out = train_demo(
        args.work,
        args.out,
        tc,
        resume=args.resume,
        threads=args.threads,
        vae_threads=args.vae_threads,
        start_from=args.start_from,
    )
    print(f"weights written to {out}")
    return 0


def run_eval_demo(args) -> int:
    """`shotstream eval-demo`: one JSON line (with --json nothing else on stdout)."""
    from training.evaluate import evaluate

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    result = evaluate(
        args.weights,
        args.random_weights,
        args.stories,
        args.seed,
        progress=not args.json,
        with_round_trip=args.round_trip,
        seeds=args.seeds,
    )
    print(json.dumps(result), flush=True)
    return 0
