"""`nasa-video COMMAND ...`: thin over the library. Each command's module registers its parser and its handler
(set_defaults(func=...)); main() parses and calls it. Bad input ends in one line on stderr, exit code 2.
The modules import nothing heavy (torch, diffusers) until a handler runs."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import bench, generate, serve, train, upstream
from . import eval as evaluate

COMMANDS = (generate, train, evaluate, serve, upstream, bench)  # in the order `nasa-video -h` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nasa-video",
                                     description="Negative prompts for streaming video diffusion (NASA)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, upstream_args = upstream.split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.upstream_args = upstream_args
    try:
        return args.func(args)
    except UserError as err:
        print(f"nasa-video: error: {err}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
