"""Strict loading of the generator from the published checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model.config import PRESETS, get_preset
from model.dit import build_dit
from model.weights import WeightsError, load_generator


def _reference_keys(golden_dir):
    out = {}
    for line in (golden_dir / "keys_generator.txt").read_text().splitlines():
        if line.strip():
            name, shape = line.split(" ")
            out[name] = tuple(int(x) for x in shape.strip("[]").split(","))
    return out


def test_real_preset_has_exactly_the_checkpoint_keys(golden_dir):
    """The wan2.1-1.3b preset built on the meta device: the 825 names and shapes of the checkpoint."""
    model = build_dit(PRESETS["wan2.1-1.3b"], meta=True)
    ours = {"model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = _reference_keys(golden_dir)
    assert len(ref) == 825
    assert ours == ref
    assert sum(v.numel() for v in model.state_dict().values()) == 1_418_996_800


@pytest.fixture
def tiny_sd():
    torch.manual_seed(0)
    return build_dit(get_preset("tiny")).state_dict()


def test_loads_shotstream_pt_checkpoint(tmp_path, tiny_sd):
    path = tmp_path / "shotstream_merged.pt"
    torch.save({"generator": {"model." + k: v for k, v in tiny_sd.items()}}, path)
    model = load_generator(get_preset("tiny"), path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_sd[k]), k


@pytest.mark.parametrize("prefixed", [True, False])
def test_loads_safetensors_with_or_without_prefix(tmp_path, tiny_sd, prefixed):
    path = tmp_path / "generator.safetensors"
    save_file(
        {("model." if prefixed else "") + k: v.contiguous() for k, v in tiny_sd.items()}, str(path)
    )
    model = load_generator(get_preset("tiny"), path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope.t_angles.dtype == torch.float64  # RoPE tables stay float64
    w = "blocks.1.ffn.2.weight"
    assert torch.equal(model.state_dict()[w], tiny_sd[w].to(torch.bfloat16))


def _save_pt(path, sd):
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, path)


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (
            lambda sd: sd.pop("blocks.0.self_attn.norm_q.weight"),
            "missing keys: blocks.0.self_attn.norm_q.weight",
        ),
        (
            lambda sd: sd.__setitem__("blocks.0.extra", torch.zeros(1)),
            "unexpected keys: blocks.0.extra",
        ),
        (
            lambda sd: sd.__setitem__("head.head.weight", torch.zeros(3, 64)),
            "wrong shape keys: head.head.weight: file (3, 64)",
        ),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_strict_errors_name_the_key(tmp_path, tiny_sd, mutate, expect):
    sd = dict(tiny_sd)
    mutate(sd)
    path = tmp_path / "bad.pt"
    _save_pt(path, sd)
    with pytest.raises(WeightsError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        load_generator(get_preset("tiny"), path)


def test_wrong_preset_for_the_file_is_refused(tmp_path, tiny_sd):
    path = tmp_path / "tiny.pt"
    _save_pt(path, tiny_sd)
    with pytest.raises(WeightsError, match="wrong shape"):
        load_generator(
            get_preset("tiny").replace(
                dit=get_preset("tiny").dit.__class__(
                    num_layers=2, dim=128, num_heads=2, ffn_dim=128, text_dim=32, freq_dim=32
                )
            ),
            path,
        )


def test_clear_errors_for_wrong_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_generator(get_preset("tiny"), tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_generator(get_preset("tiny"), junk)
    other = tmp_path / "vae.pt"
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(
        WeightsError, match="expected a ShotStream checkpoint with a 'generator' entry"
    ):
        load_generator(get_preset("tiny"), other)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_generator(get_preset("tiny"), bad_st)


def test_mixed_prefixes_refused(tmp_path, tiny_sd):
    sd = {
        ("model." + k if i % 2 else k): v.contiguous() for i, (k, v) in enumerate(tiny_sd.items())
    }
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match="some keys carry the prefix"):
        load_generator(get_preset("tiny"), path)
