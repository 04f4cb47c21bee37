"""The benchmark scripts run end to end on the tiny preset and print the JSON they promise.
No figure is checked against a bound (timings never go in tests): the shape and the
consistency of what they report are."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.server import REPO


def run_bench(*args: str, timeout: float = 300) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_generate_reports_every_verb_and_fps():
    (row,) = run_bench("bench.generate", "--preset", "tiny", "--shots", "1", "--chunks", "2")
    assert row["bench"] == "generate" and row["preset"] == "tiny" and row["weights"] == "random"
    assert row["device"].startswith("cpu") and row["frames"] == 9 + 12
    assert set(row["verb_ms"]) == {"text", "context", "prefill", "denoise", "decode", "refresh"}
    assert row["fps"] > 0 and row["session_bytes"] == sum(row["session_bytes_by_kind"].values())


def test_generate_runs_the_demo_preset_on_its_bundled_weights_and_tokenizer():
    # its word-level tokenizer has 96 ids: ByT5's stand-in (for presets without bundled
    # weights) would index past the text encoder's embedding
    (row,) = run_bench("bench.generate", "--preset", "demo", "--shots", "1", "--chunks", "1")
    assert row["preset"] == "demo" and row["weights"] == "real"  # the bundled, trained ones
    assert row["frames"] == 9 and row["fps"] > 0


def test_demo_sizes_times_variants_of_the_demo_preset():
    rows = run_bench(
        "bench.demo_sizes",
        "--variant",
        "patch=1,dim=32,layers=1",
        "--variant",
        "",
        "--variant",
        "patch=1x2,dim=32,layers=1",
        "--shots",
        "1",
        "--train-steps",
        "1",
    )
    small, shipped, tall = rows
    assert small["variant"] == {"patch": 1, "dim": 32, "layers": 1}
    assert (
        small["tokens_per_latent_frame"] == 8 * 12 and shipped["tokens_per_latent_frame"] == 4 * 6
    )
    assert tall["variant"]["patch"] == "1x2" and tall["tokens_per_latent_frame"] == 8 * 6
    assert small["dit_params"] < shipped["dit_params"] == 1_226_944  # the shipped DiT's size
    for r in rows:
        assert r["frames"] == 9 + 3 * 12 and r["realtime_factor"] > 0 and r["train_step_s"] > 0
        assert r["train_chunks"] == 2 and r["train_step_dense_mask_s"] > 0
        assert r["dense_over_blocks"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "bench.demo_sizes", "--variant", "heads=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "bad variant item 'heads=3'" in bad.stderr


def test_train_steps_times_a_phase_with_one_and_two_workers_and_the_encode_slice():
    (row,) = run_bench(
        "bench.train_steps",
        "--phases",
        "cross",
        "--steps",
        "3",
        "--warm",
        "1",
        "--encode-frames",
        "4",
    )
    assert row["bench"] == "train_steps" and row["baseline_workers"] == 1
    assert set(row["seconds_per_step"]["cross"]) == {"1", "2"}
    assert all(t > 0 for t in row["seconds_per_step"]["cross"].values())
    assert row["speedup_over_workers"]["cross"]["1"] == 1.0
    # the lone-frame slice computes what the whole kernel does, to float rounding
    assert row["encode_max_relative_gap"] < 1e-5 and row["encode_speedup"] > 0


def test_serve_runs_a_real_server_under_load_and_compares_variants():
    rows = run_bench(
        "bench.serve",
        "--preset",
        "tiny",
        "--threads",
        "1",
        "--sessions",
        "2",
        "--duration",
        "4",
        "--prompt-every",
        "2",
        "--admit-all",
        "--compare",
        "max_batch=1",
        "--compare",
        "max_batch=2",
    )
    *cases, summary = rows
    assert [c["variant"] for c in cases] == [{"max_batch": "1"}, {"max_batch": "2"}]
    for c in cases:
        assert c["model"]["preset"] == "tiny" and c["model"]["real_weights"] is False
        assert c["client"]["sessions_started"] == 2 and c["client"]["sessions_refused"] == 0
        assert c["client"]["chunks"] > 0 and not c["client"]["errors"]
        # the server generated at least what the clients received
        assert c["server"]["frames_sent"] == c["client"]["frames"]
        assert c["server"]["chunks_generated"] >= c["client"]["chunks"]
        o = c["overhead"]
        assert o["model_ms_per_chunk"] > 0 and o["server_ms_per_chunk"] > 0
        assert o["server_vs_model"] == pytest.approx(
            o["server_ms_per_chunk"] / o["model_ms_per_chunk"], rel=0.01, abs=1e-3
        )
    assert summary["bench"] == "serve-summary" and summary["cases"][0]["throughput_ratio"] == 1.0
