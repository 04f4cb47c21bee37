"""Which preset a server runs when the operator names none."""

from __future__ import annotations

import pytest

from model.config import get_preset
from server.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("SHOTSTREAM_PRESET", "SHOTSTREAM_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)


def test_without_weights_the_default_is_the_bundled_demo_model():
    s = Settings()
    assert s.preset == "demo" and s.weights is None
    assert get_preset(s.preset).bundled_weights  # it runs on weights shipped in the package


def test_a_weights_folder_without_a_preset_is_the_real_model(monkeypatch):
    assert Settings(weights="/w").preset == "wan2.1-1.3b"
    monkeypatch.setenv("SHOTSTREAM_WEIGHTS", "/w")
    assert Settings().preset == "wan2.1-1.3b"


def test_a_preset_named_by_flag_or_environment_is_kept(monkeypatch):
    assert Settings(weights="/w", preset="tiny").preset == "tiny"
    assert Settings(weights="/w", preset="demo").preset == "demo"
    monkeypatch.setenv("SHOTSTREAM_PRESET", "tiny")
    assert Settings(weights="/w").preset == "tiny"
    assert Settings().preset == "tiny"
