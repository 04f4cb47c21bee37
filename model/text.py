"""The umT5 text encoder on transformers' `UMT5EncoderModel`, with caption building,
tokenization with an explicit overflow policy, and a per-caption embedding cache
(docs/design/vae-and-text.md §8–§11, docs/design/generator.md §6).

The conditioning of one caption is always `(text_len, d_model)`: the encoder output for
its real tokens (EOS included) and exact zeros after them. The DiT attends to every row,
so both the zero rows and their count matter.
"""

from __future__ import annotations

import html
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftfy
import torch
from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from model.config import ModelConfig, TextConfig
from model.weights import WeightsError, check_state_dict, read_state_dict, safetensors_shapes

ORIGINAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"  # the original Wan2.1 release
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"
HF_SUBFOLDER = "text_encoder"  # the Wan2.1-T2V-1.3B-Diffusers release
HF_TOKENIZER_SUBFOLDER = "tokenizer"
OVERFLOW_POLICIES = ("truncate", "reject", "fit")


# -- captions ---------------------------------------------------------------------------
def clean_caption(text: str) -> str:
    """The reference's 'whitespace' cleaning: fix mojibake, unescape HTML twice, collapse
    whitespace. No lower-casing, no punctuation removal."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def build_caption(global_caption: str, shot_index: int, shot_text: str) -> str:
    """Caption of shot i (0-based): G + "shot{i}:" + P_i, with no separator."""
    return f"{global_caption}shot{shot_index}:{shot_text}"


@dataclass(frozen=True)
class CaptionSpec:
    """One shot's caption in parts, so the `fit` policy knows which part it may shorten."""

    global_caption: str
    shot_index: int
    shot_text: str

    @property
    def text(self) -> str:
        return build_caption(self.global_caption, self.shot_index, self.shot_text)


class PromptTooLong(ValueError):
    """A caption longer than the encoder's token limit, under the `reject` policy."""

    def __init__(self, length: int, limit: int) -> None:
        self.length, self.limit = length, limit
        super().__init__(
            f"prompt is {length} tokens (end token included) but the limit is {limit} tokens"
        )


# -- tokenization -------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedCaption:
    """Token ids of one caption: pieces then EOS, unpadded (`len(ids)` is its real length)."""

    text: str  # the cleaned string that was tokenized (shortened under `fit`)
    ids: tuple[int, ...]
    truncated_tokens: int  # tokens of the full caption that are not encoded
    shot_text_cut: bool  # whether any of the shot's own text was dropped

    @property
    def length(self) -> int:
        return len(self.ids)


def load_tokenizer(cfg: TextConfig, path: str | Path | None = None) -> Any:
    """The tokenizer named by `cfg.tokenizer`: "byt5" needs no files; "umt5" is the
    google/umt5-xxl tokenizer from `path` (itself, or its `tokenizer/` or
    `google/umt5-xxl/` folder); "recorded" has none (golden replays feed token ids)."""
    if cfg.tokenizer == "byt5":
        return ByT5Tokenizer()
    if cfg.tokenizer == "recorded":
        return None
    if cfg.tokenizer != "umt5":
        raise ValueError(f"unknown tokenizer {cfg.tokenizer!r}")
    if path is None:
        raise WeightsError("the umt5 tokenizer needs its folder (google/umt5-xxl or tokenizer/)")
    path = Path(path)
    for folder in (path, path / HF_TOKENIZER_SUBFOLDER, path / ORIGINAL_TOKENIZER_DIR):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(folder))
            if tok.eos_token_id is None or tok.pad_token_id is None:
                raise WeightsError(f"{folder}: tokenizer has no EOS or pad token")
            return tok
    raise WeightsError(
        f"no tokenizer in {path}: expected tokenizer files there or in "
        f"{HF_TOKENIZER_SUBFOLDER}/ or {ORIGINAL_TOKENIZER_DIR}/"
    )


def _pieces(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: captions over the tokenizer's nominal max length are expected here
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def tokenize_caption(
    tokenizer: Any, caption: CaptionSpec | str, text_len: int, policy: str = "truncate"
) -> TokenizedCaption:
    """Clean and tokenize one caption: ids = pieces + [EOS], at most `text_len` long.

    truncate: keep the first text_len-1 pieces (the reference; cuts the shot text).
    reject:   raise PromptTooLong when the caption does not fit.
    fit:      shorten the global caption so "shot{i}:" + shot text survives; cut the end
              only if the shot part alone does not fit. Plain strings behave as truncate.
    """
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"unknown overflow policy {policy!r}; one of {OVERFLOW_POLICIES}")
    eos = tokenizer.eos_token_id
    spec = caption if isinstance(caption, CaptionSpec) else None
    text = clean_caption(caption.text if isinstance(caption, CaptionSpec) else caption)
    pieces = _pieces(tokenizer, text)
    full = len(pieces) + 1
    has_shot_text = spec is None or bool(clean_caption(spec.shot_text))
    if full <= text_len:
        return TokenizedCaption(text, (*pieces, eos), 0, False)
    if policy == "reject":
        raise PromptTooLong(full, text_len)
    if policy == "fit" and spec is not None:
        text, pieces, shot_cut = _fit_global(tokenizer, spec, text_len)
        return TokenizedCaption(text, (*pieces, eos), max(0, full - len(pieces) - 1), shot_cut)
    kept = pieces[: text_len - 1]
    return TokenizedCaption(text, (*kept, eos), full - text_len, has_shot_text)


def _fit_global(tokenizer: Any, spec: CaptionSpec, text_len: int) -> tuple[str, list[int], bool]:
    """Longest cut of the global caption (at a word boundary where it has one) for which
    the whole caption fits; (text, pieces, shot text cut)."""
    g = clean_caption(spec.global_caption)
    tail = build_caption("", spec.shot_index, spec.shot_text)

    def candidate(n: int) -> tuple[str, list[int]]:
        text = clean_caption(g[:n].rstrip() + tail)
        return text, _pieces(tokenizer, text)

    text, pieces = candidate(0)
    if len(pieces) + 1 > text_len:  # the shot part alone overflows: cut its end
        return text, pieces[: text_len - 1], bool(clean_caption(spec.shot_text))
    lo, hi = 0, len(g)  # candidate(lo) fits; the full global caption does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(candidate(mid)[1]) + 1 <= text_len:
            lo = mid
        else:
            hi = mid
    n = lo
    if n < len(g) and g[n] != " " and g.rfind(" ", 0, n) > 0:
        n = g.rfind(" ", 0, n)  # do not end the global caption in the middle of a word
    text, pieces = candidate(n)
    if len(pieces) + 1 > text_len:  # tokenizers need not be monotonic in the cut
        text, pieces = candidate(lo)
    return text, pieces, False


def pad_ids(ids: Sequence[int], text_len: int, pad_id: int = 0) -> tuple[list[int], list[int]]:
    """Right-pad to `text_len`: (ids, mask), the mask 1 on real tokens (EOS included)."""
    n = len(ids)
    return list(ids) + [pad_id] * (text_len - n), [1] * n + [0] * (text_len - n)


# -- the encoder ----------------------------------------------------------------------------
def umt5_config(cfg: TextConfig, attn_implementation: str = "eager") -> UMT5Config:
    """The UMT5Config of a TextConfig, built in code (no hub access)."""
    conf = UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    # UMT5EncoderModel(config) takes no attn_implementation keyword (transformers 5):
    # eager matches the reference to 0.0, SDPA to ~2e-6.
    conf._attn_implementation = attn_implementation
    return conf


def original_t5_key_map(num_layers: int) -> dict[str, tuple[str, ...]]:
    """Original `models_t5_umt5-xxl-enc-bf16.pth` key -> UMT5EncoderModel key(s)
    (docs/design/vae-and-text.md §8)."""
    table: dict[str, tuple[str, ...]] = {
        "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),  # tied
        "norm.weight": ("encoder.final_layer_norm.weight",),
    }
    per_block = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    for i in range(num_layers):
        for ours, theirs in per_block.items():
            table[f"blocks.{i}.{ours}"] = (f"encoder.block.{i}.{theirs}",)
    return table


def build_umt5(cfg: TextConfig, meta: bool = False, attn: str = "eager") -> UMT5EncoderModel:
    """A UMT5EncoderModel sized by `cfg`, random or on the meta device."""
    if meta:
        with torch.device("meta"):
            return UMT5EncoderModel(umt5_config(cfg, attn))
    return UMT5EncoderModel(umt5_config(cfg, attn))


def original_t5_shapes(cfg: TextConfig) -> dict[str, torch.Size]:
    """Names and shapes of the original-layout state dict for `cfg`."""
    ours = build_umt5(cfg, meta=True).state_dict()
    table = original_t5_key_map(cfg.num_layers)
    mapped = {hf for targets in table.values() for hf in targets}
    if mapped != set(ours):  # the table must cover the model exactly, both ways
        raise WeightsError(
            f"T5 key table out of step with transformers: {sorted(mapped ^ set(ours))}"
        )
    return {orig: ours[targets[0]].shape for orig, targets in table.items()}


def _text_cfg(cfg: TextConfig | ModelConfig) -> TextConfig:
    return cfg.text if isinstance(cfg, ModelConfig) else cfg


@dataclass
class TextEncoding:
    """Embeddings of a list of captions, with what tokenization had to drop."""

    embeds: torch.Tensor  # (N, text_len, d_model); rows at/after lengths[n] are exactly 0
    lengths: list[int]  # real tokens per caption, EOS included
    truncated_tokens: list[int]
    shot_text_cut: list[bool]
    texts: list[str]  # the cleaned strings that were encoded
    cache_hits: int = 0


class TextEncoder:
    """umT5 encoder + tokenizer, padding to `text_len`, with an LRU of caption embeddings."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: Any,
        cfg: TextConfig | ModelConfig,
        policy: str = "truncate",
        cache_size: int = 64,
    ) -> None:
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"unknown overflow policy {policy!r}; one of {OVERFLOW_POLICIES}")
        self.cfg = _text_cfg(cfg)
        self.text_len = self.cfg.text_len
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.policy = policy
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache_size = cache_size
        # key -> (rows (L, d_model) on the model's device, TokenizedCaption)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, TokenizedCaption]] = OrderedDict()
        self._lock = threading.Lock()  # encodes may run in a worker thread

    # -- constructors -------------------------------------------------------------
    @classmethod
    def random(
        cls,
        cfg: TextConfig | ModelConfig,
        seed: int = 0,
        device="cpu",
        dtype=torch.float32,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> TextEncoder:
        """Random weights (tests, demos); the tokenizer defaults to the config's file-less one."""
        cfg = _text_cfg(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_umt5(cfg)
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        return cls(model.to(device=device, dtype=dtype), tok, cfg, **kwargs)

    @classmethod
    def from_original_state(
        cls,
        cfg: TextConfig | ModelConfig,
        sd: Mapping[str, torch.Tensor],
        tokenizer: Any = None,
        device="cpu",
        dtype=torch.float32,
        what: str = "text encoder",
        **kwargs: Any,
    ) -> TextEncoder:
        """Load an original-layout state dict strictly through the explicit key table."""
        cfg = _text_cfg(cfg)
        check_state_dict(original_t5_shapes(cfg), sd, what)
        tensors = {}
        for orig, targets in original_t5_key_map(cfg.num_layers).items():
            t = sd[orig].to(device=device, dtype=dtype)
            tensors.update({hf: t for hf in targets})
        model = build_umt5(cfg, meta=True)
        model.load_state_dict(tensors, strict=True, assign=True)
        model.encoder.embed_tokens = model.shared  # keep the tie after `assign`
        return cls(model, tokenizer, cfg, **kwargs)

    @classmethod
    def from_original(
        cls,
        cfg: TextConfig | ModelConfig,
        path: str | Path,
        tokenizer: Any = None,
        device="cpu",
        dtype=torch.float32,
        **kwargs: Any,
    ) -> TextEncoder:
        """Load `models_t5_umt5-xxl-enc-bf16.pth` (or a safetensors file with its keys)."""
        sd = read_state_dict(path)
        return cls.from_original_state(cfg, sd, tokenizer, device, dtype, str(path), **kwargs)

    @classmethod
    def from_hf(
        cls,
        cfg: TextConfig | ModelConfig,
        folder: str | Path,
        tokenizer: Any = None,
        device="cpu",
        dtype=torch.float32,
        attn: str = "eager",
        **kwargs: Any,
    ) -> TextEncoder:
        """Load a Hugging Face folder (`config.json` + safetensors shards), strictly."""
        cfg = _text_cfg(cfg)
        folder = Path(folder)
        if (folder / HF_SUBFOLDER / "config.json").is_file():
            folder = folder / HF_SUBFOLDER
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise WeightsError(f"{folder}: no config.json of a UMT5 encoder")
        _check_hf_config(cfg, json.loads(config_file.read_text()), str(config_file))
        # Check names and shapes from the file headers first, so every problem is named.
        expected = {k: v.shape for k, v in build_umt5(cfg, meta=True).state_dict().items()}
        got = safetensors_shapes(folder)
        tied = ("shared.weight", "encoder.embed_tokens.weight")
        for a, b in (tied, tied[::-1]):
            if a in got and b not in got:
                got[b] = got[a]
        check_state_dict(
            expected, {k: torch.empty(s, device="meta") for k, s in got.items()}, str(folder)
        )
        model, info = UMT5EncoderModel.from_pretrained(  # type: ignore[misc]
            str(folder), dtype=dtype, attn_implementation=attn, output_loading_info=True
        )
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise WeightsError(f"{folder}: {info}")
        return cls(model.to(device=device), tokenizer, cfg, **kwargs)

    # -- encoding -----------------------------------------------------------------
    @torch.inference_mode()
    def encode_ids(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (N, T) -> (raw encoder output, output with rows past the
        real length set to 0), both (N, T, d_model)."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        raw = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1, keepdim=True)
        keep = torch.arange(ids.shape[1], device=self.device)[None] < lengths
        return raw, torch.where(
            keep[..., None], raw, torch.zeros((), dtype=raw.dtype, device=raw.device)
        )

    def tokenize(self, caption: CaptionSpec | str, policy: str | None = None) -> TokenizedCaption:
        """Clean and tokenize one caption under `policy` (default: the encoder's)."""
        if self.tokenizer is None:
            raise RuntimeError("this text encoder has no tokenizer (recorded token ids only)")
        return tokenize_caption(self.tokenizer, caption, self.text_len, policy or self.policy)

    def _key(self, caption: CaptionSpec | str, policy: str) -> tuple:
        # The shot text is part of the key because `fit` needs to know where it starts.
        if isinstance(caption, CaptionSpec):
            return (clean_caption(caption.text), policy, clean_caption(caption.shot_text))
        return (clean_caption(caption), policy, None)

    @torch.inference_mode()
    def _encode_one(self, tc: TokenizedCaption) -> torch.Tensor:
        # Each caption at its own length, unpadded: its rows then do not depend on which
        # other captions shared the call (padded to text_len they differ by ~2e-6).
        ids = torch.tensor([tc.ids], device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return out[0].clone()

    def encode(
        self, captions: Sequence[CaptionSpec | str], policy: str | None = None
    ) -> TextEncoding:
        """Embeddings (N, text_len, d_model) of `captions`, re-using cached ones."""
        policy = policy or self.policy
        n = len(captions)
        embeds = torch.zeros(
            n, self.text_len, self.cfg.d_model, device=self.device, dtype=self.dtype
        )
        enc = TextEncoding(embeds, [], [], [], [])
        for i, caption in enumerate(captions):
            key = self._key(caption, policy)
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    enc.cache_hits += 1
            if hit is None:
                tc = self.tokenize(caption, policy)  # may raise PromptTooLong
                hit = (self._encode_one(tc), tc)
                with self._lock:
                    self._cache[key] = hit
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            rows, tc = hit
            embeds[i, : tc.length] = rows
            enc.lengths.append(tc.length)
            enc.truncated_tokens.append(tc.truncated_tokens)
            enc.shot_text_cut.append(tc.shot_text_cut)
            enc.texts.append(tc.text)
        return enc

    @property
    def cached_captions(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def _check_hf_config(cfg: TextConfig, conf: dict, where: str) -> None:
    """Refuse a config.json whose sizes differ from the preset we were asked for."""
    want = {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.num_buckets,
        "relative_attention_max_distance": cfg.max_distance,
    }
    for key, value in want.items():
        if key in conf and conf[key] != value:
            raise WeightsError(f"{where}: {key}={conf[key]} but the preset has {value}")
    if conf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise WeightsError(
            f"{where}: feed_forward_proj={conf['feed_forward_proj']}, not gated-gelu"
        )


def load_text_encoder(
    cfg: TextConfig | ModelConfig,
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    device="cpu",
    dtype=torch.float32,
    **kwargs: Any,
) -> TextEncoder:
    """Load encoder and tokenizer from either layout, detected from the files present.

    `path` may be the original `.pth` file or the folder holding it (tokenizer in
    `google/umt5-xxl/`), or a Diffusers repo / `text_encoder/` folder (tokenizer in
    `tokenizer/`). `tokenizer_path` overrides where the tokenizer is looked for.
    """
    cfg = _text_cfg(cfg)
    path = Path(path)
    root = path.parent if path.is_file() or path.name == HF_SUBFOLDER else path
    tokenizer = load_tokenizer(cfg, tokenizer_path or root)
    if path.is_file():
        return TextEncoder.from_original(cfg, path, tokenizer, device, dtype, **kwargs)
    if (path / ORIGINAL_FILE).is_file():
        return TextEncoder.from_original(
            cfg, path / ORIGINAL_FILE, tokenizer, device, dtype, **kwargs
        )
    if (path / "config.json").is_file() or (path / HF_SUBFOLDER / "config.json").is_file():
        return TextEncoder.from_hf(cfg, path, tokenizer, device, dtype, **kwargs)
    raise WeightsError(
        f"no text encoder weights in {path}: expected {ORIGINAL_FILE} or a {HF_SUBFOLDER}/ folder"
    )
