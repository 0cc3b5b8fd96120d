"""Command line: ``codex-jax run | sample | sweep | audit | evaluate``.

One small module per sub-command; each exports ``add_parser(subparsers)``.  JAX is
imported inside the commands, so ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import sys

from codex_jax.cli import audit, evaluate, run, sample, sweep
from codex_jax.errors import CodexError

COMMANDS = (run, evaluate, audit, sweep, sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codex-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CodexError as err:
        print(f"codex-jax: error: {err}", file=sys.stderr)
        return 2
