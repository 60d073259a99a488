"""One-line errors for bad input under ``python -m monai.bundle run ...``.

Shared by MedFusion's two bundles (``sesf_bundle/scripts/one_line_errors.py`` is a link to this
file; wheel, Slicer install and bundle copies take its content). A bad input that a bundle's
own code refuses (a ``ValueError`` or ``OSError`` raised in its ``scripts/`` folder: a missing
``dataset_dir``, one modality, a bad ``block_exponent``) is printed as one line, not as MONAI's
60-240-line "Failed to instantiate component" traceback (``MEDFUSION_TRACEBACK=1`` shows it).
Refusals that both bundles make alike live here too (:func:`check_not_constant`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


def check_not_constant(values: Any, source: str) -> None:
    """``ValueError`` naming ``source`` when its samples (an array) are all one value.

    Why: a constant source (an all-black PET, a volume of zeros) has nothing to fuse; MedFusion
    refuses it (``medfusion.intensity.fit_normaliser``), and the bundles alone fused it into an
    image that looked like a success. The same message as MedFusion's.
    """
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(low) and np.isfinite(high)):  # NaN compared false: it passed through
        raise ValueError(f"{source} has values that are not finite numbers (NaN or "
                         "infinity): there is nothing to fuse")
    if high <= low:
        what = "all zero" if high == 0 else f"constant ({high:g} everywhere)"
        raise ValueError(f"{source} is {what}: there is nothing to fuse")


def refused_input(error: BaseException, scripts: Path) -> BaseException | None:
    """The error a bundle's code raised on purpose (a ``ValueError`` or ``OSError`` whose
    ``raise`` is in the folder ``scripts``) at the root of ``error``'s chain of causes, else
    ``None``."""
    root = error
    seen = {id(root)}
    while (cause := _cause(root)) is not None and id(cause) not in seen:
        root = cause
        seen.add(id(root))
    if not isinstance(root, (ValueError, OSError)) or root.__traceback__ is None:
        return None
    frame = root.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    # the folder, not the file, resolved: a file linked in from the other bundle counts as here
    raised_in = Path(frame.tb_frame.f_code.co_filename).absolute().parent.resolve()
    return root if raised_in == scripts else None


def _cause(error: BaseException) -> BaseException | None:
    """What ``error`` was raised from, as Python shows it (``raise ... from None`` hides the
    error being handled)."""
    if error.__cause__ is not None or error.__suppress_context__:
        return error.__cause__
    return error.__context__


def _one_line_hook(previous: ExceptHook, scripts: Path) -> ExceptHook:
    """``sys.excepthook`` that prints a refused input as one line and hands the rest on."""
    def hook(kind: type[BaseException], error: BaseException,
             traceback: TracebackType | None) -> None:
        refused = refused_input(error, scripts)
        if refused is None or os.environ.get("MEDFUSION_TRACEBACK"):
            previous(kind, error, traceback)
            return
        message = " ".join(str(refused).split())
        print(f"medfusion bundle: error: {message} (MEDFUSION_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
    return hook


def _run_by_monai_bundle() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__"


def install_one_line_errors(scripts: Path) -> None:
    """Under ``python -m monai.bundle``, make ``sys.excepthook`` print what the code in the
    folder ``scripts`` refuses as one line (once per process)."""
    if _run_by_monai_bundle() and not getattr(sys.excepthook, "medfusion_bundle", False):
        sys.excepthook = _one_line_hook(sys.excepthook, scripts.resolve())
        sys.excepthook.medfusion_bundle = True  # type: ignore[attr-defined]
