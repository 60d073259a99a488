"""RGB <-> YCbCr (ITU-R BT.601 full range, as in JPEG), on float arrays in [0, 1].

The one copy of MedFusion's colour handling: the bundle's standalone inference uses it, and the
``medfusion`` core loads this same file as ``medfusion.color`` (NumPy only, no imports of either).

Pseudo-colour PET/SPECT inputs are fused through their luminance Y; their chroma (Cb, Cr) is put
back afterwards so the result keeps the colour map. Cb and Cr are stored offset by 0.5, so every
channel lies in [0, 1] and a neutral grey has Cb = Cr = 0.5.
"""

from __future__ import annotations

import numpy as np

_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ],
    dtype=np.float32,
)
_YCBCR_TO_RGB = np.array(
    [
        [1.0, 0.0, 1.402],
        [1.0, -0.344136, -0.714136],
        [1.0, 1.772, 0.0],
    ],
    dtype=np.float32,
)


def is_colour(array: np.ndarray, tolerance: float = 1e-6) -> bool:
    """True for an (H, W, 3) array whose channels differ somewhere (grey stored as RGB is not)."""
    if array.ndim != 3 or array.shape[-1] != 3:
        return False
    channels = array.astype(np.float32, copy=False)
    red, green, blue = channels[..., 0], channels[..., 1], channels[..., 2]
    spread = np.abs(red - green) + np.abs(green - blue)
    return bool(spread.max() > tolerance)


def _mix_channels(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3): each output channel a fixed-order weighted sum of the inputs.

    Written out term by term rather than as ``pixels @ matrix.T``: a BLAS product may sum in an
    order that depends on the thread count and the array's layout, so the same image would get
    a different luminance (by one float32 ulp) in a worker process than in the caller, and an
    8-bit rounding or a metric's threshold could flip. Elementwise float32 arithmetic in a fixed
    order gives the same bits everywhere.
    """
    values = pixels.astype(np.float32, copy=False)
    red, green, blue = values[..., 0], values[..., 1], values[..., 2]
    out = np.empty(values.shape, dtype=np.float32)
    for channel, (w_red, w_green, w_blue) in enumerate(matrix):
        out[..., channel] = red * w_red + green * w_green + blue * w_blue
    return out


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> (..., 3) Y, Cb, Cr in [0, 1] (chroma offset by 0.5)."""
    ycbcr = _mix_channels(rgb, _RGB_TO_YCBCR)
    ycbcr[..., 1:] += np.float32(0.5)
    return ycbcr


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """(..., 3) Y, Cb, Cr in [0, 1] -> (..., 3) RGB clipped to [0, 1]."""
    centred = ycbcr.astype(np.float32, copy=True)
    centred[..., 1:] -= np.float32(0.5)
    return np.clip(_mix_channels(centred, _YCBCR_TO_RGB), 0.0, 1.0)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> (...) Y in [0, 1] (the same bits as ``rgb_to_ycbcr``'s Y)."""
    values = rgb.astype(np.float32, copy=False)
    w_red, w_green, w_blue = _RGB_TO_YCBCR[0]
    return values[..., 0] * w_red + values[..., 1] * w_green + values[..., 2] * w_blue


def merge_chroma(chromas: list[np.ndarray]) -> np.ndarray:
    """Combine the (H, W, 2) chroma planes of several colour inputs into one.

    Each input's chroma offset from neutral is weighted, pixel by pixel, by its own saturation
    (|Cb - 0.5| + |Cr - 0.5|), so the colour input that is most strongly coloured at a pixel
    dominates there, and where no input is coloured the result stays neutral. With one colour
    input this returns its chroma unchanged.
    """
    if len(chromas) == 1:
        return chromas[0].astype(np.float32, copy=True)
    offsets = np.stack([c.astype(np.float32) - 0.5 for c in chromas])  # (N, H, W, 2)
    weights = np.abs(offsets).sum(axis=-1, keepdims=True)  # (N, H, W, 1)
    total = weights.sum(axis=0)
    merged = (weights * offsets).sum(axis=0) / np.maximum(total, 1e-12)
    return (merged + 0.5).astype(np.float32)
