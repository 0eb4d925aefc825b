"""`nasa-video COMMAND ...`: thin over the library. Each command's module registers its parser and its handler
(set_defaults(func=...)); main() parses and calls it. Bad input ends in one line on stderr, exit code 2.
The modules import nothing heavy (torch, diffusers) until a handler runs."""
from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..errors import UserError
from .common import Parser
from . import bench, generate, serve, train, upstream
from . import eval as evaluate

COMMANDS = (generate, train, evaluate, serve, upstream, bench)  # in the order `nasa-video -h` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nasa-video", description="Negative prompts for streaming video diffusion (NASA)")
    parser.add_argument("--version", action="version", version=f"nasa-video {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings the user should see (an unknown word, a random-weight model), as one line, without the source."""
    text = " ".join(str(message).split())
    print(f"nasa-video: warning: {text[:300] + '...' if len(text) > 300 else text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv, upstream_args = upstream.split_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # a bad argument (one line already printed, 2), --help or --version (0)
        return done.code if isinstance(done.code, int) else 2
    args.upstream_args = upstream_args
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return args.func(args)
    except UserError as err:
        print(f"nasa-video: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what finished is kept (videos, scores, checkpoints); no traceback
        print("nasa-video: interrupted; finished work is kept: run the same command to continue", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


__all__ = ["main", "build_parser"]
