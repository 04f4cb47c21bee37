"""Keep the README's settings table equal to `server/settings.py` (`--write` rewrites it)."""

from __future__ import annotations

import sys
from pathlib import Path

from server.settings import settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def render(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"


if __name__ == "__main__":
    text = README.read_text()
    if "--write" in sys.argv:
        README.write_text(render(text))
    else:
        sys.exit(0 if render(text) == text else 1)
