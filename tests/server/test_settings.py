"""Which preset a server runs when the operator names none, and the API keys a server
refuses to start with."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model.config import get_preset
from server.settings import Settings
from tests.support.server import REPO, free_port


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


@pytest.mark.parametrize(
    ("given_by", "key"), [("flag", "clé"), ("env", "🔑-key"), ("flag", "two words")]
)
def test_an_api_key_no_client_could_send_is_refused_at_start(given_by, key):
    """Clients disagree on the bytes of a non-ASCII header (browsers and requests send
    latin-1, curl the terminal's UTF-8, httpx refuses) and Bearer parsing splits on spaces,
    so such a key would lock every client out: the server says so and does not start. Its
    message names the setting, never the key."""
    args = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--preset",
        "tiny",
        "--no-warmup",
        "--port",
        str(free_port()),
    ]
    env = {**os.environ}
    if given_by == "flag":
        args += ["--api-key", key]
    else:
        env["SHOTSTREAM_API_KEY"] = key
    # Before the check, the server started (and this timeout, a hang guard, ran out).
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "api_key" in out.stderr and "visible ASCII" in out.stderr
    assert key not in out.stderr + out.stdout
