"""Dictionary transform of the SESF bundle: load one source image as its luminance (1, H, W).

The bundle works on its own (no ``medfusion``): images are read with Pillow (rows first; one
open for the mode check and the samples), scaled by their storage range (8-bit / 255) and
colour PET/SPECT reduced to their BT.601 luminance Y in float32, in the same fixed order of
operations as MedFusion's ``color.luminance``, so the bundle fuses the very samples the core
fuses (a test checks the bits are equal). Alone it reads 8-bit grey and RGB images (the atlas'
format) and refuses other storage modes (16-bit, palette, alpha, float) with a one-line error
rather than misread them: MedFusion's reader converts those.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

BT601 = (np.float32(0.299), np.float32(0.587), np.float32(0.114))  # Y of R, G, B


READABLE_MODES = ("L", "RGB")  # 8-bit grey and RGB: samples / 255 are the core's


def _check_mode(image: Any, path: str) -> None:
    if image.mode not in READABLE_MODES:
        raise ValueError(f"{path}: the sesf bundle alone reads 8-bit grey or RGB images, not "
                         f"PIL mode {image.mode!r} (convert it, or fuse with medfusion, which "
                         "reads it)")


def source_size(path: str) -> tuple[int, int]:
    """``(H, W)`` of an image :func:`load_luminance` reads (from its header; ValueError for a
    mode it refuses), to check a whole datalist before anything is written."""
    from PIL import Image

    with Image.open(str(path)) as image:
        _check_mode(image, path)
        return image.height, image.width


def load_luminance(path: str) -> np.ndarray:
    """An 8-bit grey or RGB 2D image -> (H, W) float32 luminance in [0, 1] (colour: BT.601 Y)."""
    from PIL import Image

    with Image.open(str(path)) as image:
        _check_mode(image, path)
        array = np.asarray(image)
    unit = array.astype(np.float32) / np.float32(255.0)
    if unit.ndim == 2:
        return unit
    red, green, blue = unit[..., 0], unit[..., 1], unit[..., 2]
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return np.ascontiguousarray(red)  # grey stored as RGB
    return red * BT601[0] + green * BT601[1] + blue * BT601[2]


class LoadLuminanced(MapTransform):
    """Replace the path under ``key`` by the image's luminance ``(1, H, W)`` float32 tensor."""

    def __init__(self, key: str = "image") -> None:
        super().__init__(keys=[key])
        self.key = key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[self.key] = torch.from_numpy(np.clip(load_luminance(str(d[self.key])), 0.0, 1.0)[None])
        return d
