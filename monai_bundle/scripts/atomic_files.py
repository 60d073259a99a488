"""Write an output file atomically: into a temporary file beside it, renamed over it when complete.

Why: a failed or interrupted run must leave no half-written output and keep an older file
whole. Shared by both bundles (the sesf bundle's ``scripts/atomic_files.py`` is a link to this
file; the wheel and the Slicer install copy its content).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(target: Path, suffix: str) -> Iterator[Path]:
    """A temporary path beside ``target`` ending in ``suffix`` (writers that go by the extension
    pick the right format) to write into; it replaces ``target`` when the block ends without
    an error and is removed in every case."""
    temporary = target.with_name(f".{uuid.uuid4().hex}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
