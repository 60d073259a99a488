"""Physical-space geometry: compare grids, check overlap, resample onto the reference grid.

Inputs are co-registered in scanner/patient space but may sit on different voxel grids (another
size, spacing, origin or axis order/flip). Everything is compared in physical millimetres, never
by array shape, and a moving volume is resampled once onto the reference grid (linear
interpolation, identity transform). Volumes whose physical extents do not overlap are refused.
"""

from __future__ import annotations

import logging

import numpy as np

from medfusion.errors import GeometryError

logger = logging.getLogger(__name__)

AXES = ("axial", "coronal", "sagittal")
# Row of the LPS direction matrix that each anatomical slicing axis is normal to.
_AXIS_ROW = {"sagittal": 0, "coronal": 1, "axial": 2}


def same_grid(reference, moving, tolerance: float = 1e-4) -> bool:
    """True when both images have the same size and, within ``tolerance``, spacing, origin and
    direction (so their voxels coincide)."""
    if tuple(reference.GetSize()) != tuple(moving.GetSize()):
        return False
    scale = max(max(reference.GetSpacing()), 1e-6)
    return bool(
        np.allclose(reference.GetSpacing(), moving.GetSpacing(), atol=tolerance * scale)
        and np.allclose(reference.GetOrigin(), moving.GetOrigin(), atol=tolerance * scale * 10)
        and np.allclose(reference.GetDirection(), moving.GetDirection(), atol=tolerance)
    )


def grid_differences(reference, moving, tolerance: float = 1e-4) -> list[str]:
    """Names of the grid properties that differ: size, spacing, origin, direction."""
    pairs = {
        "size": (reference.GetSize(), moving.GetSize()),
        "spacing": (reference.GetSpacing(), moving.GetSpacing()),
        "origin": (reference.GetOrigin(), moving.GetOrigin()),
        "direction": (reference.GetDirection(), moving.GetDirection()),
    }
    return [name for name, (a, b) in pairs.items() if not np.allclose(a, b, atol=tolerance)]


def physical_bounds(image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (min, max) corners in mm of the box enclosing every voxel of ``image``."""
    size = np.asarray(image.GetSize(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    corners = np.array(
        [[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
         for k in (-0.5, size[2] - 0.5)]
    )
    points = origin + (corners * spacing) @ direction.T
    return points.min(axis=0), points.max(axis=0)


def overlap_fraction(reference, moving) -> float:
    """Fraction of the reference's bounding box covered by the moving image's bounding box."""
    ref_low, ref_high = physical_bounds(reference)
    mov_low, mov_high = physical_bounds(moving)
    extent = np.clip(np.minimum(ref_high, mov_high) - np.maximum(ref_low, mov_low), 0, None)
    ref_extent = np.maximum(ref_high - ref_low, 1e-9)
    return float(np.prod(extent / ref_extent))


def align_to_reference(reference, moving, label: str = "input"):
    """Return ``moving`` on the reference grid: itself when the grids match, else resampled.

    Says on the log (stderr in the CLI) when it resamples; raises :class:`GeometryError` when
    the physical extents do not overlap. The resampled volume is float32 (integer output would
    truncate interpolated values); points outside the moving volume get its minimum value, i.e.
    its background.
    """
    import SimpleITK as sitk

    if same_grid(reference, moving):
        return moving
    coverage = overlap_fraction(reference, moving)
    if coverage <= 1e-3:
        low, high = physical_bounds(moving)
        ref_low, ref_high = physical_bounds(reference)
        raise GeometryError(
            f"{label} does not overlap the reference in physical space "
            f"({_box(low, high)} vs {_box(ref_low, ref_high)}); are they co-registered?"
        )
    logger.info(
        "%s is on another voxel grid than the reference (different %s): resampling it onto "
        "the reference grid (linear interpolation)",
        label, ", ".join(grid_differences(reference, moving)),
    )
    if coverage < 0.9:
        logger.warning("%s covers only %.0f%% of the reference's extent", label, 100 * coverage)
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(moving)
    return sitk.Resample(
        moving, reference, sitk.Transform(), sitk.sitkLinear, statistics.GetMinimum(),
        sitk.sitkFloat32,
    )


def slicing_axis(image, axis: str) -> int:
    """numpy axis (of the (z, y, x) array) whose slices are ``axis`` planes in patient space.

    The direction matrix (LPS) tells which voxel index axis runs closest to the anatomical
    normal of the requested plane, so an axial slice is axial even for a volume stored
    sagittally or with flipped/rotated axes.
    """
    if axis not in _AXIS_ROW:
        raise GeometryError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(direction[_AXIS_ROW[axis], :])))
    return 2 - index_axis


def check_same_dimensions(shapes: list[tuple[int, ...]], labels: list[str]) -> None:
    """Raise GeometryError unless all 2D shapes (H, W) are equal."""
    first = shapes[0]
    for shape, label in zip(shapes[1:], labels[1:], strict=True):
        if shape != first:
            raise GeometryError(
                f"image sizes differ: {labels[0]} is {first[1]}x{first[0]}, {label} is "
                f"{shape[1]}x{shape[0]}; 2D inputs must be co-registered on the same pixel grid"
            )


def _fmt(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _box(low: np.ndarray, high: np.ndarray) -> str:
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(low, high, strict=True)) + "] mm"


def check_geometry(image, label: str = "input") -> None:
    """Raise GeometryError when a volume's geometry cannot place it in physical space:
    spacing not finite and positive, origin not finite, direction not a finite orthonormal
    matrix (singular, sheared or scaled axes), or no voxel at all."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    dimension = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension)
    if min(image.GetSize()) < 1:
        raise GeometryError(f"{label} has no voxels (size {_fmt(image.GetSize())})")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise GeometryError(
            f"{label} has an unusable voxel spacing ({_fmt(tuple(spacing.tolist()))} mm): every "
            "spacing must be a positive number; fix the file's header"
        )
    if not np.all(np.isfinite(origin)):
        raise GeometryError(f"{label} has a non-finite origin ({_fmt(tuple(origin.tolist()))}); "
                            "fix the file's header")
    if not np.all(np.isfinite(direction)):
        raise GeometryError(f"{label} has a non-finite direction matrix; fix the file's header")
    if not np.allclose(direction.T @ direction, np.eye(dimension), atol=1e-3):
        raise GeometryError(
            f"{label} has a direction matrix that is not orthonormal (singular, sheared or "
            "scaled axes), so its voxels cannot be placed in physical space; fix the file's "
            "header"
        )
