"""Reading and writing 2D images and 3D volumes; every write goes through :func:`atomic_output`.

:func:`input_kind` tells a 2D image path from a 3D volume path by its name, so callers can refuse
a mix of both before reading anything.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def full_suffix(path: str | Path) -> str:
    """Lower-case extension, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def input_kind(path: str | Path) -> str:
    """Return ``"image"`` (2D picture) or ``"volume"`` (3D file or DICOM series folder).

    Decided by the name (a folder named ``x.png`` counts as an image, so reading it says it is
    a folder, not a PNG file). Other names count as volumes: the volume reader refuses unknown
    extensions and content that does not match the extension.
    """
    return "image" if full_suffix(path) in IMAGE_SUFFIXES else "volume"


def stem(path: str | Path) -> str:
    """File name without its (full) extension: ``t1.nii.gz`` -> ``t1``."""
    name = Path(path).name
    suffix = full_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name
