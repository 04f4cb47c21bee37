"""`shotstream generate`: scripts in the demo format to an ordinary MP4, on the tiny preset."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from model.config import get_preset
from model.generator import ShotStreamGenerator, load_model
from model.offline import MP4Writer, Script, ScriptError, generate_video, load_script
from server.cli import main
from server.media import iter_boxes
from tests.model.tiny_weights import WAN_FOLDER, write_weights

needs_ffprobe = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe not installed")

SCRIPT = {
    "global_caption": "A lighthouse keeper on a windy island. The video plays at normal speed.",
    "shot1": "wide shot of the lighthouse at dusk",
    "shot2": "close-up of the keeper lighting the lamp",
}


def ffprobe(path: Path) -> dict:
    """Stream facts with every frame decoded and counted."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-of",
            "json",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,r_frame_rate,avg_frame_rate,"
            "nb_read_frames,nb_frames,duration,color_space:format=format_name,duration",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    probe = json.loads(out)
    return {**probe["streams"][0], "format": probe["format"]}


def _write_script(tmp_path: Path, obj, name: str = "script.json") -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@needs_ffprobe
def test_generate_tiny_two_shots_gives_42_frames_at_16_fps(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    code = main(
        [
            "generate",
            "--script",
            str(_write_script(tmp_path, SCRIPT)),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--chunks-per-shot",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    probe = ffprobe(out)
    assert int(probe["nb_read_frames"]) == 2 * (9 + 12) == int(probe["nb_frames"])
    assert probe["r_frame_rate"] == probe["avg_frame_rate"] == "16/1"
    assert float(probe["duration"]) == pytest.approx(42 / 16)
    assert (probe["codec_name"], probe["pix_fmt"], probe["color_space"]) == (
        "h264",
        "yuv420p",
        "bt709",
    )
    assert (int(probe["width"]), int(probe["height"])) == (96, 64)
    assert "mp4" in probe["format"]["format_name"]
    kinds = [b.kind for b in iter_boxes(out.read_bytes())]
    assert kinds.index("moov") < kinds.index("mdat")  # faststart: plays while downloading
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.json", "video.mp4"]
    err = capsys.readouterr()
    assert "RANDOM WEIGHTS" in err.err and "42 frames" in err.out


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ({"shot1": "a"}, 'missing "global_caption"'),
        (
            {"global_caption": "g", "shot1": "a", "shot2": 3},
            '"shot2" must be non-empty text, found a JSON int',
        ),
        (
            {"global_caption": "g", "shot1": ["a"]},
            '"shot1" must be non-empty text, found a JSON list',
        ),
        (
            {"global_caption": "g", "shot1": "  "},
            '"shot1" must be non-empty text, found an empty string',
        ),
        ({"global_caption": "g"}, "no shots"),
        ({"global_caption": "g", "shot1": "a", "shot3": "c"}, "missing shot2"),
        ({"global_caption": "g", "shot0": "a", "Shot1": "b"}, 'unknown keys "shot0", "Shot1"'),
        (
            {"global_caption": None, "shot1": "a"},
            '"global_caption" must be non-empty text, found null',
        ),
        (["g", "a"], "expected a JSON object"),
        ('{"global_caption": "g", "shot1": "a",}', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_bad_scripts_fail_clearly_before_loading(tmp_path, capsys, monkeypatch, script, message):
    monkeypatch.setattr("model.generator.load_model", _must_not_load)
    out = tmp_path / "video.mp4"
    code = main(["generate", "--script", str(_write_script(tmp_path, script)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "script.json" in err
    assert not out.exists()


def test_unreadable_and_missing_script_files(tmp_path, capsys):
    with pytest.raises(ScriptError, match="cannot read the script"):
        load_script(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00{")
    assert (
        main(["generate", "--script", str(tmp_path / "bin.json"), "--out", str(tmp_path / "v.mp4")])
        == 2
    )
    assert "bin.json: cannot read the script" in capsys.readouterr().err


def test_shots_come_in_numeric_order(tmp_path):
    shots = {f"shot{i}": f"text {i}" for i in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9)}
    script = load_script(_write_script(tmp_path, {**shots, "global_caption": "g"}))
    assert script == Script("g", tuple(f"text {i}" for i in range(1, 11)))


def test_weights_problems_are_named_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("model.generator.load_model", _must_not_load)
    path = str(_write_script(tmp_path, SCRIPT))
    out = str(tmp_path / "v.mp4")
    assert main(["generate", "--script", path, "--out", out, "--preset", "wan2.1-1.3b"]) == 1
    assert "needs real weights" in capsys.readouterr().err
    assert (
        main(["generate", "--script", path, "--out", out, "--weights", str(tmp_path / "none")]) == 1
    )
    assert "weights folder not found" in capsys.readouterr().err
    assert main(["generate", "--script", path, "--out", out, "--weights", str(tmp_path)]) == 1
    assert "shotstream_merged.pt" in capsys.readouterr().err


def test_generate_with_a_weights_folder_checks_it_first(tmp_path, capsys, monkeypatch):
    root = write_weights(tmp_path / "w", get_preset("tiny"), "original")
    script, out = str(_write_script(tmp_path, SCRIPT)), tmp_path / "v.mp4"
    args = [
        "generate",
        "--script",
        script,
        "--out",
        str(out),
        "--weights",
        str(root),
        "--preset",
        "tiny",
        "--chunks-per-shot",
        "1",
        "--quiet",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "RANDOM" not in captured.err and f"weights: {root}" in captured.err
    assert "random weights" not in captured.out and "18 frames" in captured.out
    # a wrong file is named before the model is loaded
    vae = root / WAN_FOLDER["original"] / "Wan2.1_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:1000])
    monkeypatch.setattr("model.generator.load_model", _must_not_load)
    assert main(args) == 1
    assert "Wan2.1_VAE.pth: not a readable weights file" in capsys.readouterr().err


def test_overlong_caption_is_refused_before_generating_under_reject(tmp_path, capsys):
    long_shot = {**SCRIPT, "shot2": "the keeper climbs the stairs " * 20}  # > 128 byt5 tokens
    out = tmp_path / "v.mp4"
    code = main(
        [
            "generate",
            "--script",
            str(_write_script(tmp_path, long_shot)),
            "--out",
            str(out),
            "--chunks-per-shot",
            "1",
            "--prompt-overflow",
            "reject",
            "--quiet",
        ]
    )
    assert code == 2 and "shot2: prompt is" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.part"))


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(get_preset("tiny").replace(chunks_per_shot=2), seed=0)


@needs_ffprobe
def test_ctrl_c_keeps_a_playable_file_of_the_chunks_made(tmp_path, tiny_model, monkeypatch):
    real = ShotStreamGenerator.next_chunk
    calls = []

    def next_chunk(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(ShotStreamGenerator, "next_chunk", next_chunk)
    script = Script(SCRIPT["global_caption"], (SCRIPT["shot1"], SCRIPT["shot2"]))
    report = generate_video(tiny_model, script, tmp_path / "v.mp4", progress=False)
    assert report.interrupted and report.frames == 9 + 12 and report.chunks == 2
    assert int(ffprobe(tmp_path / "v.mp4")["nb_read_frames"]) == 21


def test_a_failure_leaves_no_file(tmp_path, tiny_model, monkeypatch):
    def broken(self):
        raise RuntimeError("injected")

    monkeypatch.setattr(ShotStreamGenerator, "next_chunk", broken)
    with pytest.raises(RuntimeError, match="injected"):
        generate_video(tiny_model, Script("g", ("a",)), tmp_path / "v.mp4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_keeps_colours_and_counts_frames(tmp_path):
    """Smooth gradients survive the BT.709 round trip to within a few levels (a wrong
    matrix or range costs 7-8 levels on average here)."""
    h, w, n = 64, 96, 10
    y, x = np.mgrid[0:h, 0:w]
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0] = x * 255 // w
    frames[..., 1] = y * 255 // h
    frames[..., 2] = (np.arange(n) * 25)[:, None, None]
    writer = MP4Writer(tmp_path / "g.mp4", w, h, fps=16)
    writer.write(frames[:4])
    writer.write(frames[4:])
    writer.close()
    with av.open(str(tmp_path / "g.mp4")) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(float) - frames).mean() < 3.0
    with pytest.raises(ValueError, match="uint8"):
        MP4Writer(tmp_path / "h.mp4", w, h, 16).write(frames.astype(np.float32))


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded")
