"""Load a group's sources, fuse them with one method through the engine, score the result.

The benchmark never fuses or scores by itself: fusion goes through :mod:`medfusion.engine`
(colour through luminance, volumes slice by slice) and scores through
:mod:`medfusion.metrics`. This module only prepares the arrays both sides need and keeps the
conventions in one place:

- 2D sources are float32 in ``[0, 1]`` (grey ``(H, W)`` or colour ``(H, W, 3)``), so
  perturbations act on what the engine reads;
- 3D sources are resampled onto the first source's grid and normalised to ``[0, 1]`` by the
  engine's default policy (robust percentiles) once, then fused with ``normalisation="none"``,
  so clean and perturbed runs share one intensity scale;
- metrics score the fused *luminance* against each source's luminance (``data_range=1``; the
  metrics module maps it to the field's 0-255 grey scale). A 2D fusion is scored as its 8-bit
  file would be (rounded to 1/255, as ``medfusion fuse`` writes it); a 3D fusion as its float
  volume.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfusion.color import luminance
from medfusion.report.dataset import Group

DATA_RANGE = 1.0
VOLUME_AXIS = "axial"


@dataclass(frozen=True)
class MethodSpec:
    """A method as the report names it (``label``), the registry name, and its options."""

    label: str
    name: str
    options: dict = field(default_factory=dict)

    def with_options(self, **options: object) -> MethodSpec:
        """A copy with extra options (e.g. another block size)."""
        return MethodSpec(self.label, self.name, {**self.options, **options})

    def key(self) -> tuple:
        return (self.name, tuple(sorted((k, str(v)) for k, v in self.options.items())))


@dataclass
class LoadedGroup:
    """A group's sources in ``[0, 1]``; volumes also keep the reference grid (SimpleITK)."""

    group: Group
    sources: list[np.ndarray]
    reference: Any = None

    @property
    def luminances(self) -> list[np.ndarray]:
        """What the metrics compare against: grey as is, colour through Y of YCbCr."""
        return [source_luminance(s) for s in self.sources]


@dataclass
class Fusion:
    """One fusion result: luminance in [0, 1] and a display image (RGB or grey)."""

    luminance: np.ndarray
    display: np.ndarray


def source_luminance(image: np.ndarray) -> np.ndarray:
    """Grey images as they are, colour images through Y of YCbCr (float32, [0, 1])."""
    if image.ndim == 3 and image.shape[-1] == 3:
        return luminance(image)
    return image.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=32)
def _cached_method(key: tuple, device: str, options_items: tuple) -> Any:
    from medfusion.methods import get_method

    return get_method(key[0], device=device, **dict(options_items))


def build_method(spec: MethodSpec, device: str) -> Any:
    """The method object for ``spec`` on ``device`` (built once, then reused)."""
    return _cached_method(spec.key(), str(device), tuple(sorted(spec.options.items())))


def load_group(group: Group) -> LoadedGroup:
    """Read a group's sources (2D: float [0, 1]; 3D: on the reference grid, normalised)."""
    if group.kind == "image":
        from medfusion.io.images import read_image, to_unit_range

        return LoadedGroup(group, [to_unit_range(read_image(p)) for p in group.paths])
    import SimpleITK as sitk

    from medfusion import geometry, intensity
    from medfusion.engine import load_volumes, warn_frames_of_reference

    images, labels = load_volumes(list(group.paths))
    warn_frames_of_reference(list(group.paths), labels)  # the report resamples, never registers
    arrays = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        if index > 0:
            image = geometry.align_to_reference(images[0], image, label)
        values = sitk.GetArrayFromImage(image)
        normaliser = intensity.fit_normaliser(values, "percentile", label=label)
        arrays.append(normaliser(values))
    return LoadedGroup(group, arrays, reference=images[0])


def fuse(
    item: LoadedGroup, spec: MethodSpec, device: str, sources: Sequence[np.ndarray] | None = None
) -> Fusion:
    """Fuse the group's sources (or replacement ``sources`` on the same grid) with one method."""
    method = build_method(spec, device)
    sources = list(item.sources if sources is None else sources)
    if item.group.kind == "image":
        from medfusion.engine import fuse_images
        from medfusion.io.images import to_uint8

        result = fuse_images(sources, method=method, device=device)
        # Scored as written to disk (8 bits), as the field scores saved images: sub-grey-level
        # float residue (e.g. 0.001 in a CNN's background) must not count as image content.
        lum = to_uint8(result.luminance).astype(np.float32) / np.float32(255.0)
        display = lum if result.rgb is None else np.asarray(result.rgb, dtype=np.float32)
        return Fusion(lum, display)
    import SimpleITK as sitk

    from medfusion.engine import fuse_volumes

    images = []
    for array in sources:
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(item.reference)
        images.append(image)
    fused = fuse_volumes(
        images[0], images[1:], method=method, axis=VOLUME_AXIS, device=device, normalisation="none"
    )
    lum = sitk.GetArrayFromImage(fused).astype(np.float32)
    return Fusion(lum, lum)


def middle_slice(item: LoadedGroup, volume: np.ndarray) -> np.ndarray:
    """The middle axial slice of a (z, y, x) array on the group's reference grid."""
    from medfusion.geometry import slicing_axis

    axis = slicing_axis(item.reference, VOLUME_AXIS)
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def metric_axis(item: LoadedGroup) -> int | None:
    """None for 2D groups; for volumes the numpy axis of the axial slices the metrics walk."""
    if item.group.kind == "image":
        return None
    from medfusion.geometry import slicing_axis

    return slicing_axis(item.reference, VOLUME_AXIS)


def score_arrays(
    fused: np.ndarray,
    references: Sequence[np.ndarray],
    names: Sequence[str],
    axis: int | None = None,
) -> dict[str, float]:
    """The requested metrics of a fused luminance against the source luminances.

    2D (``axis=None``): :func:`medfusion.metrics.compute_metrics`; 3D: the mean over the
    non-empty slices along ``axis`` from :func:`medfusion.metrics.volume_metrics`. Undefined
    values (a blank image) are NaN, kept in the raw numbers and ignored by the means; their
    warnings are silenced here.
    """
    from medfusion.metrics import MetricUndefinedWarning, compute_metrics, volume_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        if axis is None:
            values = compute_metrics(
                fused, list(references), names=list(names), data_range=DATA_RANGE
            )
        else:
            _, values = volume_metrics(
                fused,
                list(references),
                axis=axis,
                mask="foreground",
                names=list(names),
                data_range=DATA_RANGE,
            )
    return {name: float(values[name]) for name in names}
