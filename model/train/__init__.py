"""Training and evaluation of the bundled `demo` model, out of the serving path.

    vocab      the fixed demo vocabulary: palette, shapes, captions and a tolerant parser
    render     procedural multi-shot clips (exact palette, framing, motion, colour turns)
    probe      pixel analysis of frames: background/object colour, shape, motion direction
    tokenizer  the word-level offline tokenizer shipped with the demo weights
    vae_train  the tiny Wan VAE, trained on rendered frames and clips
    dit_train  the causal student (+ umT5 encoder), teacher-forced flow matching
    start_train  the object placed where a shot's first noise says, kept by later steps and chunks
    evaluate   prompt adherence and consistency of the production generator, from pixels
    run        `shotstream train-demo` / `eval-demo`: phases, checkpoints, resume, export

The server never imports this package.
"""
