"""Training and evaluation of the bundled `demo` model, beside `model/`, out of the serving path.

    vocab      the fixed demo vocabulary: palette, shapes, captions and a tolerant parser
    render     procedural multi-shot clips (exact palette, framing, motion, colour turns)
    probe      pixel analysis of frames: background/object colour, shape, motion direction
    tokenizer  the word-level offline tokenizer shipped with the demo weights
    teacher_forcing  the cached inference as one uncached forward (its mask and flow)
    vae_train  the tiny Wan VAE, trained on rendered frames and clips
    dit_train  the causal student (+ umT5 encoder), teacher-forced flow matching
    start_train  the object placed where a shot's first noise says, kept by later steps and chunks
    evaluate   prompt adherence and consistency of the production generator, from pixels
    run        `shotstream train-demo` / `eval-demo`: phases, checkpoints, resume, export
    strip      the README's picture of one stream (`python -m training.strip`)

It imports `model` and `cache`; nothing of `model`, `cache` or `server` imports it, except
the CLI's `train-demo` and `eval-demo` commands, lazily (tests/test_layering.py checks).
"""
