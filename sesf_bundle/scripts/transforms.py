"""Dictionary transform of the SESF bundle: load one source image as its luminance (1, H, W).

The luminance is exactly what ``medfusion`` fuses (its own reader and BT.601 Y for colour
PET/SPECT), so the encoder is trained on the inputs it will see.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform


def load_luminance(path: str) -> np.ndarray:
    """8/16-bit image -> float32 luminance in [0, 1] (colour through BT.601 Y, as medfusion)."""
    from medfusion import color
    from medfusion.io.images import read_image, to_unit_range

    array = read_image(path)
    if color.is_colour(array):
        return np.clip(color.rgb_to_ycbcr(to_unit_range(array))[..., 0], 0.0, 1.0).astype(
            np.float32
        )
    plane = array if array.ndim == 2 else array[..., 0]
    return np.asarray(to_unit_range(plane), dtype=np.float32)


class LoadLuminanced(MapTransform):
    """Replace the path under ``key`` by the image's luminance ``(1, H, W)`` float32 tensor."""

    def __init__(self, key: str = "image") -> None:
        super().__init__(keys=[key])
        self.key = key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[self.key] = torch.from_numpy(load_luminance(str(d[self.key]))[None])
        return d
