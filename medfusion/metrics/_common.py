"""Shared plumbing of the metrics: input checks, grey-level scaling, local filters, warnings.

Every metric works on the 8-bit grey scale of the field (0-255): inputs arrive in any range
with an explicit ``data_range`` (the value that means white: 255 for 8-bit images, 1.0 for the
engine's [0, 1] floats) and are mapped to ``x * 255 / data_range`` first, so a metric gives the
same number for a uint8 image and for the same image divided by 255 with ``data_range=1``.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from medfusion.errors import InputError
from medfusion.metrics import _compiled

GREY_MAX = 255.0


class MetricInputError(InputError, ValueError):
    """A metric got unusable arrays (wrong ndim, shape mismatch, NaN/inf, bad parameters)."""


class MetricUndefinedWarning(RuntimeWarning):
    """A metric is undefined for these inputs (e.g. a constant image) and returned NaN."""


_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("metrics_shared",
                                                                   default=None)


@contextlib.contextmanager
def shared_results() -> Iterator[None]:
    """Within this block, intermediate maps (local means, variances, SSIM maps) computed by one
    metric are reused by the next for the same arrays (``compute_metrics`` uses it)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared(key: tuple, arrays: tuple[np.ndarray, ...], compute: Callable[[], np.ndarray]):
    """``compute()`` memoised on ``key`` + the identities of ``arrays`` inside
    :func:`shared_results` (the arrays are kept alive so their ids stay unique)."""
    cache = _SHARED.get()
    if cache is None:
        return compute()
    full_key = (*key, *(id(a) for a in arrays))
    hit = cache.get(full_key)
    if hit is None:
        hit = cache[full_key] = (compute(), arrays)
    return hit[0]


_COLLECTED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "metrics_undefined", default=None)


@contextlib.contextmanager
def collect_undefined() -> Iterator[list[str]]:
    """Within this block, "undefined" warnings of the metrics are appended to the yielded list
    instead of being issued. Thread-safe, unlike ``warnings.catch_warnings`` (which swaps the
    process-wide filters): ``volume_metrics`` counts them per slice in worker threads."""
    collected: list[str] = []
    token = _COLLECTED.set(collected)
    try:
        yield collected
    finally:
        _COLLECTED.reset(token)


def warn_undefined(message: str, stacklevel: int = 3) -> None:
    """Issue (or collect, see :func:`collect_undefined`) a :class:`MetricUndefinedWarning`."""
    collected = _COLLECTED.get()
    if collected is not None:
        collected.append(message)
    else:
        warnings.warn(message, MetricUndefinedWarning, stacklevel=stacklevel + 1)


def undefined(metric: str, reason: str) -> float:
    """Warn that ``metric`` is undefined for the given inputs and return NaN."""
    warn_undefined(f"{metric} is undefined: {reason}; returning NaN")
    return float("nan")


def too_small(metric: str, shape: tuple[int, ...], size: int) -> float:
    """NaN + warning for images smaller than the ``size x size`` window a metric needs (a slice
    of a thin volume is valid input; the metric just has no value there)."""
    warn_undefined(f"{metric} is undefined: images of shape {shape} are smaller than its "
                   f"{size}x{size} window; returning NaN")
    return float("nan")


def mark_checked(*arrays: np.ndarray) -> None:
    """Record inside :func:`shared_results` that ``arrays`` are validated 2D float64 arrays
    already, so that :func:`prepare` does not scan them again for every metric."""
    cache = _SHARED.get()
    if cache is not None:
        checked = cache.setdefault(("checked",), {})
        checked.update({id(a): a for a in arrays})


def as_image(array: object, what: str = "image") -> np.ndarray:
    """Return ``array`` as a finite 2D float64 array or raise :class:`MetricInputError`."""
    cache = _SHARED.get()
    if cache is not None and id(array) in cache.get(("checked",), {}):
        return array  # type: ignore[return-value]
    image = np.asarray(array)
    if image.ndim != 2:
        raise MetricInputError(f"{what} must be a 2D array, got {image.ndim}D shape {image.shape}")
    if image.size == 0:
        raise MetricInputError(f"{what} is empty")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise MetricInputError(f"{what} must be real numbers, got dtype {image.dtype}")
    image = image.astype(np.float64, copy=False)
    if not np.isfinite(image).all():
        raise MetricInputError(f"{what} contains NaN or infinite values")
    return image


def check_data_range(data_range: float) -> float:
    """Return ``data_range`` as a positive finite float."""
    value = float(data_range)
    if not np.isfinite(value) or value <= 0:
        raise MetricInputError(f"data_range must be a positive number, got {data_range!r}")
    return value


RANGE_TOLERANCE = 0.1
"""How far (a share of ``data_range``) values may lie outside 0..data_range: noise, rounding and
resampling overshoot, not another scale."""


def check_in_range(image: np.ndarray, data_range: float, what: str) -> None:
    """Refuse an image whose values lie outside ``0..data_range`` (beyond
    :data:`RANGE_TOLERANCE`): 0-255 data scored with ``data_range=1`` would be clipped into the
    histograms and give numbers that look plausible but mean nothing."""
    low, high = float(image.min()), float(image.max())
    margin = RANGE_TOLERANCE * data_range
    if low < -margin or high > data_range + margin:
        raise MetricInputError(
            f"{what} has values {low:.4g}..{high:.4g}, outside data_range 0..{data_range:g}; "
            "give the data_range of its scale (255 for 8-bit images, 1.0 for [0, 1] floats)")


def prepare(
    fused: object,
    sources: Sequence[object],
    data_range: float = GREY_MAX,
    min_sources: int = 1,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Validate a fused image and its sources and map all of them to the 0-255 grey scale.

    Metrics that need a minimum size check it themselves and return :func:`too_small`.
    """
    scale = GREY_MAX / check_data_range(data_range)
    image = as_image(fused, "fused image")
    if len(sources) < min_sources:
        raise MetricInputError(
            f"at least {min_sources} source image(s) needed, got {len(sources)}")
    checked = []
    for index, source in enumerate(sources, start=1):
        array = as_image(source, f"source {index}")
        if array.shape != image.shape:
            raise MetricInputError(
                f"source {index} has shape {array.shape}, the fused image {image.shape}")
        checked.append(array * scale if scale != 1.0 else array)
    return (image * scale if scale != 1.0 else image), checked


def grey_levels(image: np.ndarray, bins: int = 256, normalize: bool = False) -> np.ndarray:
    """Quantise a 0-255 image to integer bin indices ``0..bins-1``.

    ``normalize=False``: round to the nearest 8-bit grey level, halves up (what MATLAB's
    ``uint8``/``int16`` conversions in the reference codes do; integer images are unchanged),
    then merge levels into ``bins`` equal-width bins. ``normalize=True``: stretch the image's own
    min..max to 0..255 first (Liu's ``normalize1``, VIFB's MI); a constant image maps to 0.
    """
    if bins < 2 or bins > 65536:
        raise MetricInputError(f"bins must be between 2 and 65536, got {bins}")
    low = high = 0.0
    if normalize:
        low, high = float(image.min()), float(image.max())
        if high == low:  # a constant image maps to 0
            image = np.zeros_like(image)
    # the stretch keeps VIFB/Liu's operation order ((x - min) / (max - min) * 255): ties at .5
    # matter
    return _compiled.grey_levels(np.ascontiguousarray(image), low, high, high > low, bins)


def histogram(levels: np.ndarray, bins: int) -> np.ndarray:
    """Probability of each bin of an integer-level image."""
    counts = _compiled.counts(np.ascontiguousarray(levels).ravel(), bins)
    return counts / counts.sum()


def joint_histogram(levels_a: np.ndarray, levels_b: np.ndarray, bins: int) -> np.ndarray:
    """Joint probability table ``p[a, b]`` of two integer-level images."""
    counts = _compiled.joint_counts(np.ascontiguousarray(levels_a),
                                    np.ascontiguousarray(levels_b), bins)
    return counts / counts.sum()


def entropy_of(p: np.ndarray, base: float = 2.0) -> float:
    """Shannon entropy ``-sum p log p`` of a probability table (zero cells skipped)."""
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(base))


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """1D normalised Gaussian; its outer product is MATLAB's ``fspecial('gaussian', n, sigma)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def filter_valid(image: np.ndarray, kernel: np.ndarray, step: int = 1) -> np.ndarray:
    """Separable correlation of a 2D image with a 1D kernel along both axes, 'valid' part only,
    keeping every ``step``-th row and column (``step=2``: multiscale VIF's downsampling).

    Equals MATLAB ``filter2(outer(k, k), image, 'valid')(1:step:end, 1:step:end)`` (to
    round-off); C-ordered. Compiled (``_compiled.filter_valid``): ~2.5x faster than banded BLAS
    products, and free of the GIL.
    """
    size = kernel.size
    if min(image.shape) < size:
        raise MetricInputError(f"images must be at least {size}x{size} pixels, got {image.shape}")
    return _compiled.filter_valid(np.ascontiguousarray(image, dtype=np.float64),
                                  np.ascontiguousarray(kernel, dtype=np.float64), step)


def pad_border(image: np.ndarray, mode: str) -> np.ndarray:
    """``image`` with a one-pixel border of zeros (``"constant"``) or copies (``"nearest"``)."""
    out = np.empty((image.shape[0] + 2, image.shape[1] + 2))
    out[1:-1, 1:-1] = image
    if mode == "constant":
        out[0] = out[-1] = 0.0
        out[:, 0] = out[:, -1] = 0.0
    else:
        out[0, 1:-1], out[-1, 1:-1] = image[0], image[-1]
        out[:, 0], out[:, -1] = out[:, 1], out[:, -2]
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (MATLAB ``corr2``); NaN when either input is constant."""
    xy, xx, yy = _compiled.centred_products(np.ascontiguousarray(x), np.ascontiguousarray(y),
                                            float(x.mean()), float(y.mean()))
    denominator = np.sqrt(xx * yy)
    if denominator == 0:
        return float("nan")
    return float(xy / denominator)


def reduce_over_sources(values: Sequence[float], reduce: str) -> float:
    """Combine per-source values: ``"sum"`` (VIFB convention) or ``"mean"``."""
    if reduce == "sum":
        return float(np.sum(values))
    if reduce == "mean":
        return float(np.mean(values))
    raise MetricInputError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
