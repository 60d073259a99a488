"""Custom code of the MedFusion SESF bundle: auto-encoder, reconstruction loss, image datalist.

``BUNDLE_ROOT`` lets the configs find the bundle folder wherever the command is run from.
"""

from pathlib import Path

BUNDLE_ROOT = str(Path(__file__).resolve().parent.parent)


def bundle_root() -> str:
    """The bundle folder (configs call this through ``_target_`` so it resolves lazily)."""
    return BUNDLE_ROOT
