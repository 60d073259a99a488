"""The ``medfusion`` command line.

Each sub-command lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
Heavy imports (torch, SimpleITK, pynetdicom) happen inside those functions so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medfusion import __version__
from medfusion.errors import CancelledError, MedFusionError

# Sub-command modules, in the order they appear in ``medfusion --help``.
_COMMAND_MODULES = ("fuse", "metrics", "pacs", "benchmark")


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="medfusion",
        description="Fuse co-registered CT, MRI, PET and SPECT images and volumes.",
    )
    parser.add_argument("--version", action="version", version=f"medfusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"medfusion.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    User errors (:class:`MedFusionError`) print one line ``medfusion: error: ...`` on stderr and
    return 1; a cancel (Ctrl-C) returns 130. Anything else is a bug and keeps its traceback.
    """
    from medfusion.allocator import keep_freed_memory

    keep_freed_memory()  # large temporaries reuse freed memory: no page fault storm
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="medfusion: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (CancelledError, KeyboardInterrupt):
        print("medfusion: cancelled", file=sys.stderr)
        return 130
    except MedFusionError as error:
        print(f"medfusion: error: {error}", file=sys.stderr)
        return 1
