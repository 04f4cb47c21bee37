"""`shotstream-client` end to end on a real server: `watch` writes an MP4 that decodes to
exactly the announced frames at 16 fps, `--out -` pipes a decodable fMP4, and `script`
plays a demo script shot by shot at the shot boundaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.clients.conftest import API_KEY
from tests.support.server import REPO, ffprobe_frames

FPS = 16


def cli(server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args, "--server", server.base, "--api-key", API_KEY],
        cwd=REPO,
        capture_output=True,
        timeout=timeout,
    )


def top_level_boxes(path: Path) -> list[str]:
    data, at, names = path.read_bytes(), 0, []
    while at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        names.append(data[at + 4 : at + 8].decode("latin-1"))
        if size < 8:
            break
        at += size
    return names


def stream_rate(path: Path) -> str:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=r_frame_rate",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_watch_writes_an_mp4_of_exactly_the_announced_frames(server, tmp_path):
    out, report = tmp_path / "watch.mp4", tmp_path / "watch.json"
    r = cli(
        server,
        "watch",
        "a red circle on a blue background",
        "--shot",
        "wide shot",
        "--seed",
        "3",
        "--chunks",
        "4",
        "--out",
        str(out),
        "--report",
        str(report),
    )
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(report.read_text())
    assert [c["seq"] for c in rep["chunks"]] == [0, 1, 2, 3]
    assert [c["frames"] for c in rep["chunks"]] == [9, 12, 12, 9]  # 3 chunks per shot
    assert rep["ended"] == "stopped" and rep["fps"] == FPS
    frames = ffprobe_frames(out)
    assert len(frames) == rep["frames"] == 42
    pts = [float(f["pts_time"]) for f in frames]
    assert all(abs((b - a) - 1 / FPS) < 1e-6 for a, b in zip(pts, pts[1:], strict=False))
    assert stream_rate(out) == f"{FPS}/1"
    assert [i for i, f in enumerate(frames) if f["key_frame"] == 1] == [0, 9, 21, 33]
    boxes = top_level_boxes(out)  # progressive, index first (faststart), no fragments
    assert boxes.index("moov") < boxes.index("mdat") and "moof" not in boxes
    assert not (tmp_path / "watch.mp4.partial").exists()


def test_watch_to_stdout_is_a_fragmented_mp4(server, tmp_path):
    report = tmp_path / "stdout.json"
    r = cli(
        server,
        "watch",
        "a red circle",
        "--chunks",
        "2",
        "--out",
        "-",
        "--quiet",
        "--report",
        str(report),
    )
    assert r.returncode == 0, r.stderr.decode()
    path = tmp_path / "stdout.mp4"
    path.write_bytes(r.stdout)
    assert top_level_boxes(path)[:2] == ["ftyp", "moov"] and "moof" in top_level_boxes(path)
    assert len(ffprobe_frames(path)) == json.loads(report.read_text())["frames"] == 21


def test_watch_exits_nonzero_with_the_servers_message(server, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clients.cli",
            "watch",
            "a red circle",
            "--server",
            server.base,
            "--api-key",
            "wrong",
            "--out",
            str(tmp_path / "x.mp4"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "401" in r.stderr and "API key" in r.stderr
    assert not list(tmp_path.iterdir())  # no file for a session that never started


def test_script_plays_each_shot_from_its_boundary(server, tmp_path):
    script = {
        "global_caption": "a red circle on a blue background",
        "shot1": "wide shot, the circle stays still",
        "shot2": "close-up shot, the circle moves up",
        "shot3": "overhead shot, the circle spins",
    }
    path, out, report = tmp_path / "demo.json", tmp_path / "demo.mp4", tmp_path / "demo-report.json"
    path.write_text(json.dumps(script))
    r = cli(
        server,
        "script",
        str(path),
        "--out",
        str(out),
        "--report",
        str(report),
        "--shot-chunks",
        "1",
        "--seed",
        "9",
    )
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(report.read_text())
    shots = rep["shots"]
    assert [s["prompt"] for s in shots] == [script["shot1"], script["shot2"], script["shot3"]]
    assert [s["starts_at_seq"] for s in shots] == [0, 3, 6]  # each at a 3-chunk boundary
    assert [(p["prompt"], p["mode"]) for p in rep["prompts"]] == [
        (script["shot2"], "queue"),
        (script["shot3"], "queue"),
    ]
    assert [p["shot_id"] for p in rep["prompts"]] == [s["shot_id"] for s in shots[1:]]
    # Finished once the last shot played its requested chunk.
    assert [c["seq"] for c in rep["chunks"]] == list(range(7))
    assert [c["shot"] for c in rep["chunks"]] == [0, 0, 0, 1, 1, 1, 2]
    assert len(ffprobe_frames(out)) == rep["frames"] == 9 + 12 + 12 + 9 + 12 + 12 + 9


def test_watch_attaches_to_a_session_left_running(server, tmp_path):
    r = httpx.post(
        f"{server.base}/v1/sessions",
        json={"prompt": "a red circle", "seed": 8},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 201, r.text
    attach = ["--session", r.json()["session_id"], "--token", r.json()["token"]]
    runs = []
    for name, leave in (("first", ["--leave"]), ("second", [])):
        out, report = tmp_path / f"{name}.mp4", tmp_path / f"{name}.json"
        done = cli(
            server,
            "watch",
            *attach,
            "--chunks",
            "2",
            "--out",
            str(out),
            "--report",
            str(report),
            *leave,
        )
        assert done.returncode == 0, done.stderr.decode()
        runs.append((out, json.loads(report.read_text()), done.stderr.decode()))
    (_, first, left), (second_mp4, second, _) = runs
    assert first["ended"] is None and "left the session running" in left
    assert second["ended"] == "stopped"
    assert second["chunks"][0]["seq"] > first["chunks"][-1]["seq"]  # the stream went on
    frames = ffprobe_frames(second_mp4)
    assert len(frames) == second["frames"]
    assert float(frames[0]["pts_time"]) == 0.0  # a late join still plays from time 0
