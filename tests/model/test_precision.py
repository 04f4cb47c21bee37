"""The bf16 production path drifts from our float32 path only as far as bf16 rounding goes."""

from __future__ import annotations

import torch

from model.golden import Golden, recorded_renoise, run_shot
from model.sampler import FlowSchedule
from model.weights import load_dit_state, strip_prefix
from tests.conftest import golden_params

# The golden README: "bf16 drift of about 0.05 max is normal"; allow 3x before calling it a bug.
BF16_DRIFT_LIMIT = 0.15


@golden_params()
def test_bf16_drift_against_float32(golden_path):
    g = Golden(golden_path)
    sd = strip_prefix(g.weights("generator"), "model.", where=g.path.name)
    sch = FlowSchedule(g.cfg.sampler)
    shots = {}
    for dtype in (torch.float32, torch.bfloat16):
        dit = load_dit_state(g.cfg, sd, dtype=dtype)
        for s in range(g.num_shots):
            ins = g.calls_by_id[f"shot{s}.prefill"]["inputs"]
            draws = recorded_renoise(g, s)
            with torch.inference_mode():
                shots[dtype, s] = run_shot(
                    dit,
                    sch,
                    g[ins["x"]].to(dtype),
                    g[ins["shot_flags"]].long()[None],
                    g[ins["prompt_embeds"]][None].to(dtype),
                    g[f"shot{s}.noise"].to(dtype),
                    lambda c, d=draws, dt=dtype: [n.to(dt) for n in d(c)],
                )
    for s in range(g.num_shots):
        lo, hi = shots[torch.bfloat16, s], shots[torch.float32, s]
        assert lo.dtype == torch.bfloat16 and torch.isfinite(lo).all()
        drift = (lo.float() - hi).abs().max().item()
        print(
            f"shot {s}: bf16 vs fp32 max abs drift {drift:.4f} (latents up to {hi.abs().max():.2f})"
        )
        assert 0 < drift < BF16_DRIFT_LIMIT
