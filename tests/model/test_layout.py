"""Weights folders in both published layouts: found, checked from headers, loaded end to
end and generating; every missing or wrong file is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cache.kv import KVLayout
from cache.pool import StatePool
from model.checkpoints import check_weights
from model.config import get_preset
from model.generator import ShotStreamGenerator, load_model
from model.layout import find_weights
from model.weights import WeightsError
from tests.model.tiny_weights import GENERATOR, WAN_FOLDER, random_modules, write_weights

CFG = get_preset("tiny").replace(chunks_per_shot=2)
LAYOUTS = ("original", "diffusers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One weights folder per layout, same weights in both (seed 0)."""
    return {lay: write_weights(tmp_path_factory.mktemp(lay), CFG, lay) for lay in LAYOUTS}


@pytest.fixture
def copy_of(folders, tmp_path):
    """A private copy of a layout's folder, for tests that break it."""

    def make(layout: str):
        return shutil.copytree(folders[layout], tmp_path / layout)

    return make


def _first_chunk(model):
    pool = StatePool(
        KVLayout.for_config(model.cfg), model.vae.new_decoder_state, model.dtype, model.device
    )
    lease = pool.acquire("test")
    try:
        gen = ShotStreamGenerator(model, lease, "a lighthouse on a cliff", seed=5)
        gen.start_shot("waves crash below")
        return gen.next_chunk().frames
    finally:
        pool.release(lease)


def test_both_layouts_load_the_written_weights_and_generate_the_same_video(folders):
    dit, vae, t5 = random_modules(CFG, seed=0)
    frames = {}
    for layout in LAYOUTS:
        assert find_weights(folders[layout], CFG).kind == layout
        model = load_model(CFG, weights=folders[layout])
        assert model.real_weights and model.weights == str(folders[layout])
        for ours, theirs in ((model.dit, dit), (model.vae.model, vae), (model.text.model, t5)):
            got = ours.state_dict()
            assert all(torch.equal(got[k], v) for k, v in theirs.state_dict().items())
        frames[layout] = _first_chunk(model)
    assert frames["original"].shape == (9, CFG.height, CFG.width, 3)
    assert torch.equal(frames["original"], frames["diffusers"])
    # and the weights matter: random weights of another seed give another video
    assert not torch.equal(frames["original"], _first_chunk(load_model(CFG, seed=1)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_header_check_passes_on_whole_folders(folders, layout):
    checks = check_weights(CFG, find_weights(folders[layout], CFG))
    assert [c.component for c in checks] == ["generator", "vae", "text encoder"]
    assert all(c.ok for c in checks), [c.error for c in checks]
    assert all(c.tensors > 0 and c.nbytes > 0 for c in checks)


@pytest.mark.parametrize(
    ("layout", "remove", "named"),
    [
        ("original", GENERATOR, "shotstream_merged.pt"),
        (
            "original",
            f"{WAN_FOLDER['original']}/models_t5_umt5-xxl-enc-bf16.pth",
            "models_t5_umt5-xxl-enc-bf16.pth",
        ),
        ("original", f"{WAN_FOLDER['original']}/Wan2.1_VAE.pth", "Wan2.1_VAE.pth"),
        (
            "diffusers",
            f"{WAN_FOLDER['diffusers']}/text_encoder/config.json",
            "text_encoder/config.json",
        ),
        ("diffusers", f"{WAN_FOLDER['diffusers']}/vae", "vae/config.json"),
    ],
)
def test_missing_files_are_named_before_loading(copy_of, layout, remove, named):
    root = copy_of(layout)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError, match="missing") as err:
        find_weights(root, CFG)
    assert named in str(err.value)
    with pytest.raises(WeightsError, match=named.split("/")[0]):
        load_model(CFG, weights=root)


def test_a_vae_file_under_the_text_encoder_name_is_named(copy_of):
    root = copy_of("original")
    base = root / WAN_FOLDER["original"]
    shutil.copy(base / "Wan2.1_VAE.pth", base / "models_t5_umt5-xxl-enc-bf16.pth")
    checks = {c.component: c for c in check_weights(CFG, find_weights(root, CFG))}
    assert checks["generator"].ok and checks["vae"].ok
    bad = checks["text encoder"]
    assert not bad.ok and "models_t5_umt5-xxl-enc-bf16.pth" in bad.error
    assert "missing keys: blocks.0." in bad.error and "unexpected keys: conv1" in bad.error
    with pytest.raises(WeightsError, match="models_t5_umt5-xxl-enc-bf16.pth.*missing keys"):
        load_model(CFG, weights=root)


def test_a_truncated_checkpoint_is_named(copy_of):
    root = copy_of("original")
    data = (root / GENERATOR).read_bytes()
    (root / GENERATOR).write_bytes(data[: len(data) // 2])  # an interrupted copy
    checks = {c.component: c for c in check_weights(CFG, find_weights(root, CFG))}
    assert (
        not checks["generator"].ok
        and "not a readable torch checkpoint" in checks["generator"].error
    )
    assert checks["vae"].ok and checks["text encoder"].ok


def test_a_checkpoint_of_another_size_is_named(tmp_path):
    other = CFG.replace(dit=CFG.dit.__class__(**{**CFG.dit.__dict__, "num_layers": 3}))
    write_weights(tmp_path, other, "original")
    checks = {c.component: c for c in check_weights(CFG, find_weights(tmp_path, CFG))}
    assert not checks["generator"].ok and "unexpected keys: blocks.2." in checks["generator"].error


def test_diffusers_missing_shard_and_wrong_config_are_named(copy_of):
    root = copy_of("diffusers")
    base = root / WAN_FOLDER["diffusers"]
    _, _, t5 = random_modules(CFG)
    shutil.rmtree(base / "text_encoder")
    t5.save_pretrained(base / "text_encoder", max_shard_size="40KB")
    shards = sorted((base / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    conf = json.loads((base / "vae" / "config.json").read_text())
    (base / "vae" / "config.json").write_text(json.dumps({**conf, "base_dim": 16}))
    checks = {c.component: c for c in check_weights(CFG, find_weights(root, CFG))}
    assert "base_dim=16" in checks["vae"].error
    assert f"missing shards {shards[1].name}" in checks["text encoder"].error
    assert checks["generator"].ok
