"""The demo's offline tokenizer: whole words of the vocabulary, built in code, shipped as
`tokenizer/tokenizer.json` and loaded by the production loader like umT5's.

Same special ids as umT5 (pad 0, EOS 1, unk 2). The normalizer lower-cases and turns
punctuation into spaces, so case and a trailing full stop cannot change the tokens; the
pre-tokenizer splits the production caption string `G + "shot{i}:" + P` at `shot{i}:`
(digits one by one), so any shot index tokenizes. Words outside the vocabulary are <unk>.

A colour's role is in its token: `{colour} background` and `turns {colour}` are single
tokens (the normalizer joins them with `_`), apart from the bare colour of the object. The
few-step sampler's first step sees only text, and a tiny encoder trained from scratch
learns which colour word is the background (word order) far slower than the DiT learns a
colour from a token of its own: with bare colour words the first step of a 1000-step run
still mixed the two colours up (a grey or swapped background in most training scenes).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from training.vocab import COLOURS, DIRECTIONS, FRAMINGS, SHAPES

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in umT5
WORDS = (
    "a",
    "an",
    "on",
    "background",
    "shot",
    ":",
    "the",
    "moves",
    "stays",
    "still",
    "turns",
    "and",
    *FRAMINGS,
    *DIRECTIONS,
    *COLOURS,
    *SHAPES,
    *"0123456789",
    *(f"{c}_background" for c in COLOURS),
    *(f"turns_{c}" for c in COLOURS),
)
VOCAB_SIZE = 96  # embedding rows: the words above, padded (unused rows are never looked up)


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *dict.fromkeys(WORDS)))}
    if len(vocab) > VOCAB_SIZE:
        raise ValueError(f"{len(vocab)} tokens do not fit VOCAB_SIZE={VOCAB_SIZE}")
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[.,;!?]"), " "),
            normalizers.Replace(Regex(r"\s+background"), "_background"),  # "blue_background"
            normalizers.Replace(Regex(r"turns\s+"), "turns_"),  # "turns_red"
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"shot(?=\d)"), "isolated"),  # "backgroundshot0:"
            pre_tokenizers.Split(":", "isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return tok


def save_tokenizer(folder: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json, loadable by `AutoTokenizer`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder
