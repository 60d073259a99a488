"""Atomic output files: write to a temporary file beside the target, rename on success.

A crash, an error or a cancel never leaves a half-written output, and an existing file at the
target is replaced in one step (``os.replace``), so readers see either the old or the new file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medfusion.errors import OutputError
from medfusion.io import full_suffix
from medfusion.io.formats import check_path_name, output_error, short_write_cause

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
                raise OutputError(_nothing_written(temp_path, target))
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


def _nothing_written(written: Path, target: Path) -> str:
    """The message for an output its writer left empty, with the cause where it shows (some
    writers, SimpleITK's transform writer among them, fail silently on a full disk)."""
    cause = short_write_cause(written)
    return f"nothing was written for {target.name}" + (f": {cause}" if cause else "")


def _flush_to_disk(path: Path) -> None:
    """fsync the written file, so a full disk or I/O error shows before the rename."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _apply_default_permissions(path: Path, folder: bool = False) -> None:
    """mkstemp creates 0600 files (mkdtemp 0700 folders); give the output the usual
    umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def check_output_folder(folder: str | Path) -> Path:
    """:func:`check_output_path` for a folder of outputs (a report): an existing folder must be
    writable, a new one must be creatable in its (existing, writable) parent; checked for real
    by creating (and removing) a temporary folder there, so that a place where nothing can be
    created (a read-only or pseudo file system) is refused before any work."""
    target = Path(folder)
    if target.is_dir():
        check_path_name(target, OutputError)
        if not os.access(target, os.W_OK):
            raise OutputError(f"output folder is not writable: {target}")
        where = target
    else:
        if target.exists() or target.is_symlink():
            raise OutputError(f"output path is a file, expected a folder: {target}")
        where = target.parent if str(target.parent) else Path(".")
        if where.exists() and not where.is_dir():
            raise OutputError(f"cannot create the output folder {target}: {where} is a file")
        check_output_path(target)
    _quietly(os.rmdir, _make_folder(where, ".medfusion-"))
    return target


class OutputSet:
    """The outputs of one command, written to temporary places and committed together.

    :meth:`stage` returns where to write the output file ``target``: a file of ``target``'s own
    name (writers pick the format from it and name it in their messages) in a private temporary
    folder ``.medfusion-*.tmp`` inside ``target``'s folder (the final rename stays on one file
    system). :meth:`stage_folder` returns a folder to write a whole tree of outputs into.

    As a context manager: when the ``with`` block ends without error every staged output is
    renamed onto its target (:meth:`commit`); when it raises (KeyboardInterrupt and SIGTERM's
    exception included), or when a rename of the commit fails, every temporary is removed and
    the targets are as they were before (:meth:`discard`), so a failed command leaves none of
    its outputs. An OSError becomes a one-line :class:`OutputError`.

    Overwriting: a file that was at a target before is kept (a hard link in the temporary
    folder) until every output is in place; if a later rename fails it is put back, and a target
    the command created is removed. A failed run thus leaves the previous outputs as they were,
    and a successful one replaces each file in one step (readers see the old or the new file).
    Where the file system has no hard links, the old file is moved aside instead, so it is
    briefly absent during the commit. (Only a crash or SIGKILL inside the commit itself, a few
    renames long, can leave a mix, and a ``.medfusion-*.tmp`` folder beside the outputs.)
    """

    def __init__(self) -> None:
        self._staging: dict[Path, Path] = {}  # resolved target folder -> its temporary folder
        self._files: list[tuple[Path, Path]] = []  # (staged file, target)
        self._trees: list[tuple[Path, Path, bool]] = []  # (staged folder, target, it existed)
        self._protected: list[tuple[Path, Path | None]] = []  # (target, the old file kept)
        self._backups = 0

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def stage(self, target: str | Path) -> Path:
        """The path to write the output ``target`` to (checked as by :func:`check_output_path`)."""
        target = check_output_path(target)
        staged = self._staging_folder(target.parent if str(target.parent) else Path("."))
        staged = staged / target.name
        if any(staged == other for other, _ in self._files):
            raise OutputError(f"two outputs would be written to {target}: give each its own name")
        self._files.append((staged, target))
        return staged

    def stage_folder(self, folder: str | Path) -> Path:
        """A temporary folder to write the folder of outputs ``folder`` into: when ``folder``
        does not exist, a sibling renamed onto it by the commit; otherwise one inside it, whose
        files (subfolders kept) replace those of ``folder`` (its other files stay)."""
        target = check_output_folder(folder)
        existed = target.is_dir()
        if existed:
            staged = _make_folder(target, ".medfusion-")
        else:
            parent = target.parent if str(target.parent) else Path(".")
            staged = _make_folder(parent, f".{target.name[:_TEMP_NAME_PART]}.")
        self._staging[staged.resolve()] = staged  # (a folder of its own: all its files move)
        self._trees.append((staged, target, existed))
        return staged

    def protect(self, target: str | Path) -> None:
        """For an output that its writer puts in place itself (atomically) before the commit:
        keep the file now at ``target``, if any, so that a failed command puts it back, and
        remove the new file when there was none."""
        target = Path(target)
        staging = self._staging_folder(target.parent if str(target.parent) else Path("."))
        backup = self._backup_name(target, staging / target.name)
        self._protected.append((target, backup))  # (before the copy: see commit)
        try:
            if backup is not None:
                shutil.copy2(target, backup, follow_symlinks=False)
        except OSError as error:
            raise output_error(target, error) from error

    def commit(self) -> None:
        """Rename every staged output onto its target, all or none (see the class)."""
        placed: list[tuple[Path, Path | None]] = []  # (target, the old file kept aside)
        made: list[Path] = []  # folders the commit created, outermost first
        renamed: list[tuple[Path, Path]] = []  # (folder renamed into place, its staged name)
        current: Path | None = None
        try:
            moves = list(self._files)
            for staged, target, existed in self._trees:
                if existed:
                    moves += [(path, target / path.relative_to(staged))
                              for path in sorted(staged.rglob("*")) if not path.is_dir()]
            for staged, target in moves:
                current = target
                if not staged.is_file() or staged.stat().st_size == 0:
                    raise OutputError(_nothing_written(staged, target))
            for staged, target in moves:
                current = target
                _make_parents(target.parent, made)
                # (recorded before it is done: an interrupt in between still undoes it)
                backup = self._backup_name(target, staged)
                placed.append((target, backup))
                if backup is not None:
                    _set_aside(target, backup)
                os.replace(staged, target)
            for staged, target, existed in self._trees:
                if not existed:
                    current = target
                    _apply_default_permissions(staged, folder=True)
                    renamed.append((target, staged))
                    os.rename(staged, target)
        except BaseException as error:
            for target, staged in reversed(renamed):
                if os.path.lexists(target) and not os.path.lexists(staged):
                    _quietly(os.rename, target, staged)
            _undo(placed, made)
            self.discard()
            if isinstance(error, OSError):
                raise output_error(current or Path("output"), error) from error
            raise
        self._protected.clear()
        self._remove_temporaries()

    def discard(self) -> None:
        """Give up: remove every temporary and put back the files kept by :meth:`protect`."""
        _undo(self._protected, [])
        self._protected.clear()
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for staged in self._staging.values():
            shutil.rmtree(staged, ignore_errors=True)
        self._staging.clear()
        self._files.clear()
        self._trees.clear()

    def _staging_folder(self, folder: Path) -> Path:
        key = folder.resolve()
        if key not in self._staging:
            self._staging[key] = _make_folder(folder, ".medfusion-")
        return self._staging[key]

    def _backup_name(self, target: Path, staged: Path) -> Path | None:
        """Where the file now at ``target`` is kept beside ``staged`` until the commit is done
        (a name no staged output has), or None when there is none (a folder there makes the
        rename fail: nothing to keep)."""
        if not os.path.lexists(target) or target.is_dir():
            return None
        while True:
            self._backups += 1
            backup = staged.parent / f".old-{self._backups}"
            if not os.path.lexists(backup):
                return backup


def _set_aside(target: Path, backup: Path) -> None:
    """Keep the file at ``target`` as ``backup``: a hard link, or where the file system has
    none, the file itself moved there."""
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        os.replace(target, backup)


def _make_folder(parent: Path, prefix: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    except OSError as error:
        raise OutputError(f"cannot create a folder in {parent}: {error.strerror}") from error


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first (what a command
    that creates ``folder`` must remove again when it fails: :func:`remove_empty_folders`)."""
    missing = []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove ``folders`` (deepest first) as long as they are empty: those a failed command
    created (a folder something else wrote into stays, and so do its parents)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _make_parents(folder: Path, made: list[Path]) -> None:
    """Create ``folder`` and its missing parents, adding each to ``made`` (outermost first)."""
    for path in reversed(missing_folders(folder)):
        path.mkdir()
        made.append(path)


def _undo(placed: list[tuple[Path, Path | None]], made: list[Path]) -> None:
    """Put back the old files kept aside, remove the targets that had none and the folders the
    commit created (never a file that was there before the command)."""
    for target, backup in reversed(placed):
        if backup is None:
            if not target.is_dir():
                _quietly(os.unlink, target)
        elif os.path.lexists(backup):
            _quietly(os.replace, backup, target)
        # (a backup never made: the interrupt came first, and the old file is still in place)
    remove_empty_folders(reversed(made))


def _quietly(action: Callable[..., object], *paths: Path) -> None:
    try:
        action(*paths)
    except OSError:
        pass
