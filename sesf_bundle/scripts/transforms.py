"""Dictionary transform of the SESF bundle: load one source image as its luminance (1, H, W).

The bundle works on its own (no ``medfusion``): images are read with MONAI's ``LoadImage``
(PIL reader, rows first), scaled by their storage range (8-bit / 255, 16-bit / 65535) and colour
PET/SPECT reduced to their BT.601 luminance Y in float32, in the same fixed order of operations
as MedFusion's ``color.luminance``, so the bundle fuses the very samples the core fuses (a test
checks the bits are equal).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import lru_cache

import numpy as np
import torch
from monai.transforms import MapTransform

BT601 = (np.float32(0.299), np.float32(0.587), np.float32(0.114))  # Y of R, G, B


@lru_cache(maxsize=1)
def _reader():
    from monai.data import PILReader
    from monai.transforms import LoadImage

    return LoadImage(reader=PILReader(reverse_indexing=False), image_only=True, dtype=None)


def load_luminance(path: str) -> np.ndarray:
    """An 8/16-bit 2D image -> (H, W) float32 luminance in [0, 1] (colour: BT.601 Y)."""
    array = np.asarray(_reader()(str(path)))
    if array.dtype.kind in "ui":
        unit = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    else:
        unit = array.astype(np.float32)
    if unit.ndim == 2:
        return unit
    red, green, blue = unit[..., 0], unit[..., 1 % unit.shape[-1]], unit[..., 2 % unit.shape[-1]]
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
