"""The ``medfusion`` command line.

Each sub-command lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
Heavy imports (torch, SimpleITK, pynetdicom) happen inside those functions so ``--help`` is fast.

Exit codes (the same for every sub-command, also in README and ``medfusion --help``):
0 success; 1 a user error (input, data, output, PACS: one line ``medfusion: error: ...``);
2 a usage error (the command line itself: unknown option, missing or malformed argument);
130 cancelled by SIGINT (Ctrl-C); 143 terminated by SIGTERM. On 1, 130 and 143 every partial
output and temporary file is removed first.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from medfusion import __version__
from medfusion.errors import CancelledError, MedFusionError

# Sub-command modules, in the order they appear in ``medfusion --help``.
_COMMAND_MODULES = ("fuse", "register", "metrics", "pacs", "benchmark")

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 user error (bad input, data, output or PACS; one line "
    "'medfusion: error: ...'); 2 usage error (the command line itself); 130 cancelled "
    "(SIGINT, Ctrl-C); 143 terminated (SIGTERM). On 1, 130 and 143 no partial output or "
    "temporary file is left."
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so every cleanup runs (``finally``
    blocks, atomic outputs, temporary folders of retrieved DICOM)."""


class CommandLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, ``medfusion: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("medfusion").strip()  # "fuse", "pacs fuse" or ""
        where = f"{command}: " if command else ""
        self.exit(
            EXIT_USAGE,
            f"medfusion: error: {where}{message} (see {self.prog} --help)\n",
        )


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    import importlib

    parser = CommandLineParser(
        prog="medfusion",
        description="Fuse co-registered CT, MRI, PET and SPECT images and volumes.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"medfusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"medfusion.cli.{name}").register(subparsers)
    return parser


_IMPORT_FRAMES = "<frozen importlib"  # the file name of the import system's frames
_DEFER_S = 0.05  # a signal that lands in an import is delivered again this much later


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` (where a signal handler interrupted) runs inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(_IMPORT_FRAMES):
            return True
        frame = frame.f_back
    return False


def _deliver_later(signum: int) -> None:
    timer = threading.Timer(_DEFER_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


@contextmanager
def signals_raise() -> Iterator[None]:
    """While active, Ctrl-C raises KeyboardInterrupt and SIGTERM :class:`Terminated` in the
    main thread (SIGTERM once: a second is ignored so it cannot interrupt the cleanup of the
    first), except inside an import, where the signal is delivered again 50 ms later.

    Why: an import of torch runs Python code called from its C++ extension (pybind11); an
    exception raised there cannot pass back through it, and the process aborts with a C++
    stack dump (exit -6) instead of cleaning up and exiting 130 or 143. Nothing is written
    while the heavy libraries load, so waiting for the import to end costs nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if _importing(frame):
            _deliver_later(signum)
            return
        raise KeyboardInterrupt

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if _importing(frame):
            _deliver_later(signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run() -> NoReturn:
    """The console entry point (``medfusion``, ``python -m medfusion``): :func:`main`, then exit.

    SIGINT and SIGTERM are ignored outside the command itself (``signals_raise`` puts this back
    when the command ends): once it has returned, its outputs are in place or cleaned up, and a
    signal during the interpreter's teardown (torch's and numba's exit handlers take a moment)
    turned a finished success into exit 143 with the outputs written."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code (see the module doc).

    User errors (:class:`MedFusionError`) print one line ``medfusion: error: ...`` on stderr and
    return 1; usage errors exit 2; Ctrl-C returns 130 and SIGTERM 143, both after cleaning up.
    Anything else is a bug and keeps its traceback.
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
    if not args.verbose:  # the libraries' own notes (torch's cache statistics at exit, ...)
        for library in ("torch", "monai", "numba", "PIL"):
            logging.getLogger(library).setLevel(logging.WARNING)
    try:
        with signals_raise(), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except (CancelledError, KeyboardInterrupt) as interrupt:
        return _interrupted(interrupt)
    except MedFusionError as error:
        print(f"medfusion: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:  # a signal that arrived inside C code, or a bug
        interrupt = _interrupt_in_chain(error)
        if interrupt is None:
            raise
        return _interrupted(interrupt)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Python warnings (a metric undefined on a flat image, say) as one line each, like the
    rest of the command line's messages: ``medfusion: warning: ...`` on stderr, without the
    source file and line that Python's default format adds."""
    text = " ".join(str(message).split())
    print(f"medfusion: warning: {text}", file=sys.stderr)


def _interrupted(interrupt: BaseException) -> int:
    """Report a cancellation (Ctrl-C, the engine's cancel) or SIGTERM; its exit code."""
    if isinstance(interrupt, Terminated):
        print("medfusion: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    print("medfusion: cancelled", file=sys.stderr)
    return EXIT_CANCELLED


def _interrupt_in_chain(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (SIGINT, or :class:`Terminated` for SIGTERM) behind ``error``, if
    any. Why: a signal whose handler raises while C code runs (numba compiling the metrics' loops
    on their first call, for one) surfaces as a SystemError "returned a result with an exception
    set" whose cause is the KeyboardInterrupt; that is still a cancellation, not a bug."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
