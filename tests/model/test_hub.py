"""`shotstream download` and `check-weights`, with only the hub's network call replaced:
files land where `find_weights` looks, in both layouts; runs resume and skip."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.file_download import DryRunFileInfo
from huggingface_hub.utils import filter_repo_objects

from model.config import get_preset
from model.hub import RECORD
from model.layout import find_weights
from server.cli import main
from tests.model.tiny_weights import GENERATOR, WAN_FOLDER, write_weights

TINY = get_preset("tiny")
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _hub_repos(tmp: Path) -> dict[str, dict[str, bytes]]:
    """The three repos as name -> bytes: tiny real weights, plus files we must not fetch."""
    write_weights(tmp, TINY, "original")
    write_weights(tmp, TINY, "diffusers")
    orig, diff = tmp / WAN_FOLDER["original"], tmp / WAN_FOLDER["diffusers"]
    return {
        "KlingTeam/ShotStream": {
            "shotstream_merged.pt": (tmp / GENERATOR).read_bytes(),
            "shotstream.yaml": b"generator_ckpt: shotstream_merged.pt\n",
            "default_config.yaml": b"num_frame_per_block: 3\n",
            "README.md": b"# ShotStream\n",
            "assets/demo.mp4": b"\x00" * 100,
        },
        "Wan-AI/Wan2.1-T2V-1.3B": {
            "Wan2.1_VAE.pth": (orig / "Wan2.1_VAE.pth").read_bytes(),
            "models_t5_umt5-xxl-enc-bf16.pth": (
                orig / "models_t5_umt5-xxl-enc-bf16.pth"
            ).read_bytes(),
            **{f"google/umt5-xxl/{n}": b"{}" for n in TOKENIZER_FILES},
            "diffusion_pytorch_model.safetensors": b"the 5.7 GB base DiT we do not need",
            "config.json": b"{}",
            "README.md": b"# Wan\n",
        },
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": {
            **{str(p.relative_to(diff)): p.read_bytes() for p in diff.rglob("*") if p.is_file()},
            **{f"tokenizer/{n}": b"{}" for n in TOKENIZER_FILES},
            "transformer/diffusion_pytorch_model.safetensors": b"not needed",
            "model_index.json": b"{}",
        },
    }


class FakeHub:
    """`huggingface_hub.snapshot_download` over in-memory repos, filtering with the hub's
    own pattern matcher. Like the hub, it keeps a file already in `local_dir` (it trusts
    its metadata, not the file's size). `fail` makes the named repo's download drop
    half-way."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.calls: list[tuple[str, bool]] = []
        self.tokens: list[str | None] = []
        self.fail: str | None = None

    def snapshot_download(
        self, repo_id, *, allow_patterns=None, local_dir=None, token=None, dry_run=False, **kwargs
    ):
        self.calls.append((repo_id, dry_run))
        self.tokens.append(token)
        files = self.repos[repo_id]
        names = list(filter_repo_objects(files, allow_patterns=allow_patterns))
        local = Path(local_dir)
        if dry_run:
            return [
                DryRunFileInfo(
                    commit_hash="c0ffee",
                    file_size=len(files[n]),
                    filename=n,
                    local_path=str(local / n),
                    is_cached=(local / n).is_file(),
                    will_download=not (local / n).is_file(),
                )
                for n in names
            ]
        for i, name in enumerate(names):
            if self.fail == repo_id and i == len(names) // 2:
                raise ConnectionError("connection reset by peer")
            if (local / name).is_file():  # like the hub: a file it fetched before is kept
                continue
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(files[name])
        return str(local)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return _hub_repos(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def hub(repos, monkeypatch):
    fake = FakeHub(repos)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def _download(root: Path, layout: str, *extra: str) -> int:
    return main(["download", "--dir", str(root), "--layout", layout, "--preset", "tiny", *extra])


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_download_lands_in_the_layout_find_weights_accepts(tmp_path, hub, capsys, layout):
    root = tmp_path / "weights"
    assert _download(root, layout, "--token", "hf_test") == 0
    out = capsys.readouterr().out
    assert f"{layout} layout" in out and out.count("  ok ") == 3
    wan = WAN_FOLDER[layout]
    # only the files we asked for: no base DiT, no demo assets, no READMEs
    got = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    got = {p for p in got if not p.endswith(RECORD)}
    expected = {
        "ShotStream/shotstream_merged.pt",
        "ShotStream/shotstream.yaml",
        "ShotStream/default_config.yaml",
    }
    repo = hub.repos[f"Wan-AI/{wan}"]
    wanted = [
        n
        for n in repo
        if n.split("/")[0] in ("vae", "text_encoder", "tokenizer", "google") or n.endswith(".pth")
    ]
    assert got == expected | {f"{wan}/{n}" for n in wanted}
    # the real preset finds every component, tokenizer included
    layout_found = find_weights(root, get_preset("wan2.1-1.3b"))
    assert layout_found.kind == layout and layout_found.tokenizer is not None
    assert set(hub.tokens) == {"hf_test"}
    # a second run asks the hub nothing
    hub.calls.clear()
    assert _download(root, layout) == 0
    assert hub.calls == []
    assert capsys.readouterr().err.count("skipped") == 2


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, hub, capsys):
    root = tmp_path / "weights"
    hub.fail = "Wan-AI/Wan2.1-T2V-1.3B"
    assert _download(root, "original") == 1
    err = capsys.readouterr().err
    assert "Wan-AI/Wan2.1-T2V-1.3B: download failed: ConnectionError" in err
    assert "Run the same command again to resume" in err
    assert (root / "ShotStream" / RECORD).is_file()
    assert not (root / WAN_FOLDER["original"] / RECORD).exists()

    hub.fail, hub.calls = None, []
    assert _download(root, "original") == 0
    assert Counter(repo for repo, _ in hub.calls) == {
        "Wan-AI/Wan2.1-T2V-1.3B": 2
    }  # dry run + fetch
    assert find_weights(root, TINY).kind == "original"


def test_a_damaged_file_is_fetched_again(tmp_path, hub, capsys):
    root = tmp_path / "weights"
    assert _download(root, "original") == 0
    vae = root / WAN_FOLDER["original"] / "Wan2.1_VAE.pth"
    good = vae.read_bytes()
    vae.write_bytes(good[:100])
    hub.calls.clear()
    assert _download(root, "original") == 0
    assert [r for r, dry in hub.calls if not dry] == ["Wan-AI/Wan2.1-T2V-1.3B"]
    assert vae.read_bytes() == good
    assert "Wan2.1_VAE.pth is damaged; fetching it again" in capsys.readouterr().err


def test_not_enough_disk_is_refused_before_fetching(tmp_path, hub, capsys, monkeypatch):
    full = SimpleNamespace(total=10**9, used=10**9 - 10, free=10)
    monkeypatch.setattr("model.hub.shutil.disk_usage", lambda path: full)
    assert _download(tmp_path / "w", "original") == 1
    err = capsys.readouterr().err
    assert "KlingTeam/ShotStream: needs" in err and "has 10 B free" in err
    assert all(dry for _, dry in hub.calls)


def test_hub_errors_name_the_repo(tmp_path, monkeypatch, capsys):
    def offline(repo_id, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert _download(tmp_path / "w", "diffusers") == 1
    err = capsys.readouterr().err
    assert "KlingTeam/ShotStream: cannot list the files: OSError: Temporary failure" in err


def test_check_weights_names_the_wrong_file_and_loads_a_good_folder(tmp_path, capsys):
    root = write_weights(tmp_path, TINY, "diffusers")
    assert main(["check-weights", "--weights", str(root), "--preset", "tiny", "--load"]) == 0
    out = capsys.readouterr().out
    assert "diffusers layout" in out and "loaded strictly on cpu" in out
    conf = root / WAN_FOLDER["diffusers"] / "text_encoder" / "config.json"
    conf.write_text(conf.read_text().replace('"num_layers": 2', '"num_layers": 24'))
    assert main(["check-weights", "--weights", str(root), "--preset", "tiny", "--load"]) == 1
    captured = capsys.readouterr()
    assert "BAD  text encoder" in captured.out and "num_layers=24" in captured.out
    assert "wrong or damaged: text encoder" in captured.err and "loaded" not in captured.out
