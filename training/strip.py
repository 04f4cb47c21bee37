"""The README's image strip: one multi-shot stream of the demo model, with its prompts.

    python -m training.strip --out docs/demo-strip.png

Runs the production generator exactly as a server session does (global caption, then each
shot prompt sent mid-stream, cutting the running shot after a few chunks), and draws one
row per shot: a frame from every chunk, the shot's prompt under it. Frames are the
generator's uint8 output at the preset's size, enlarged without smoothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cache.kv import KVLayout
from cache.pool import StatePool
from model.config import get_preset
from model.generator import ShotStreamGenerator, load_model

GLOBAL = "a magenta triangle on a gray background"
SHOTS = (
    ("wide shot, the triangle moves right", 3),
    ("close-up shot, the triangle stays still", 2),
    ("wide shot, the triangle turns cyan and moves up", 3),
    ("close-up shot, the triangle moves left", 3),
)


def generate_rows(weights: str | None, seed: int) -> list[tuple[str, list[torch.Tensor]]]:
    """(prompt, one frame per chunk) for every shot of the scripted stream."""
    cfg = get_preset("demo")
    model = load_model(cfg, weights, device="cpu")
    pool = StatePool(
        KVLayout.for_config(cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    lease = pool.acquire("strip")
    try:
        gen = ShotStreamGenerator(model, lease, GLOBAL, seed=seed)
        rows = []
        for text, chunks in SHOTS:
            gen.start_shot(text)
            frames = []
            for _ in range(chunks):
                out = gen.next_chunk().frames  # (T, H, W, 3) uint8
                frames.append(torch.as_tensor(out[len(out) // 2]))
            rows.append((text, frames))
        return rows
    finally:
        pool.release(lease)


def draw_strip(rows: list[tuple[str, list[torch.Tensor]]], scale: int = 2) -> Image.Image:
    h, w = rows[0][1][0].shape[:2]
    cell_w, cell_h, gap, label = w * scale, h * scale, 4, 16
    cols = max(len(f) for _, f in rows)
    header = 20
    img = Image.new(
        "RGB",
        (cols * (cell_w + gap) + gap, header + len(rows) * (cell_h + label + gap) + gap),
        "white",
    )
    draw = ImageDraw.Draw(img)
    draw.text((gap, 4), f"global caption: {GLOBAL}", fill="black")
    y = header
    for i, (text, frames) in enumerate(rows):
        for j, f in enumerate(frames):
            tile = Image.fromarray(f.numpy()).resize((cell_w, cell_h), Image.NEAREST)
            img.paste(tile, (gap + j * (cell_w + gap), y))
        draw.text((gap, y + cell_h + 2), f"shot {i + 1}: {text}", fill="black")
        y += cell_h + label + gap
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/demo-strip.png")
    p.add_argument("--weights", default=None, help="default: the bundled demo weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    img = draw_strip(generate_rows(args.weights, args.seed))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({img.width}x{img.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
