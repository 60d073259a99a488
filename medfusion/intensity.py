"""Per-input intensity normalisation to [0, 1] before fusion.

Policies (one per input, or one for all):

- ``percentile`` (volumes' default): robust window from the 0.5th to the 99.5th percentile of
  the input, estimated once from an evenly strided subsample of at most ~2 million voxels;
  values outside are clipped. Robust to hot spots and outliers (PET, SPECT, MRI).
- ``ct-window``: a CT display window ``(level, width)`` in HU, e.g. ``(40, 80)`` for brain,
  ``(400, 1800)`` for bone: ``(v - (level - width/2)) / width`` clipped. Refused for inputs
  that are not in HU (8-bit grey levels, or no value below -100 HU: no air, no fat).
- ``minmax``: the full range of the input.
- ``none``: values taken as they are (already in [0, 1]; 8/16-bit images scaled by their
  storage range), clipped to [0, 1]. The default for 2D images, which are display-ready. A
  volume with values outside [0, 1] (beyond :data:`NONE_TOLERANCE`) is refused, not clipped.

The fused output is float32 in [0, 1] (volumes) or 8-bit 0..255 (images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfusion.errors import InputError

POLICIES = ("percentile", "ct-window", "minmax", "none")
DEFAULT_PERCENTILES = (0.5, 99.5)
SAMPLE_SIZE = 2_000_000
NONE_TOLERANCE = 0.01  # 'none' accepts values this far outside [0, 1] (interpolation overshoot)


@dataclass(frozen=True)
class Normaliser:
    """Affine map ``(v - low) / (high - low)`` clipped to [0, 1]."""

    low: float
    high: float

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """Normalise a numpy array (any dtype) to float32 [0, 1] (a new array)."""
        out = values.astype(np.float32, copy=True)
        out -= np.float32(self.low)
        out *= np.float32(1.0 / (self.high - self.low))
        np.clip(out, 0.0, 1.0, out=out)
        return out


def parse_ct_window(text: str) -> tuple[float, float]:
    """'40,80' -> (40.0, 80.0); raises InputError for anything else or a width <= 0."""
    try:
        level, width = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--ct-window expects LEVEL,WIDTH in HU (e.g. 40,80), got {text!r}") \
            from None
    if not (np.isfinite(level) and np.isfinite(width)):
        raise InputError(f"--ct-window expects finite numbers LEVEL,WIDTH in HU, got {text!r}")
    if width <= 0:
        raise InputError(f"CT window width must be positive, got {width:g}")
    return level, width


def subsample(values: np.ndarray, size: int = SAMPLE_SIZE) -> np.ndarray:
    """An evenly strided view of at most ~``size`` values (no copy for contiguous arrays)."""
    flat = values.reshape(-1)
    step = max(1, flat.size // size)
    return flat[::step]


def check_finite(values: np.ndarray, label: str) -> None:
    """Raise InputError if a float array holds NaN or infinite values (checked in chunks)."""
    if values.dtype.kind not in "fc":
        return
    flat = values.reshape(-1)
    chunk = 1 << 22
    for start in range(0, flat.size, chunk):
        if not np.isfinite(flat[start : start + chunk]).all():
            raise InputError(
                f"{label} contains NaN or infinite values; fix or mask them first"
            )


HU_AIR_BOUND = -100.0  # a CT in HU holds air (-1000) or fat (-100) somewhere


def check_hounsfield(values: np.ndarray, label: str = "input") -> None:
    """Raise InputError unless ``values`` look like CT numbers in HU, where a CT window means
    something: 8-bit grey levels are not HU, and a CT has air or fat (below -100 HU)."""
    hint = "use --normalise percentile, minmax or none instead of a CT window"
    if values.dtype == np.uint8:
        raise InputError(
            f"{label} holds 8-bit grey levels (0..255), not CT numbers in HU: {hint}"
        )
    lowest = float(np.min(values))
    if lowest > HU_AIR_BOUND:
        raise InputError(
            f"{label} does not look like a CT in HU (its lowest value is {lowest:g}; a CT has "
            f"air or fat below {HU_AIR_BOUND:g} HU): {hint}"
        )


def fit_normaliser(
    values: np.ndarray,
    policy: str = "percentile",
    *,
    label: str = "input",
    ct_window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> Normaliser:
    """Choose the [0, 1] mapping of one input under ``policy`` (see module doc).

    Raises InputError for an unknown policy, a missing CT window, or an input with no contrast
    (constant, e.g. all zero, or constant once a CT window that holds none of its values is
    applied), where fusion has nothing to work with, and for values outside [0, 1] under
    ``none``, which would be clipped.
    """
    if policy not in POLICIES:
        raise InputError(f"unknown normalisation {policy!r}; choose one of {', '.join(POLICIES)}")
    sample = subsample(values)
    low, high = float(sample.min()), float(sample.max())
    if policy == "ct-window":
        if ct_window is None:
            raise InputError("normalisation 'ct-window' needs a window: --ct-window LEVEL,WIDTH")
        check_hounsfield(values, label)
        level, width = ct_window
        window = Normaliser(level - width / 2.0, level + width / 2.0)
        full_low, full_high = float(np.min(values)), float(np.max(values))
        if full_high <= window.low or full_low >= window.high:
            raise InputError(
                f"the CT window {level:g},{width:g} ({window.low:g} to {window.high:g} HU) holds "
                f"none of {label}'s values ({full_low:g} to {full_high:g} HU): it would be "
                "constant, nothing to fuse; choose a window over its tissue"
            )
        return window
    full_low, full_high = float(np.min(values)), float(np.max(values))
    if full_high <= full_low:
        what = "all zero" if full_high == 0 else f"constant ({full_high:g} everywhere)"
        raise InputError(f"{label} is {what}: there is nothing to fuse")
    if policy == "none":
        if full_low < -NONE_TOLERANCE or full_high > 1.0 + NONE_TOLERANCE:
            raise InputError(
                f"{label} holds values from {full_low:g} to {full_high:g}: normalisation "
                "'none' takes values in [0, 1] as they are and would clip the rest; choose "
                "percentile, minmax or ct-window"
            )
        return Normaliser(0.0, 1.0)
    if policy == "percentile":
        low, high = (float(v) for v in np.percentile(sample, percentiles))
        if high > low:
            return Normaliser(low, high)
        # A mostly-constant image (e.g. tiny foreground): fall back to the full range.
    return Normaliser(full_low, full_high)


def policies_for(
    count: int, normalisation: str | list[str] | tuple[str, ...], ct_window=None
) -> list[str]:
    """Expand a single policy or a per-input list into one policy per input."""
    if isinstance(normalisation, str):
        normalisation = [part.strip() for part in normalisation.split(",")]
    policies = list(normalisation)
    if len(policies) == 1:
        policies = policies * count
    if len(policies) != count:
        raise InputError(
            f"give one normalisation for all inputs or one per input ({count}), got {len(policies)}"
        )
    for policy in policies:
        if policy not in POLICIES:
            raise InputError(
                f"unknown normalisation {policy!r}; choose one of {', '.join(POLICIES)}"
            )
        if policy == "ct-window" and ct_window is None:
            raise InputError("normalisation 'ct-window' needs a window: --ct-window LEVEL,WIDTH")
    return policies
