"""2D images: PNG, JPEG, TIFF and BMP in, 8-bit PNG/JPEG/TIFF/BMP out.

:func:`read_image` returns the stored samples (greyscale (H, W) or colour (H, W, 3)) in their own
dtype; :func:`to_unit_range` scales them to float32 [0, 1] by the storage range. :func:`write_image`
quantises a [0, 1] float image to 8 bits with rounding and clipping (no wrap-around).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medfusion.errors import InputError, OutputError
from medfusion.io import IMAGE_SUFFIXES, full_suffix
from medfusion.io.atomic import atomic_output
from medfusion.io.formats import check_content_matches_name, check_input_file

_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
                ".bmp": "BMP"}


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image file; return (H, W) or (H, W, 3) samples in the file's dtype.

    Palette and alpha images become RGB (alpha dropped); 16-bit greyscale stays uint16.
    Raises :class:`InputError` for a missing, truncated, corrupt or multi-page file.
    """
    from PIL import Image, UnidentifiedImageError

    source = check_input_file(path)
    check_content_matches_name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if getattr(image, "n_frames", 1) > 1:
                    raise InputError(
                        f"{source.name} holds {image.n_frames} pages; give one 2D image per file"
                    )
                image.load()
                array = _to_array(image)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(
            f"cannot read image {source.name}: not a valid or complete PNG/JPEG/TIFF/BMP file "
            f"({type(error).__name__})"
        ) from error
    if array.ndim == 3 and array.shape[-1] == 3 and _channels_equal(array):
        array = np.ascontiguousarray(array[..., 0])
    return array


def _to_array(image) -> np.ndarray:
    """Convert an opened PIL image to a numpy array of grey or RGB samples."""
    mode = image.mode
    if mode in ("1", "L", "P;L"):
        return np.asarray(image.convert("L"))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16)
    if mode in ("I", "F"):
        return np.asarray(image).astype(np.float32 if mode == "F" else np.int32)
    if mode == "LA":
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _channels_equal(array: np.ndarray) -> bool:
    return bool(np.array_equal(array[..., 0], array[..., 1])
                and np.array_equal(array[..., 1], array[..., 2]))


def to_unit_range(array: np.ndarray) -> np.ndarray:
    """Scale stored samples to float32 [0, 1] by their storage range.

    uint8 / 255, uint16 / 65535; other integer and float images are min-max scaled over the whole
    image (their storage range says nothing about the display range). Constant non-8/16-bit
    images map to 0.
    """
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535.0)
    values = array.astype(np.float32)
    bounds = _min_max_bounds(values, array.dtype.kind == "f")
    if bounds is None:
        return values
    low, high = bounds
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / np.float32(high - low)


def min_max_bounds(array: np.ndarray) -> tuple[float, float] | None:
    """The ``(low, high)`` by which :func:`to_unit_range` min-max scales ``array``; None where
    it scales by the storage range (8/16-bit) or keeps the values (floats already in [0, 1])."""
    if array.dtype in (np.uint8, np.uint16):
        return None
    return _min_max_bounds(array.astype(np.float32), array.dtype.kind == "f")


def _min_max_bounds(values: np.ndarray, is_float: bool) -> tuple[float, float] | None:
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if 0.0 <= low and high <= 1.0 and is_float:
        return None
    return low, high


def to_uint8(array: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 with rounding and clipping (never wraps around)."""
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(np.asarray(array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def check_image_output(path: str | Path) -> str:
    """Return the PIL format name for an output path, or raise OutputError."""
    suffix = full_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise OutputError(
            f"a 2D result must be saved as {'/'.join(IMAGE_SUFFIXES)}, not {Path(path).name}"
        )
    return _PIL_FORMATS[suffix]


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """Write an (H, W) or (H, W, 3) image atomically as 8 bits; floats are taken as [0, 1]."""
    from PIL import Image

    image_format = check_image_output(path)
    data = to_uint8(array)
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] != 3):
        raise OutputError(f"cannot write an array of shape {data.shape} as an image")
    options = {"quality": 95} if image_format == "JPEG" else {}

    def verify(written: Path) -> None:
        _check_written_image(written, data, image_format, Path(path).name)

    with atomic_output(path, verify=verify) as temporary:
        Image.fromarray(data).save(temporary, format=image_format, **options)
    return Path(path)


def _check_written_image(written: Path, data: np.ndarray, image_format: str, name: str) -> None:
    """Decode the written file whole; raise OutputError unless it has the expected size."""
    from PIL import Image

    try:
        with Image.open(written) as image:
            image.load()
            size, fmt = image.size, image.format
    except (OSError, SyntaxError, ValueError) as error:
        raise OutputError(f"{name} was not written completely (disk full?); nothing saved") \
            from error
    if size != (data.shape[1], data.shape[0]) or fmt != image_format:
        raise OutputError(f"{name} was written wrongly ({fmt} {size}); nothing saved")
