"""Parity of the causal DiT, dual cache and sampler with the original, on golden vectors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.golden import Golden, max_abs, replay_dit_calls, replay_dit_chain
from model.sampler import FlowSchedule
from tests.conftest import GOLDEN_FILES, golden_params


def test_golden_files_present():
    assert GOLDEN_FILES, "no golden_*.safetensors found"


@pytest.fixture(scope="module", params=GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def golden(request):
    return Golden(request.param)


def _assert_all(checks, expect_groups):
    checks = list(checks)
    seen = {c.group for c in checks}
    assert expect_groups <= seen, f"missing groups {expect_groups - seen}"
    bad = [(c.name, c.max_abs, c.tolerance) for c in checks if not c.ok]
    assert not bad, f"{len(bad)} tensors past tolerance, e.g. {bad[:5]}"
    return checks


def test_schedule_matches_recorded(golden):
    sch = FlowSchedule(golden.cfg.sampler)
    assert torch.equal(sch.sigmas, golden["scheduler.sigmas"])
    assert torch.equal(sch.timesteps, golden["scheduler.timesteps"])
    assert torch.equal(torch.tensor(sch.step_timesteps), golden["scheduler.denoising_step_list"])
    assert sch.step_timesteps == tuple(golden.meta["scheduler"]["denoising_step_list_used"])


def test_every_generator_call_teacher_forced(golden):
    """Each recorded call on its recorded inputs: flow, x0, caches, activations <= 1e-5."""
    with torch.inference_mode():
        checks = _assert_all(
            replay_dit_calls(golden, golden.build_dit(), FlowSchedule(golden.cfg.sampler)),
            {"dit.flow", "dit.x0", "dit.caches", "dit.activations", "scheduler.renoise"},
        )
    # Every recorded generator output and cache was compared, none skipped.
    recorded = {
        name
        for call in golden.calls
        if call["kind"] in ("dit", "dit_prefill")
        for group in ("outputs", "caches", "activations")
        for name in _names(call.get(group, {}))
    }
    assert recorded <= {c.name for c in checks}


def _names(group):
    if isinstance(group, dict):
        for v in group.values():
            yield from _names(v)
    elif isinstance(group, list):
        for v in group:
            yield from _names(v)
    else:
        yield group


def test_every_shot_free_running(golden):
    """Each shot's loop from its recorded conditioning, noises injected: latents <= 1e-4."""
    with torch.inference_mode():
        checks = _assert_all(
            replay_dit_chain(golden, golden.build_dit(), FlowSchedule(golden.cfg.sampler)),
            {"latents (chain)"},
        )
    assert len(checks) == golden.num_shots


@golden_params()
def test_selftest_cli_passes(golden_path):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "selftest", "--golden", str(golden_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"ok": true' in out.stdout and '"ok": false' not in out.stdout


def test_selftest_cli_fails_on_a_corrupted_file(golden_dir, tmp_path):
    """A golden file whose recorded output is perturbed must make selftest exit non-zero."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = sorted(golden_dir.glob("golden_*.safetensors"))[0]
    tensors = load_file(str(src))
    meta = json.loads(src.with_suffix(".json").read_text())
    name = next(c for c in meta["calls"] if c["kind"] == "dit")["outputs"]["flow"]
    tensors[name] = tensors[name] + 1e-3
    dst = tmp_path / src.name
    save_file(tensors, str(dst))
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "selftest", "--golden", str(dst)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1
    assert '"ok": false' in out.stdout


def test_whole_loop_through_the_generator(golden):
    """Scenario S2 free-running through ShotStreamGenerator: only token ids and noises come
    from the file; context selection, VAE encode, chunks and streaming decode are ours."""
    from model.golden import replay_loop

    with torch.inference_mode():
        checks = _assert_all(replay_loop(golden), {"context.indices", "loop (chain)"})
    names = {c.name for c in checks}
    for s in range(golden.num_shots):
        assert {f"shot{s}.latents", f"shot{s}.decode.pixels", f"shot{s}.shot_flags"} <= names
    for s in range(1, golden.num_shots):
        assert {f"shot{s}.ctx.indices", f"shot{s}.ctx.latents_vae"} <= names


def test_dropping_captions_of_shots_without_context_frames_changes_nothing():
    """The original encodes a caption for every earlier shot; the live generator keeps only
    the captions of shots that give a context frame. For every recorded shot with an
    earlier shot that gives none, both layouts run the same shot to the same bits."""
    from model.context import ContextPick, caption_rows
    from model.golden import new_cache, recorded_renoise, run_shot

    compared = 0
    for path in GOLDEN_FILES:
        g = Golden(path)
        dit, schedule = g.build_dit(), FlowSchedule(g.cfg.sampler)
        for shot in range(1, g.num_shots):
            prefill = g.calls_by_id[f"shot{shot}.prefill"]["inputs"]
            flags = g[prefill["shot_flags"]].long()[None]
            if set(flags[0].tolist()) == set(range(shot)):
                continue  # every earlier shot gives a frame: nothing to drop
            prompt = g[prefill["prompt_embeds"]][None]
            assert prompt.shape[1] == shot + 1  # the recording holds every shot's caption
            picks = [ContextPick(0, int(f), 0) for f in flags[0]]
            rows, ctx_rows = caption_rows(picks, shot)
            assert len(rows) < shot + 1
            runs = []
            for captions, embeds in (
                (None, prompt),
                ((torch.tensor([ctx_rows]), torch.tensor([len(rows) - 1])), prompt[:, rows]),
            ):
                kv = new_cache(g.cfg, captions=prompt.shape[1])
                with torch.inference_mode():
                    latents = run_shot(
                        dit,
                        schedule,
                        g[prefill["x"]],
                        flags,
                        embeds,
                        g[f"shot{shot}.noise"],
                        recorded_renoise(g, shot),
                        captions=captions,
                        kv=kv,
                    )
                runs.append((latents, kv.k.clone(), kv.v.clone()))
            (lat_all, k_all, v_all), (lat_kept, k_kept, v_kept) = runs
            assert torch.equal(lat_all, lat_kept)
            assert torch.equal(k_all, k_kept) and torch.equal(v_all, v_kept)
            # and the run is the recorded one
            assert max_abs(lat_kept, g[f"shot{shot}.latents"]) <= g.chain_tol
            compared += 1
    assert compared, "no golden file has a shot whose earlier shot gives no context frame"
