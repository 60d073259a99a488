"""The metric registry and the table calls: ``compute_metrics`` (2D) and ``volume_metrics`` (3D).

``METRICS`` maps each canonical name to a :class:`MetricSpec` (function, direction, what it
measures, whether it accepts a target form); ``resolve_name`` maps aliases of the literature
(ENT, STD, GRAD, QAB/F, CE, ...) to canonical names.
"""

from __future__ import annotations

import contextvars
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfusion.metrics import fidelity, information, per_source, statistics, structural
from medfusion.metrics import vif as vif_module
from medfusion.metrics._common import (
    GREY_MAX,
    MetricInputError,
    MetricUndefinedWarning,
    as_image,
    check_data_range,
    check_in_range,
    collect_undefined,
    mark_checked,
    shared_results,
    warn_undefined,
)

TARGET_SUFFIX = "_target"
# compute_metrics splits a table in two groups run on two threads (NumPy and SciPy release the
# GIL in their loops) from this many pixels on; below, a thread costs more than it saves
PARALLEL_PIXELS = 128 * 128
# metrics of the first group: FMI (the costliest, about 40 % of the table alone), the gradient
# statistics and the correlations (CC, SCD); the second group is the windowed / edge family
# (SSIM, Q0, QW, QE, QABF, VIF sharing local means and SSIM maps), the histogram family (EN, MI,
# NMI, QNCIE, H sharing grey levels and joint histograms) and the fidelity metrics. About half
# the CPU time each (measured on a 512² pair, session 23: 65 and 63 ms, one metric at a time).
_FIRST_GROUP = frozenset({"FMI", "AG", "EI", "EOG", "SF", "SD", "MEAN", "CC", "SCD"})


def default_workers() -> int:
    """Threads for metrics: the CPUs this process may use (``MEDFUSION_METRICS_THREADS``)."""
    explicit = os.environ.get("MEDFUSION_METRICS_THREADS")
    if explicit:
        return max(1, int(explicit))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the table.

    ``kind``: ``"image"`` (looks at F alone), ``"fusion"`` (F against the sources, at least one)
    or ``"pair"`` (needs two or more sources). ``direction``: ``"higher"`` or ``"lower"`` is
    better, or ``"none"`` (descriptive, e.g. MEAN; reports should not rank by it).
    ``targetable``: also computed against a target image as ``<NAME>_target``.
    """

    name: str
    func: Callable[..., float]
    kind: str
    direction: str
    description: str
    aliases: tuple[str, ...] = ()
    targetable: bool = False

    @property
    def higher_is_better(self) -> bool | None:
        """True/False for ranked metrics, None for descriptive ones."""
        return None if self.direction == "none" else self.direction == "higher"


def _spec(name: str, func: Callable[..., float], kind: str, direction: str, description: str,
          aliases: tuple[str, ...] = (), targetable: bool = False) -> MetricSpec:
    return MetricSpec(name, func, kind, direction, description, aliases, targetable)


_SPECS = (
    _spec("EN", information.entropy, "image", "higher", "entropy of F (bits)", ("ENT", "IE")),
    _spec("SD", statistics.standard_deviation, "image", "higher", "standard deviation of F",
          ("STD",)),
    _spec("MEAN", statistics.mean_intensity, "image", "none", "mean grey level of F", ("ME",)),
    _spec("SF", statistics.spatial_frequency, "image", "higher", "spatial frequency of F"),
    _spec("AG", statistics.average_gradient, "image", "higher", "average gradient of F",
          ("GRAD",)),
    _spec("EI", statistics.edge_intensity, "image", "higher", "edge intensity (Sobel) of F"),
    _spec("EOG", statistics.energy_of_gradient, "image", "higher", "energy of gradient of F"),
    _spec("MI", information.mutual_information, "fusion", "higher",
          "mutual information, summed over sources", targetable=True),
    _spec("NMI", information.normalized_mutual_information, "fusion", "higher",
          "Hossny's normalised MI"),
    _spec("FMI", information.feature_mutual_information, "fusion", "higher",
          "feature mutual information (pixels, 3x3)", ("FMI_PIXEL",)),
    _spec("QNCIE", information.qncie, "fusion", "higher",
          "nonlinear correlation information entropy", ("NCIE",)),
    _spec("H", information.cross_entropy, "fusion", "lower", "cross-entropy, mean over sources",
          ("CE",)),
    _spec("CC", statistics.correlation_coefficient, "fusion", "higher",
          "correlation coefficient, mean over sources"),
    _spec("SCD", statistics.scd, "pair", "higher", "sum of the correlations of differences"),
    _spec("SSIM", structural.ssim, "fusion", "higher", "SSIM, summed over sources",
          targetable=True),
    _spec("Q0", structural.piella_q0, "fusion", "higher", "Piella's fusion quality index",
          ("Q",)),
    _spec("QW", structural.piella_qw, "fusion", "higher", "Piella's weighted quality index"),
    _spec("QE", structural.piella_qe, "fusion", "higher", "Piella's edge-dependent quality"),
    _spec("QABF", structural.qabf, "fusion", "higher", "Xydeas-Petrovic edge preservation",
          ("QAB/F", "Q_ABF", "Q^AB/F")),
    _spec("QSF_MIN", per_source.weaker_source_share, "fusion", "higher",
          "weaker source's edge preservation min_S Q^{S/F}", ("MIN_QSF", "Q^{S/F}_MIN")),
    _spec("QSF_MAX", per_source.stronger_source_share, "fusion", "higher",
          "stronger source's edge preservation max_S Q^{S/F}", ("MAX_QSF",)),
    _spec("VIF", vif_module.vif, "fusion", "higher", "pixel-domain VIF, summed over sources",
          ("VIFP",)),
    _spec("MSE", fidelity.mse, "fusion", "lower", "mean squared error, mean over sources",
          targetable=True),
    _spec("RMSE", fidelity.rmse, "fusion", "lower", "root mean squared error, mean over sources",
          targetable=True),
    _spec("PSNR", fidelity.psnr, "fusion", "higher", "peak signal-to-noise ratio (dB)",
          targetable=True),
    _spec("REL", fidelity.relative_error, "fusion", "lower", "relative L2 error",
          targetable=True),
)

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
_ALIASES: dict[str, str] = {}
for _s in _SPECS:
    _ALIASES[_s.name] = _s.name
    for _alias in _s.aliases:
        _ALIASES[_alias] = _s.name


def available_metrics() -> list[str]:
    """Canonical metric names in table order."""
    return list(METRICS)


def resolve_name(name: str) -> str:
    """Canonical name of a metric or alias (case-insensitive); ``X_target`` keeps its suffix."""
    key = name.strip().upper()
    suffix = ""
    if key.endswith(TARGET_SUFFIX.upper()):
        key, suffix = key[: -len(TARGET_SUFFIX)], TARGET_SUFFIX
    canonical = _ALIASES.get(key)
    if canonical is None:
        raise MetricInputError(
            f"unknown metric {name!r}; known: {', '.join(available_metrics())}")
    if suffix and not METRICS[canonical].targetable:
        targetable = [n for n, s in METRICS.items() if s.targetable]
        raise MetricInputError(f"{canonical} has no target form; target forms: "
                               f"{', '.join(targetable)}")
    return canonical + suffix


def direction(name: str) -> str:
    """``"higher"``, ``"lower"`` or ``"none"`` for a metric name, alias or ``X_target`` key."""
    return METRICS[resolve_name(name).removesuffix(TARGET_SUFFIX)].direction


def _selection(names: Iterable[str] | None, has_target: bool) -> list[str]:
    if names is None:
        return list(METRICS) + ([n + TARGET_SUFFIX for n, s in METRICS.items() if s.targetable]
                                if has_target else [])
    if isinstance(names, str):
        names = [names]
    selected: list[str] = []
    for name in names:
        canonical = resolve_name(name)
        wanted = [canonical]
        if (has_target and not canonical.endswith(TARGET_SUFFIX)
                and METRICS[canonical].targetable):
            wanted.append(canonical + TARGET_SUFFIX)
        for key in wanted:
            if key not in selected:
                selected.append(key)
    if not has_target and any(key.endswith(TARGET_SUFFIX) for key in selected):
        raise MetricInputError("target-form metrics were requested but no target was given")
    return selected


def compute_metrics(
    fused: object,
    sources: Sequence[object],
    target: object | None = None,
    names: Iterable[str] | None = None,
    data_range: float = GREY_MAX,
    options: dict[str, dict[str, Any]] | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """Compute a named selection of metrics (``names=None``: all) into ``{name: value}``.

    ``fused``, ``sources`` and ``target`` are 2D arrays of one shape on the scale given by
    ``data_range`` (255 for 8-bit images, 1.0 for [0, 1] floats; every metric rescales to the
    0-255 grey scale internally). With a ``target``, targetable metrics (MI, SSIM, MSE, RMSE,
    PSNR, REL) also appear as ``<NAME>_target``: the metric of F against the target alone.
    ``options`` passes convention knobs per metric, e.g. ``{"SSIM": {"reduce": "mean"}}``.
    Undefined values (e.g. CC of a constant image) are NaN with a
    :class:`MetricUndefinedWarning`; bad inputs raise :class:`MetricInputError`, also values
    outside ``0..data_range`` by more than 10 % of it (another scale than the one given).
    ``workers``: threads (default :func:`default_workers`, at most 2 are used: the table is
    split in two groups of about equal cost); the values do not depend on it.
    """
    data_range = check_data_range(data_range)
    fused_image = as_image(fused, "fused image")
    check_in_range(fused_image, data_range, "fused image")
    if isinstance(sources, np.ndarray) and sources.ndim == 2:
        sources = [sources]
    source_images = [as_image(s, f"source {i}") for i, s in enumerate(sources, start=1)]
    if not source_images:
        raise MetricInputError("at least one source image is needed")
    for index, source in enumerate(source_images, start=1):
        if source.shape != fused_image.shape:
            raise MetricInputError(
                f"source {index} has shape {source.shape}, the fused image {fused_image.shape}")
        check_in_range(source, data_range, f"source {index}")
    target_image = None
    if target is not None:
        target_image = as_image(target, "target image")
        if target_image.shape != fused_image.shape:
            raise MetricInputError(
                f"target has shape {target_image.shape}, the fused image {fused_image.shape}")
        check_in_range(target_image, data_range, "target image")
    options = {resolve_name(k): v for k, v in (options or {}).items()}
    selection = _selection(names, target_image is not None)
    # scale once to the 0-255 grey scale so that every metric sees the same array objects and
    # can reuse the others' intermediate maps (shared_results)
    scale = GREY_MAX / data_range
    if scale != 1.0:
        fused_image = fused_image * scale
        source_images = [s * scale for s in source_images]
        target_image = None if target_image is None else target_image * scale
    workers = default_workers() if workers is None else max(1, int(workers))
    with shared_results():
        mark_checked(fused_image, *source_images, *([] if target_image is None else [target_image]))
        first = [key for key in selection if key.removesuffix(TARGET_SUFFIX) in _FIRST_GROUP]
        second = [key for key in selection if key not in first]
        if workers < 2 or not first or not second or fused_image.size < PARALLEL_PIXELS:
            return _compute(fused_image, source_images, target_image, selection, options)
        # the worker thread runs in a copy of this context: same shared-results cache (and
        # undefined-warning collector), so both groups reuse each other's intermediate maps
        context = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(context.run, _compute, fused_image, source_images,
                                target_image, first, options)
            results = _compute(fused_image, source_images, target_image, second, options)
            results.update(other.result())
        return {key: results[key] for key in selection}


def _compute(fused_image: np.ndarray, source_images: list[np.ndarray],
             target_image: np.ndarray | None, selection: list[str],
             options: dict[str, dict[str, Any]]) -> dict[str, float]:
    results: dict[str, float] = {}
    for key in selection:
        base = key.removesuffix(TARGET_SUFFIX)
        spec = METRICS[base]
        kwargs = dict(options.get(base, {}))
        kwargs["data_range"] = GREY_MAX
        if key.endswith(TARGET_SUFFIX):
            results[key] = float(spec.func(fused_image, target_image, **kwargs))
        elif spec.kind == "image":
            results[key] = float(spec.func(fused_image, **kwargs))
        elif spec.kind == "pair" and len(source_images) < 2:
            results[key] = float("nan")
            warn_undefined(f"{key} needs at least two sources; returning NaN", stacklevel=2)
        else:
            results[key] = float(spec.func(fused_image, *source_images, **kwargs))
    return results


def _as_volume(array: object, what: str) -> np.ndarray:
    volume = np.asarray(array)
    if volume.ndim != 3:
        raise MetricInputError(f"{what} must be a 3D array, got {volume.ndim}D shape "
                               f"{volume.shape}")
    return volume


def volume_metrics(
    fused: object,
    sources: Sequence[object],
    axis: int = 0,
    mask: str | np.ndarray | None = None,
    names: Iterable[str] | None = None,
    data_range: float = GREY_MAX,
    target: object | None = None,
    foreground_fraction: float = 0.01,
    options: dict[str, dict[str, Any]] | None = None,
    workers: int | None = None,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Metrics of every 2D slice of 3D volumes along ``axis``, and their mean over slices.

    ``mask=None``: every slice counts. ``mask="foreground"``: only slices where some input
    exceeds ``foreground_fraction * data_range`` (empty slices skipped). A boolean array of the
    volume's shape: only slices with at least one mask voxel. Each per-slice dict holds the
    metric values plus ``"slice"`` (the index); skipped slices are left out. The aggregate is
    the NaN-ignoring mean over the kept slices plus ``"slices"`` (how many were kept). Undefined
    per-slice values (e.g. CC on a blank slice) are NaN; one warning summarises them.
    ``workers``: slices computed at once on threads (default :func:`default_workers`); each
    thread holds one slice's temporaries, and the values do not depend on it.
    """
    fused_volume = _as_volume(fused, "fused volume")
    volumes = [_as_volume(s, f"source {i}") for i, s in enumerate(sources, start=1)]
    if not volumes:
        raise MetricInputError("at least one source volume is needed")
    target_volume = None if target is None else _as_volume(target, "target volume")
    for index, volume in enumerate([*volumes, *([target_volume] if target is not None else [])],
                                   start=1):
        if volume.shape != fused_volume.shape:
            raise MetricInputError(f"volume {index} has shape {volume.shape}, the fused volume "
                                   f"{fused_volume.shape}")
    if not -3 <= axis < 3:
        raise MetricInputError(f"axis must be 0, 1 or 2, got {axis}")
    data_range = check_data_range(data_range)

    def take(volume: np.ndarray, index: int) -> np.ndarray:
        return np.take(volume, index, axis=axis)

    count = fused_volume.shape[axis]
    if mask is None:
        keep = [True] * count
    elif isinstance(mask, str):
        if mask != "foreground":
            raise MetricInputError(f"mask must be None, 'foreground' or an array, got {mask!r}")
        threshold = foreground_fraction * data_range
        keep = [any(float(take(v, i).max()) > threshold for v in [fused_volume, *volumes])
                for i in range(count)]
    else:
        mask_array = np.asarray(mask, dtype=bool)
        if mask_array.shape != fused_volume.shape:
            raise MetricInputError(f"mask has shape {mask_array.shape}, the fused volume "
                                   f"{fused_volume.shape}")
        keep = [bool(take(mask_array, i).any()) for i in range(count)]

    def one_slice(index: int) -> tuple[dict[str, float], int]:
        with collect_undefined() as collected:
            values = compute_metrics(
                take(fused_volume, index), [take(v, index) for v in volumes],
                target=None if target_volume is None else take(target_volume, index),
                names=names, data_range=data_range, options=options, workers=1)
        return {"slice": float(index), **values}, len(collected)

    kept = [index for index in range(count) if keep[index]]
    workers = min(default_workers() if workers is None else max(1, int(workers)), len(kept))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            outcomes = list(pool.map(one_slice, kept))
    else:
        outcomes = [one_slice(index) for index in kept]
    per_slice = [row for row, _ in outcomes]
    undefined_count = sum(n for _, n in outcomes)
    if undefined_count:
        warnings.warn(f"{undefined_count} metric value(s) undefined on some slices (NaN); "
                      "the aggregate ignores them", MetricUndefinedWarning, stacklevel=2)

    keys = [k for k in (per_slice[0] if per_slice else {}) if k != "slice"]
    aggregate: dict[str, float] = {}
    for key in keys:
        column = np.array([row[key] for row in per_slice], dtype=np.float64)
        finite = column[~np.isnan(column)]
        aggregate[key] = float(finite.mean()) if finite.size else float("nan")
    aggregate["slices"] = float(len(per_slice))
    return per_slice, aggregate
