"""Atomic output files: write to a temporary file beside the target, rename on success.

A crash, an error or a cancel never leaves a half-written output, and an existing file at the
target is replaced in one step (``os.replace``), so readers see either the old or the new file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medfusion.errors import OutputError
from medfusion.io import full_suffix
from medfusion.io.formats import check_path_name, output_error

# Longest part of the target's name kept in the temporary file's name (the temporary name adds
# about 20 characters, so a target near the file system's name limit still gets a temp file).
_TEMP_NAME_PART = 120


def check_output_path(path: str | Path) -> Path:
    """Return ``path`` as a Path after checking that it can be created; raise OutputError if not."""
    target = Path(path)
    check_path_name(target, OutputError)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder} (create it first)")
    if target.is_dir():
        raise OutputError(f"output path is a folder, expected a file name: {target}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    return target


def check_not_an_input(output: str | Path, inputs: Iterable[str | Path]) -> Path:
    """:func:`check_output_path`, and refuse an ``output`` that names one of ``inputs`` (also
    through a symbolic link or another spelling of the path): inputs are never overwritten."""
    target = check_output_path(output)
    resolved = target.resolve()
    for path in inputs:
        if Path(path).resolve() == resolved:
            raise OutputError(f"output {target.name} would overwrite an input; choose another name")
    return target


@contextmanager
def atomic_output(
    path: str | Path, verify: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary path in the target's folder with the target's extension.

    Write the output to the yielded path; when the ``with`` block ends without error the file is
    checked (not empty; ``verify(temp_path)`` when given, which reads it back and raises
    :class:`OutputError` if it is incomplete: some writers, such as ITK's, report a full disk
    only on stderr), flushed to disk and renamed onto ``path``. On any exception (including
    KeyboardInterrupt) the temporary file is deleted and the exception propagates; an OSError
    (full disk, quota, ...) becomes a one-line :class:`OutputError`. Raises
    :class:`OutputError` when the folder is missing. The extension is kept (``.nii.gz`` whole)
    because writers pick the format from it.
    """
    target = check_output_path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name[:_TEMP_NAME_PART]}.", suffix=f".tmp{full_suffix(target)}",
            dir=folder,
        )
    except OSError as error:
        raise OutputError(f"cannot create a file in {folder}: {error.strerror}") from error
    os.close(handle)
    temp_path = Path(temporary)
    try:
        try:
            yield temp_path
            if not temp_path.is_file() or temp_path.stat().st_size == 0:
                raise OutputError(f"nothing was written for {target.name}")
            if verify is not None:
                verify(temp_path)
            _flush_to_disk(temp_path)
            _apply_default_permissions(temp_path)
            os.replace(temp_path, target)
        except OSError as error:
            raise output_error(target, error) from error
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _flush_to_disk(path: Path) -> None:
    """fsync the written file, so a full disk or I/O error shows before the rename."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _apply_default_permissions(path: Path) -> None:
    """mkstemp creates 0600 files; give the output the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
