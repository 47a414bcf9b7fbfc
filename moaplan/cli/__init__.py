"""The ``moaplan`` command: a thin argparse layer over the library API.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its
parser and sets ``run=<function(args) -> int>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from moaplan import __version__
from moaplan.errors import MoaplanError, one_line

SUBCOMMANDS = ("search", "baseline", "profile", "eval", "generate", "show", "convert",
               "compare-scorers", "influence")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the usage first): bad input gives one
    line and status 2, as everywhere else."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moaplan",
        description="Per-head sparse attention plans for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"moaplan {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"moaplan.cli.{name.replace('-', '_')}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own bars say what is happening
    # The hub client logs each failed request before the error we turn into one line.
    hub_logging.set_verbosity_error()
    try:
        return int(args.run(args) or 0)
    except MoaplanError as err:
        print(f"moaplan {args.command}: error: {one_line(err, 1000)}", file=sys.stderr)
        return 2
    except MemoryError:
        # Lengths and allocations are checked first; this is what no check could foresee.
        print(f"moaplan {args.command}: error: out of memory; try shorter lengths, fewer "
              "samples or a smaller batch", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moaplan {args.command}: interrupted", file=sys.stderr)
        return 130
