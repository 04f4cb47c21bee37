"""The README's promises that code can check."""

from __future__ import annotations

from pathlib import Path

from server.readme import README, render

ROOT = Path(__file__).resolve().parents[2]


def test_settings_table_matches_settings():
    text = README.read_text()
    assert render(text) == text, "README settings table is stale: python -m server.readme --write"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README.read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
