"""bench/device --dry-run: the one command of a GPU loan, run on the CPU with the tiny
preset. Checked: every stage reports in order, with the fields the results table needs, and
a stage past its time box is ended without costing the next. Never how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.device import STAGES, dit_variants
from bench.device_prepare import CARRY, CARRY_SERVE, COMMAND, COMMAND_SERVE
from tests.conftest import GOLDEN_DIR, GOLDEN_FILES
from tests.support.server import REPO


def run_device(tmp_path, *args: str, timeout: float = 900) -> tuple[int, list[dict]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.device",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--golden-dir",
            str(GOLDEN_DIR),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    printed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in (tmp_path / "device.jsonl").read_text().splitlines()]
    assert printed == written  # what $OUT brings back is what was printed
    return out.returncode, written


def by_kind(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return run_device(tmp_path_factory.mktemp("device"))


def test_every_stage_runs_in_order_and_reports(dry_run):
    rc, rows = dry_run
    assert rc == 0
    assert all(r["bench"] == "device" and r["dry_run"] is True for r in rows)
    assert len({r["run"] for r in rows}) == 1
    stages = by_kind(rows, "stage")
    assert [s["stage"] for s in stages] == list(STAGES)
    assert all(s["status"] == "ok" and s["seconds"] <= s["box_s"] for s in stages)
    # each stage's rows come before its status line, and stages do not interleave
    order = [r["stage"] for r in rows if r["kind"] != "summary"]
    assert order == sorted(order, key=list(STAGES).index)
    (summary,) = by_kind(rows, "summary")
    assert summary["stages"] == dict.fromkeys(STAGES, "ok")


def test_environment_and_ceilings(dry_run):
    _, rows = dry_run
    (env,) = by_kind(rows, "environment")
    assert env["device"].startswith("cpu") and env["torch"] and env["commit"]
    assert env["packages"]["torch"] and "diffusers" in env["packages"]
    (ceil,) = by_kind(rows, "ceilings")
    assert ceil["matmul_tflops"] > 0 and ceil["copy_gb_s"] > 0
    assert ceil["matmul_source"].startswith("measured")


def test_golden_parity_for_every_file_and_drift(dry_run):
    _, rows = dry_run
    files = by_kind(rows, "golden-file")
    assert sorted(f["file"] for f in files) == sorted(p.name for p in GOLDEN_FILES)
    assert all(f["ok"] for f in files)
    groups = by_kind(rows, "golden")
    assert {"dit.flow", "latents (chain)", "vae.decode", "t5", "loop (chain)"} <= {
        g["group"] for g in groups
    }
    assert all(g["max_abs"] <= g["tolerance"] for g in groups)
    (drift,) = by_kind(rows, "drift")
    bf16, fp8 = drift["bfloat16"], drift["fp8"]
    assert drift["finite"] and bf16["finite"] and len(bf16["chunks"]) == 2
    assert 0 < bf16["rel_l2_max"] < 0.1  # bf16 moves the output, but not by much
    assert fp8["finite"] and len(fp8["chunks"]) == 2


def test_dit_variants_with_throughput_and_mfu(dry_run):
    _, rows = dry_run
    dit = by_kind(rows, "dit")
    want = dit_variants(dry_run=True)

    def key(r):
        return r["mode"], r["batch"], r.get("group_rows", False), r.get("fp8", False)

    assert [key(r) for r in dit] == [key(v) for v in want]
    measured = [r for r in dit if "skipped" not in r]
    assert {r["mode"] for r in measured} == {"eager", "graphs"}
    for r in measured:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_source"].startswith("measured")
        assert len(r["chunks"]) == 2 and r["prefill_ms"] > 0


def test_generator_and_first_chunk(dry_run):
    _, rows = dry_run
    firsts = by_kind(rows, "first-chunk")
    assert [f["variant"] for f in firsts] == [[], ["--chunk-graphs"], ["--chunk-graphs", "--fp8"]]
    assert all(f["x0_finite"] and f["pixels_finite"] and f["pixels_std"] > 0 for f in firsts)
    gens = by_kind(rows, "generate")
    assert [(g["chunk_graphs"], g["fp8"]) for g in gens] == [
        (False, False),
        (True, False),
        (True, True),
    ]
    for g in gens:
        assert g["fps"] > 0 and g["first_frame_ms"] > 0 and g["frames"] == 9 + 12
        assert set(g["verb_ms"]) == {"text", "context", "prefill", "denoise", "decode", "refresh"}
        assert g["session_bytes_by_kind"]["kv"] == g["kv_bytes_model"]
    (overlap,) = by_kind(rows, "overlap")
    assert overlap["chunks"] == 2 and overlap["streams"] == 1
    assert overlap["sequential_s"] > 0 and overlap["pipelined_s"] > 0


def test_server_under_load(dry_run):
    _, rows = dry_run
    (case,) = by_kind(rows, "serve")
    assert case["sessions"] == 1 and case["client"]["chunks"] > 0
    client = case["client"]
    for key in ("ttff_s", "deadline_misses", "prompt_to_visible_s", "inter_chunk_gap_s"):
        assert key in client
    assert case["server"]["chunks_generated"] >= client["chunks"]
    (summary,) = by_kind(rows, "serve-summary")
    assert summary["cases"][0]["throughput_ratio"] == 1.0


def test_a_stage_past_its_box_is_ended_and_the_next_still_runs(tmp_path):
    # 0.2 s: the stage's process cannot even import torch in that time
    rc, rows = run_device(tmp_path, "--stages", "dit,generate", "--box", "dit=0.2")
    assert rc == 1
    stages = {s["stage"]: s for s in by_kind(rows, "stage")}
    assert stages["dit"]["status"] == "timeout" and stages["dit"]["seconds"] < 10
    assert not by_kind(rows, "dit")
    assert stages["generate"]["status"] == "ok"
    assert len(by_kind(rows, "generate")) == 3


def test_readme_holds_the_prepared_commands():
    """The next GPU session pastes them from bench/README: they must be these, and fit."""
    readme = (REPO / "bench" / "README.md").read_text()
    for command, carry in ((COMMAND, CARRY), (COMMAND_SERVE, CARRY_SERVE)):
        assert command in readme and len(command) <= 2000
        assert json.dumps(carry) in readme and len(carry) <= 8
        assert all(c.startswith(".device/") for c in carry)
    gitignore = (REPO / ".gitignore").read_text().split()
    assert "/.device/" in gitignore  # carried folders must be ignored, or they travel twice


def test_random_weights_launcher_makes_the_real_preset_runnable():
    """bench.serve --random-weights starts `python -m bench.random_weights serve`: the 1.3B
    preset must then load without a weights folder, its networks made on the device."""
    code = (
        "import bench.random_weights as r; r.install();"
        "from model.config import get_preset; import server.runner as run;"
        "c = get_preset('wan2.1-1.3b');"
        "print(c.random_weights_ok, c.text.tokenizer, c.text.text_len,"
        " getattr(run.load_model, '_on_device', False))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "byt5", "512", "True"]
