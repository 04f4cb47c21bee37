"""Offline generation: a multi-shot script in, one ordinary MP4 file out (`shotstream generate`).

The script is the original demo's JSON: `{"global_caption": str, "shot1": str, "shot2": ...}`,
shots numbered from 1. Every shot runs `chunks_per_shot` chunks through the same
`ShotStreamGenerator` the server uses, and each chunk's frames go straight to the encoder,
so memory does not grow with the video's length.

The file is a progressive MP4 (H.264 High, yuv420p, BT.709 limited range, `moov` at the
front), not the server's fragmented MP4: a progressive file with a duration and a sample
index is what every player, editor and upload form handles best, and seeks instantly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, VideoReformatter
from tqdm import tqdm

from cache.kv import KVLayout
from cache.pool import StatePool
from model.generator import LoadedModel, ShotStreamGenerator

SHOT_KEY = re.compile(r"shot(\d+)")
VERBS = ("text", "context", "prefill", "denoise", "decode", "refresh")


# -- the script ---------------------------------------------------------------------------
class ScriptError(ValueError):
    """A script file that is unreadable or not in the demo format; the message says why."""


@dataclass(frozen=True)
class Script:
    """A global caption and the shots' own prompts, in order."""

    global_caption: str
    shots: tuple[str, ...]


def parse_script(obj: Any, where: str = "script") -> Script:
    """Validate a decoded demo script: a global caption and shot1..shotN, all non-empty text."""
    if not isinstance(obj, dict):
        raise ScriptError(
            f"{where}: expected a JSON object like "
            '{"global_caption": "...", "shot1": "...", "shot2": "..."}, '
            f"found a JSON {type(obj).__name__}"
        )
    problems = []
    caption = obj.get("global_caption")
    if "global_caption" not in obj:
        problems.append('missing "global_caption"')
    elif not isinstance(caption, str) or not caption.strip():
        problems.append(f'"global_caption" must be non-empty text, found {_describe(caption)}')
    shots: dict[int, str] = {}
    numbers: list[int] = []
    unknown = []
    for key, value in obj.items():
        if key == "global_caption":
            continue
        m = SHOT_KEY.fullmatch(key)
        if m is None or m.group(1).startswith("0"):  # shots count from 1: no shot0 or shot01
            unknown.append(key)
            continue
        numbers.append(int(m.group(1)))
        if not isinstance(value, str) or not value.strip():
            problems.append(f'"{key}" must be non-empty text, found {_describe(value)}')
        else:
            shots[numbers[-1]] = value
    numbers.sort()
    if unknown:
        problems.append(
            f'unknown keys {", ".join(map(json.dumps, unknown))} (expected "global_caption" and "shot1", "shot2", ...)'
        )
    if not numbers:
        problems.append('no shots: add "shot1": "...", "shot2": "...", ...')
    seen = set(numbers)
    gaps = [f"shot{n}" for n in range(1, max(seen, default=0) + 1) if n not in seen]
    if gaps:
        shown = ", ".join(gaps[:5]) + (f", ... ({len(gaps)} in all)" if len(gaps) > 5 else "")
        problems.append(f"shots must be numbered from 1 without gaps; missing {shown}")
    if problems:
        raise ScriptError(f"{where}: " + "; ".join(problems))
    return Script(str(caption), tuple(shots[n] for n in numbers))


def load_script(path: str | Path) -> Script:
    """Read and validate a script file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"{path}: cannot read the script ({exc})") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScriptError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    return parse_script(obj, str(path))


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string"
    return "null" if value is None else f"a JSON {type(value).__name__} ({json.dumps(value)[:40]})"


# -- the MP4 file -------------------------------------------------------------------------
class MP4Writer:
    """H.264 frames into a progressive MP4 at a constant integer fps, `moov` first.

    Written to `<out>.part` and renamed on `close()`, so a crash never leaves a file that
    looks finished. Frame i has pts i in a 1/fps time base: players and ffprobe see
    exactly the frames written, at exactly `fps`.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: int,
        crf: float = 18.0,
        preset: str = "veryfast",
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.width, self.height, self.fps = width, height, fps
        self._container: Any = av.open(
            str(self.part), "w", format="mp4", options={"movflags": "+faststart"}
        )
        stream: Any = self._container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        ctx = stream.codec_context
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # AVCOL_*_BT709
        ctx.color_range = ColorRange.MPEG
        # veryfast encodes about 150 frames/s at 480x832 on one core, about a tenth of a
        # core per real-time stream (docs/design/media.md §9); crf 18 is visually lossless
        # for this content.
        ctx.options = {"preset": preset, "crf": str(crf)}
        self._stream = stream
        self._reformatter = VideoReformatter()
        self.frames = 0

    def write(self, frames: Any) -> None:
        """Append (n, H, W, 3) uint8 RGB frames (numpy or CPU torch)."""
        array = np.ascontiguousarray(frames.numpy() if hasattr(frames, "numpy") else frames)
        if array.dtype != np.uint8 or array.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 (n, {self.height}, {self.width}, 3), got {array.dtype} {array.shape}"
            )
        for rgb in array:
            frame = self._reformatter.reformat(
                av.VideoFrame.from_ndarray(rgb, format="rgb24"),
                format="yuv420p",
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
            )
            frame.pts = self.frames
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> Path:
        """Flush the encoder, write the index at the front and move the file into place."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        with contextlib.suppress(Exception):  # the encoder may be mid-failure; the file goes
            self._container.close()
        self.part.unlink(missing_ok=True)


# -- generation -----------------------------------------------------------------------------
@dataclass
class GenerateReport:
    """What a run produced and how long each verb took in all."""

    path: Path
    frames: int
    shots: int
    chunks: int
    seconds: float  # wall time of generation and encoding (model loading excluded)
    fps: int
    verb_ms: dict[str, float] = field(default_factory=dict)
    truncated: dict[int, int] = field(default_factory=dict)  # shot (1-based) -> tokens cut
    interrupted: bool = False

    @property
    def video_seconds(self) -> float:
        return self.frames / self.fps

    @property
    def realtime_factor(self) -> float:
        """Video seconds per wall second: >= 1 is faster than real time."""
        return self.video_seconds / self.seconds if self.seconds else 0.0


def generate_video(
    model: LoadedModel,
    script: Script,
    out: str | Path,
    seed: int = 0,
    crf: float = 18.0,
    progress: bool = True,
) -> GenerateReport:
    """Generate every shot of `script` (`model.cfg.chunks_per_shot` chunks each) into `out`.

    Ctrl-C finishes the file with the frames made so far (`report.interrupted`).
    """
    cfg = model.cfg
    pool = StatePool(
        KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    lease = pool.acquire("offline")
    writer = MP4Writer(out, cfg.width, cfg.height, cfg.fps, crf=crf)
    report = GenerateReport(Path(out), 0, 0, 0, 0.0, cfg.fps, dict.fromkeys(VERBS, 0.0))
    t0 = time.perf_counter()
    try:
        gen = ShotStreamGenerator(model, lease, script.global_caption, seed=seed)
        n = len(script.shots)
        for i, text in enumerate(script.shots):
            with tqdm(
                total=cfg.chunks_per_shot,
                desc=f"shot {i + 1}/{n}",
                unit="chunk",
                file=sys.stderr,
                disable=not progress,
                dynamic_ncols=True,
            ) as bar:
                start = gen.start_shot(text)
                _add(report.verb_ms, start.timings)
                if start.truncated_tokens:
                    report.truncated[i + 1] = start.truncated_tokens
                    cut = " (the shot's own text was cut)" if start.shot_text_cut else ""
                    _note(
                        f"shot{i + 1}: caption over {cfg.text.text_len} tokens, {start.truncated_tokens} dropped{cut}",
                        progress,
                    )
                report.shots += 1
                for _ in range(cfg.chunks_per_shot):
                    chunk = gen.next_chunk()
                    writer.write(chunk.frames)
                    _add(report.verb_ms, chunk.timings)
                    report.chunks += 1
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(frames=writer.frames, fps=f"{writer.frames / elapsed:.1f}")
                    bar.update(1)
    except KeyboardInterrupt:
        report.interrupted = True
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.release(lease)
    report.frames = writer.frames
    if report.frames:
        writer.close()
    else:
        writer.abort()
    report.seconds = time.perf_counter() - t0
    return report


def _add(total: dict[str, float], timings: dict[str, float]) -> None:
    for key, ms in timings.items():
        verb = key.removesuffix("_ms")
        total[verb] = total.get(verb, 0.0) + ms


def _note(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


# -- the `shotstream generate` command --------------------------------------------------------
def run_generate(args: Any) -> int:
    """`shotstream generate`: check the script and the weights folder, load, generate, report."""
    import torch

    from model.checkpoints import check_weights
    from model.config import default_preset, get_preset
    from model.generator import load_model
    from model.layout import find_weights
    from model.text import CaptionSpec, PromptTooLong
    from model.weights import WeightsError

    def fail(message: str, code: int = 1) -> int:
        print(f"shotstream generate: error: {message}", file=sys.stderr)
        return code

    torch.set_flush_denormal(True)  # random-weight nets hit denormals on CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        script = load_script(args.script)
    except ScriptError as exc:
        return fail(str(exc), 2)
    preset = args.preset or default_preset(args.weights)
    try:
        cfg = get_preset(preset)
    except KeyError as exc:
        return fail(str(exc.args[0]), 2)
    if args.chunks_per_shot is not None:
        cfg = cfg.replace(chunks_per_shot=args.chunks_per_shot)
    # no --weights: the preset's bundled trained weights (demo), else random ones (tiny)
    weights = args.weights or (str(cfg.bundled_weights_dir) if cfg.bundled_weights else None)
    try:  # before anything heavy: every missing file is named now, not after minutes of loading
        if weights:
            bad = [c for c in check_weights(cfg, find_weights(weights, cfg)) if not c.ok]
            if bad:
                raise WeightsError("; ".join(str(c.error) for c in bad))
        elif not cfg.random_weights_ok:
            raise WeightsError(
                f"preset {cfg.name} needs real weights: pass --weights DIR (fetch them with `shotstream download`)"
            )
    except WeightsError as exc:
        return fail(str(exc))
    out = Path(args.out)
    if not out.parent.is_dir():
        return fail(f"output folder does not exist: {out.parent}", 2)

    frames = len(script.shots) * sum(cfg.chunk_pixel_frames(c) for c in range(cfg.chunks_per_shot))
    print(
        f"preset {cfg.name}: {cfg.width}x{cfg.height} at {cfg.fps} fps; "
        f"{len(script.shots)} shots x {cfg.chunks_per_shot} chunks = {frames} frames "
        f"({frames / cfg.fps:.2f} s)",
        file=sys.stderr,
    )
    if not weights:
        print(
            f"WARNING: RANDOM WEIGHTS (seed {args.seed}): preset {cfg.name} runs without a "
            "checkpoint, so the video is noise. Pass --weights DIR for real output.",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    try:
        model = load_model(
            cfg,
            weights=weights,
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            seed=args.seed,
            prompt_overflow=args.prompt_overflow,
        )
    except (WeightsError, RuntimeError, ValueError) as exc:
        return fail(f"loading the model failed: {exc}")
    print(
        f"loaded in {time.perf_counter() - t0:.1f} s on {model.device} ({model.dtype}), "
        f"weights: {model.weights}, attention: {model.attention_backend}",
        file=sys.stderr,
    )
    for i, text in enumerate(script.shots):  # tokenizing is cheap: refuse before generating
        try:
            model.text.tokenize(CaptionSpec(script.global_caption, i, text))
        except PromptTooLong as exc:
            return fail(
                f"shot{i + 1}: {exc} (use --prompt-overflow truncate or fit, or shorten it)", 2
            )
    report = generate_video(
        model, script, out, seed=args.seed, crf=args.crf, progress=not args.quiet
    )

    if not report.frames:
        return fail("interrupted before the first chunk; no file written", 130)
    verbs = ", ".join(f"{v} {report.verb_ms.get(v, 0.0):.0f}" for v in VERBS)
    state = "INTERRUPTED: kept the frames made so far; " if report.interrupted else ""
    print(
        f"{state}wrote {report.path}: {report.frames} frames ({report.video_seconds:.2f} s "
        f"at {report.fps} fps, H.264 MP4), {report.shots} shots, {report.chunks} chunks, "
        f"in {report.seconds:.1f} s ({report.realtime_factor:.2f}x real time)"
    )
    print(f"time per verb, ms in all: {verbs}")
    if not model.real_weights:
        print("(random weights: the video is noise)")
    return 130 if report.interrupted else 0
