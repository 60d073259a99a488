"""Atomic writers for the report's files (Markdown, PNG, CSV, JSON).

A report folder is never left with a half-written file: every write goes through
:func:`medfusion.io.atomic.atomic_output` (temp file beside the target, renamed on success).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from medfusion.io.atomic import OutputSet, atomic_output

logger = logging.getLogger("medfusion")

MANIFEST_NAME = ".medfusion-report-files"  # the files the last report wrote in its folder
_recorders: list[list[Path]] = []  # while replacing_report runs: the files write_bytes wrote


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        Path(temporary).write_bytes(data)
    if _recorders:
        _recorders[-1].append(path)
    return path


@contextmanager
def replacing_report(folder: Path) -> Iterator[Path]:
    """Write a report for ``folder``: yield a temporary folder to write its files into, then
    move them into ``folder`` together (:meth:`medfusion.io.atomic.OutputSet.stage_folder`:
    a new ``folder`` is the temporary one renamed; in an existing one the files are replaced
    and the report's old files are put back if a rename fails). When anything fails nothing of
    the new report is left, and an earlier report in ``folder`` stays as it was.

    After the move, the files that the previous report there wrote (listed in its
    :data:`MANIFEST_NAME`) and this one did not are removed: a smaller run into the same folder
    leaves no stale table, figure or panel beside the new report. Files the reports never wrote
    are left alone."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    before = set(manifest.read_text(encoding="utf-8").splitlines()) if manifest.is_file() else set()
    written: list[Path] = []
    with OutputSet() as outputs:
        staging = outputs.stage_folder(folder)
        _recorders.append(written)
        try:
            yield staging
        finally:
            _recorders.pop()
        now = {path.relative_to(staging).as_posix() for path in written
               if path.is_relative_to(staging)}
        write_text(staging / MANIFEST_NAME, "".join(f"{name}\n" for name in sorted(now)))
    for name in sorted(before - now - {MANIFEST_NAME}):
        stale = folder / name
        if ".." not in Path(name).parts and stale.is_file():
            try:
                stale.unlink()
            except OSError as error:  # the new report is whole; say what is left over
                logger.warning("could not remove %s of the earlier report: %s", stale,
                               error.strerror)


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _clean(value: object) -> object:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: object) -> Path:
    """Write ``data`` as indented, key-sorted JSON (NaN -> null)."""
    return write_text(path, json.dumps(_clean(data), indent=1, sort_keys=True) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Path:
    """Write rows as CSV with the given column order; floats keep full precision (repr)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _format(row.get(c)) for c in columns})
    return write_text(path, buffer.getvalue())


def _format(value: object) -> object:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else value
