"""The umT5 text encoder: golden parity, captions, tokenization policies, cache, strict loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ByT5Tokenizer

from model.config import get_preset
from model.golden import Golden, replay_t5_calls
from model.text import (
    CaptionSpec,
    PromptTooLong,
    TextEncoder,
    build_caption,
    build_umt5,
    clean_caption,
    load_text_encoder,
    load_tokenizer,
    original_t5_key_map,
    original_t5_shapes,
    pad_ids,
    tokenize_caption,
)
from model.weights import WeightsError

torch.set_flush_denormal(True)  # random-weight nets hit denormals on CPU

GOLDEN_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("golden_*.safetensors"))
TINY = get_preset("tiny")
ORIGINAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"

WORDS = [
    "The",
    "old",
    "lighthouse",
    "keeper",
    "walks",
    "her",
    "scruffy",
    "dog",
    "along",
    "the",
    "windy",
    "coast",
    "at",
    "dawn",
    "while",
    "gulls",
    "circle",
    "the",
    "grey",
    "water",
    "and",
    "the",
    "lamp",
    "turns",
    "slowly",
    "above",
    "the",
    "rocks",
]


def long_text(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def tiny_encoder() -> TextEncoder:
    return TextEncoder.random(TINY, seed=0)


# -- golden parity ----------------------------------------------------------------------
@pytest.mark.parametrize("golden_path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_t5_parity(golden_path):
    """Every recorded umT5 call, from its token ids: raw output and zero-padded prompt_embeds."""
    g = Golden(golden_path)
    encoder = TextEncoder.from_original_state(g.cfg, g.weights("t5"))
    checks = list(replay_t5_calls(g, encoder))
    assert len(checks) == 2 * sum(c["kind"] == "t5" for c in g.calls) > 0
    worst = max(c.max_abs for c in checks)
    print(f"t5 max abs {worst:.3g}")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]

    # bf16 (the production dtype) drifts; report it against our own fp32 path
    call = next(c for c in g.calls if c["kind"] == "t5")
    ids, mask = g[call["inputs"]["ids"]], g[call["inputs"]["mask"]]
    bf16 = TextEncoder.from_original_state(g.cfg, g.weights("t5"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    drift = float(
        (bf16.encode_ids(ids, mask)[1].float() - encoder.encode_ids(ids, mask)[1]).abs().max()
    )
    print(f"t5 bf16 drift {drift:.3g}")
    assert drift < 0.25


def test_full_size_key_table_is_the_real_file():
    """The key table at full size gives the 242 names and shapes of the original umT5 file."""
    ref = {}
    for line in (GOLDEN_DIR / "keys_t5.txt").read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ")
            ref[key] = tuple(int(x) for x in shape.strip("[]").split(","))
    ours = original_t5_shapes(get_preset("wan2.1-1.3b").text)
    assert {k: tuple(v) for k, v in ours.items()} == ref


# -- captions -------------------------------------------------------------------------------
def test_clean_caption_examples_from_the_spec():
    assert clean_caption("  A  Cat\n\tsits &amp;amp; waits.  ") == "A Cat sits & waits."
    assert clean_caption("cafÃ© “quoted”") == 'café "quoted"'


def test_build_caption_concatenates_without_separator():
    g = "A keeper and her dog. The video plays at normal speed."
    s = build_caption(g, 0, "a close-up shot of the dog")
    assert (
        s
        == "A keeper and her dog. The video plays at normal speed.shot0:a close-up shot of the dog"
    )
    assert clean_caption(s) == s  # cleaning inserts no space
    assert CaptionSpec(g, 2, "x").text == g + "shot2:x"


# -- tokenization ---------------------------------------------------------------------------
def test_ids_are_pieces_eos_and_padding_like_the_tokenizer_call(byt5):
    for text, limit in (("a short caption", 32), (long_text(20), 32)):
        tc = tokenize_caption(byt5, text, limit)
        ids, mask = pad_ids(tc.ids, limit)
        ref = byt5(text, padding="max_length", max_length=limit, truncation=True)
        assert ids == ref["input_ids"] and mask == ref["attention_mask"]
        pieces = byt5(text, add_special_tokens=False)["input_ids"]
        assert tc.ids[-1] == byt5.eos_token_id == 1
        assert list(tc.ids[:-1]) == pieces[: limit - 1]
        assert tc.truncated_tokens == max(0, len(pieces) + 1 - limit)


def test_umt5_tokenizer_from_the_original_folder(tmp_path):
    """A SentencePiece-style tokenizer in google/umt5-xxl/: same ids = pieces + EOS semantics."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -1.0) for w in ("a", "cat", "sits", "and", "waits")]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.:0123456789▁"]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    T5TokenizerFast(tokenizer_object=tk, extra_ids=0).save_pretrained(tmp_path / "google/umt5-xxl")

    cfg = dataclasses.replace(TINY.text, tokenizer="umt5")
    tok = load_tokenizer(cfg, tmp_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    tc = tokenize_caption(tok, "a  cat sits and waits", 5)
    assert tc.ids == (3, 4, 5, 6, 1) and tc.truncated_tokens == 1 and tc.shot_text_cut
    with pytest.raises(WeightsError, match="no tokenizer"):
        load_tokenizer(cfg, tmp_path / "elsewhere")


def test_overflow_policies(byt5):
    limit = 64
    spec = CaptionSpec(long_text(30), 3, "She climbs the stairs.")
    n_full = len(byt5(clean_caption(spec.text), add_special_tokens=False)["input_ids"]) + 1

    cut = tokenize_caption(byt5, spec, limit, "truncate")  # the reference: the end goes
    assert cut.length == limit and cut.truncated_tokens == n_full - limit
    assert cut.shot_text_cut

    with pytest.raises(PromptTooLong) as err:
        tokenize_caption(byt5, spec, limit, "reject")
    assert isinstance(err.value, ValueError)
    assert (err.value.length, err.value.limit) == (n_full, limit)
    assert f"{n_full} tokens" in str(err.value) and f"{limit} tokens" in str(err.value)

    fit = tokenize_caption(byt5, spec, limit, "fit")  # the global caption gives way
    assert fit.text.endswith("shot3:She climbs the stairs.")
    assert fit.text.startswith(spec.global_caption[:10]) and fit.length <= limit
    assert not fit.shot_text_cut and fit.truncated_tokens >= n_full - limit
    head = fit.text[: fit.text.index("shot3:")]
    assert spec.global_caption.startswith(head) and head.split()[-1] in WORDS  # whole words

    alone = CaptionSpec("Short global.", 1, long_text(40))  # the shot part alone overflows
    fit_alone = tokenize_caption(byt5, alone, limit, "fit")
    assert fit_alone.text.startswith("shot1:") and fit_alone.length == limit
    assert fit_alone.shot_text_cut

    fits = CaptionSpec("A keeper.", 0, "She waits.")
    results = {p: tokenize_caption(byt5, fits, limit, p) for p in ("truncate", "reject", "fit")}
    assert len({r.ids for r in results.values()}) == 1
    assert all(r.truncated_tokens == 0 and not r.shot_text_cut for r in results.values())

    empty_shot = tokenize_caption(byt5, CaptionSpec(long_text(30), 0, ""), limit)
    assert empty_shot.truncated_tokens > 0 and not empty_shot.shot_text_cut
    with pytest.raises(ValueError, match="policy"):
        tokenize_caption(byt5, spec, limit, "drop")


def test_tiny_preset_encodes_a_350_word_caption(tiny_encoder):
    spec = CaptionSpec(long_text(300), 1, long_text(50))
    enc = tiny_encoder.encode([spec])
    assert enc.embeds.shape == (1, TINY.text.text_len, TINY.text.d_model)
    assert enc.lengths == [TINY.text.text_len]
    assert enc.truncated_tokens[0] > 1000 and enc.shot_text_cut == [True]
    fit = tiny_encoder.encode([spec], policy="fit")
    assert fit.shot_text_cut == [True]  # 50 words alone exceed 128 byte tokens


# -- embeddings -----------------------------------------------------------------------------
def test_rows_past_the_length_are_exactly_zero(tiny_encoder, byt5):
    captions = ["a cat", CaptionSpec("A keeper.", 1, "She climbs the stairs.")]
    enc = tiny_encoder.encode(captions)
    for i, n in enumerate(enc.lengths):
        assert torch.count_nonzero(enc.embeds[i, n:]) == 0
        assert bool((enc.embeds[i, :n].abs().sum(-1) > 0).all())
    # encoded at its own length == encoded padded to text_len with a mask, then zeroed
    rows = [pad_ids(tiny_encoder.tokenize(c).ids, TINY.text.text_len) for c in captions]
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    _, padded = tiny_encoder.encode_ids(ids, mask)
    assert torch.allclose(enc.embeds, padded, atol=1e-5, rtol=0)
    assert enc.lengths == mask.sum(1).tolist()


def test_repeated_captions_come_from_the_cache():
    encoder = TextEncoder.random(TINY, seed=1, cache_size=2)
    calls = []
    encoder.model.register_forward_pre_hook(lambda *_: calls.append(1))

    first = encoder.encode(["a cat", "a dog"])
    assert len(calls) == 2 and first.cache_hits == 0
    again = encoder.encode(["  a   cat ", "a cat"])  # same cleaned string
    assert len(calls) == 2 and again.cache_hits == 2
    assert torch.equal(again.embeds[0], first.embeds[0]) and torch.equal(
        again.embeds[1], first.embeds[0]
    )

    encoder.encode(["a bird"])  # evicts the least recently used: "a dog"
    assert len(calls) == 3 and encoder.cached_captions == 2
    encoder.encode(["a cat"])
    assert len(calls) == 3
    encoder.encode(["a dog"])
    assert len(calls) == 4


# -- strict loading, both layouts -----------------------------------------------------------
@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(5)
    return build_umt5(TINY.text).eval()


def _original_sd(model) -> dict[str, torch.Tensor]:
    hf = model.state_dict()
    return {o: hf[t[0]] for o, t in original_t5_key_map(TINY.text.num_layers).items()}


def _same_output(encoder: TextEncoder, model) -> bool:
    ids = torch.tensor([[5, 9, 200, 1, 0, 0]])
    mask = (ids > 0).long()
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return torch.equal(encoder.encode_ids(ids, mask)[0], ref)


def test_load_original_pth(tmp_path, source_model):
    torch.save(_original_sd(source_model), tmp_path / ORIGINAL_FILE)
    encoder = load_text_encoder(TINY, tmp_path)
    assert _same_output(encoder, source_model)
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    assert encoder.model.config._attn_implementation == "eager"
    assert encoder.encode(["a cat"]).embeds.shape == (1, TINY.text.text_len, TINY.text.d_model)


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_original_pth_faults_name_the_key(tmp_path, source_model, fault):
    sd = _original_sd(source_model)
    key = "blocks.1.ffn.gate.0.weight"
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        key = "blocks.7.norm1.weight"
        sd[key] = torch.zeros(TINY.text.d_model)
    else:
        key = "blocks.0.pos_embedding.embedding.weight"
        sd[key] = torch.zeros(16, TINY.text.num_heads)
    torch.save(sd, tmp_path / "t5.pth")
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_text_encoder(TINY, tmp_path / "t5.pth")


def test_wrong_files_are_weights_errors(tmp_path, source_model):
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="readable"):
        load_text_encoder(TINY, tmp_path / "garbage.pth")
    torch.save(source_model.state_dict(), tmp_path / "hf_keys.pth")  # right weights, wrong layout
    with pytest.raises(WeightsError, match="missing keys: blocks.0.attn.k.weight"):
        load_text_encoder(TINY, tmp_path / "hf_keys.pth")
    with pytest.raises(WeightsError, match="no text encoder weights"):
        load_text_encoder(TINY, tmp_path / "empty")


def test_load_hf_folder(tmp_path, source_model):
    source_model.save_pretrained(tmp_path / "text_encoder")
    encoder = load_text_encoder(TINY, tmp_path)  # a repo folder with text_encoder/
    assert _same_output(encoder, source_model)
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight


@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "config"])
def test_hf_folder_faults_name_the_key(tmp_path, source_model, fault):
    folder = tmp_path / "text_encoder"
    source_model.save_pretrained(folder)
    weights = next(folder.glob("*.safetensors"))
    sd = load_file(str(weights))
    key = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        key = "encoder.block.5.layer.0.layer_norm.weight"
        sd[key] = torch.zeros(TINY.text.d_model)
    elif fault == "shape":
        sd[key] = torch.zeros(3, TINY.text.d_model)
    else:
        conf = json.loads((folder / "config.json").read_text())
        conf["d_model"] = 2 * TINY.text.d_model
        (folder / "config.json").write_text(json.dumps(conf))
        key = "d_model"
    save_file(sd, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_text_encoder(TINY, folder)
