"""The project's own source files, for the tests that read code rather than run it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def package_sources(packages: Iterable[str]) -> dict[str, str]:
    """Every module of `packages`: its path relative to the repo (posix) -> its source."""
    return {
        p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8")
        for package in packages
        for p in sorted((REPO / package).rglob("*.py"))
    }
