"""Shared test setup: CPU float32, flushed denormals, and the golden files beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("SHOTSTREAM_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("golden_*.safetensors"))

torch.set_flush_denormal(True)  # random-weight nets hit denormals on CPU (10-30x slower)
# One intra-op thread: on a 2-core host, two OpenMP threads competing with the encoder,
# the server and the other test process run many times slower than one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden vectors not found at {GOLDEN_DIR} (set SHOTSTREAM_GOLDEN_DIR)")
    return GOLDEN_DIR


def golden_params():
    """Parametrize over every golden file of the shared structure (ids = file names)."""
    return pytest.mark.parametrize("golden_path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
