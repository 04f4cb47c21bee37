"""The README's promises that code can check."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from server.readme import README, render
from server.settings import settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_settings_table_matches_settings():
    text = README.read_text()
    assert render(text) == text, "README settings table is stale: python -m server.readme --write"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README.read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


DOCS = ("README.md", "docker/README.md", "model/demo_weights/README.md", "bench/README.md")
# a command in inline code or on a code-block line, up to the end of the code span or line
_COMMAND = re.compile(r"(?:`|^\s*)((?:shotstream|shotstream-client) [^`\n]*)", re.MULTILINE)


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `shotstream ...` / `shotstream-client ...` in the docs."""
    found = []
    for name in DOCS:
        for m in _COMMAND.finditer((ROOT / name).read_text()):
            command = m.group(1).split(" #")[0]  # a shell comment after it is prose
            found.append((name, command.replace("\\|", "|").strip()))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError(f"{parser.prog} has no subcommands")


def test_documented_commands_name_real_subcommands_and_flags():
    from clients.cli import build_parser as client_parser
    from server.cli import build_parser as server_parser

    parsers = {"shotstream": server_parser(), "shotstream-client": client_parser()}
    commands = documented_commands()
    assert len(commands) >= 15, commands  # the command table alone has more
    wrong = []
    for name, command in commands:
        words = command.split()
        subs = _subcommands(parsers[words[0]])
        if len(words) < 2 or words[1] not in subs:
            wrong.append(f"{name}: {command!r}: no subcommand {words[1:2]}")
            continue
        options = subs[words[1]]._option_string_actions
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command):
            if flag not in options:
                wrong.append(f"{name}: {command!r}: `{words[0]} {words[1]}` has no {flag}")
    assert not wrong, "\n".join(wrong)


def test_the_settings_table_command_prints_the_table_and_has_help():
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "server.settings", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    table = run("--markdown")
    assert table.returncode == 0 and table.stdout == settings_table() + "\n"
    for args in ((), ("--help",)):
        shown = run(*args)
        assert shown.returncode == 0 and "--markdown" in shown.stdout
    assert run("--bogus").returncode == 2
