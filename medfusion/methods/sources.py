"""The batch of sources every fusion method takes, checked once and the same way for all.

Why: a method called from Python with the wrong batch used to return something anyway (a
(K, H, W) tensor averaged over the wrong axis, one NaN spreading over most of a CNN's output,
0-255 values saturated to a white image). The engine always hands over what this asks for;
the check costs one pass over the batch (its minimum and maximum; for float32, of its bits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from medfusion.errors import ModelError

MIN_SOURCES = 2
RANGE_TOLERANCE = 1e-4  # values this far outside [0, 1] are rounding, not another scale


def _largest_allowed_float32_bits() -> int:
    """The bits, read as an int32, of the largest float32 within ``1 + RANGE_TOLERANCE``."""
    bound = np.float32(1.0 + RANGE_TOLERANCE)
    if float(bound) > 1.0 + RANGE_TOLERANCE:
        bound = np.nextafter(bound, np.float32(0.0))
    return int(np.array(bound, np.float32).view(np.int32))


# float32 batches are checked on their bits first: a float32 without its sign bit orders as its
# bits read as an int32 (+inf and NaN above every finite number), and an integer minimum and
# maximum take half the time of torch's float aminmax (19 against 40 us for a 512^2 pair on this
# project's 2-core VM: ~2.5 % of the cnn method); batches with a sign bit set (negatives, -0.0)
# or beyond the bound are judged on their float values as before
_FLOAT32_ALLOWED_BITS = _largest_allowed_float32_bits()


def check_sources(batch: Any, method: str) -> None:
    """Raise :class:`ModelError` unless ``batch`` is a floating-point tensor ``(B, K, H, W)``
    with ``B >= 1``, ``K >= 2`` single-channel sources, ``H, W >= 1`` and finite values in
    [0, 1] (within :data:`RANGE_TOLERANCE`)."""
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ModelError(f"{method} expects a (B, K, H, W) batch of sources, got {shape}")
    if batch.shape[1] < MIN_SOURCES:
        raise ModelError(
            f"{method} fuses {MIN_SOURCES} or more single-channel sources, got "
            f"{batch.shape[1]} channel(s); colour inputs must enter as luminance"
        )
    if batch.shape[0] == 0 or batch.shape[2] == 0 or batch.shape[3] == 0:
        raise ModelError(f"{method} got an empty batch {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ModelError(
            f"{method} expects floating-point sources in [0, 1], got {batch.dtype} (scale "
            "integer images by their range first, e.g. uint8 / 255)"
        )
    if batch.dtype == torch.float32 and not batch.is_neg():  # (a negated view has no bits)
        low_bits, high_bits = (int(v) for v in torch.aminmax(batch.view(torch.int32)))
        if low_bits >= 0 and high_bits <= _FLOAT32_ALLOWED_BITS:
            return
    low, high = (float(v) for v in torch.aminmax(batch))  # NaN in, NaN out: caught below
    if not (low >= -RANGE_TOLERANCE and high <= 1.0 + RANGE_TOLERANCE):
        finite = math.isfinite(low) and math.isfinite(high)
        what = f"values from {low:g} to {high:g}" if finite else "NaN or infinite values"
        raise ModelError(f"{method} expects finite sources in [0, 1], got {what}")
