"""Custom code of the MedFusion CNN bundle: network, loss, data transforms, datalist, metrics.

``BUNDLE_ROOT`` lets the configs find the bundle folder wherever the command is run from.
Under ``python -m monai.bundle run ...`` a bad input that this code refuses (a missing
``dataset_dir``, one modality, a bad ``block_exponent``) is printed as one line, not as MONAI's
60-240-line "Failed to instantiate component" traceback (``MEDFUSION_TRACEBACK=1`` shows it;
see ``one_line_errors.py``).
"""

from __future__ import annotations

from pathlib import Path

from .one_line_errors import install_one_line_errors

BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)


def bundle_root() -> str:
    """The bundle folder (configs call this through ``_target_`` so it resolves lazily)."""
    return BUNDLE_ROOT


install_one_line_errors(Path(__file__).resolve().parent)
