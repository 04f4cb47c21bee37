"""The `shotstream` command: selftest, generate, download, serve.

Each subcommand's arguments are declared here; the work lives in the module it names,
imported lazily so `shotstream --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_selftest(args: argparse.Namespace) -> int:
    """Replay golden files through our code; one JSON line per tensor group."""
    import torch

    from model.golden import run_selftest

    torch.set_flush_denormal(True)
    failed = False
    for path in args.golden:
        try:
            groups = run_selftest(path)
        except (OSError, ValueError, KeyError) as exc:
            print(json.dumps({"file": path, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            failed = True
            continue
        for grp in groups:
            row = {
                "file": path,
                "group": grp.group,
                "tensors": len(grp.checks),
                "max_abs": grp.max_abs,
                "tolerance": grp.tolerance,
                "worst": grp.worst,
                "ok": grp.ok,
            }
            print(json.dumps(row), flush=True)
            failed |= not grp.ok
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shotstream",
        description="ShotStream: real-time multi-shot text-to-video streaming server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "selftest",
        help="check this install against golden vectors of the original implementation",
        description="Replay every recorded call of golden files (sizes from the JSON beside "
        "each) and print one JSON line per tensor group with its max abs error. Exits 1 "
        "past tolerance.",
    )
    p.add_argument("--golden", action="append", required=True, metavar="FILE",
                   help="golden .safetensors file (its .json sidecar must sit beside it); repeatable")  # fmt: skip
    p.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
