"""Checks on the slices of one DICOM series folder before ITK stacks them.

ITK's series reader stacks whatever files GDCM lists, evenly spaced: a file GDCM cannot parse
(a slice cut in half) is dropped silently, missing slices close up, and slices of another
modality or size with the same series UID are stacked in. Here every slice header is read with
pydicom (no pixels) and:

- every DICOM file of the folder must be a readable slice of the series, whole;
- the slices must agree on modality, frame of reference, size, orientation, frames per file;
- the slice positions must have no gap (a step over 1.5 times its neighbours' median) and no
  two slices may share a position.

``--allow-slice-gaps`` accepts a gap: :func:`restack_regularly` puts the slices at their real
positions and resamples them (linear, along the slice normal) onto a regular grid. A series
without gaps whose spacing changes (4 mm, then 7 mm: ITK would stack it evenly, slices off
their real positions by centimetres) is restacked the same way, always.
Errors name files, never patient data.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfusion.errors import InputError

logger = logging.getLogger(__name__)

GAP_FACTOR = 1.5  # a step this much larger than its neighbours' median is a gap
_NEIGHBOURS = 3  # steps on each side that define the local spacing
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class SliceInfo:
    """What one file says about its slice (no patient data)."""

    path: Path
    modality: str
    frame_of_reference: str
    rows: int
    columns: int
    frames: int
    orientation: tuple[float, ...]
    position: tuple[float, ...] | None
    spacing: tuple[float, ...] = ()  # PixelSpacing (row, column), mm


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, defer_size=1024)
    except Exception as error:  # pydicom raises many types for a broken file
        raise InputError(
            f"{path.parent.name}/{path.name} is not a readable DICOM slice (corrupt or "
            "truncated file); remove it or give the complete series"
        ) from error


def _check_pixel_data_whole(path: Path, dataset) -> None:
    """Raise InputError when the file ends before the pixel data its header announces."""
    try:
        element = dataset.get_item(_PIXEL_DATA, keep_deferred=True)
    except TypeError:  # pydicom 2 keeps deferred elements raw without being asked
        element = dataset.get_item(_PIXEL_DATA)
    label = f"{path.parent.name}/{path.name}"
    if element is None:
        raise InputError(f"{label} holds no pixel data; remove it from the series folder")
    length = getattr(element, "length", None)
    tell = getattr(element, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return  # encapsulated (compressed) pixel data: GDCM checks its fragments
    if tell + length > path.stat().st_size:
        raise InputError(
            f"{label} is truncated: its pixel data stops at {path.stat().st_size - tell} of "
            f"{length} bytes; give the complete series"
        )
    bits = int(dataset.get("BitsAllocated", 0) or 0)
    expected = (int(dataset.get("Rows", 0)) * int(dataset.get("Columns", 0))
                * int(dataset.get("SamplesPerPixel", 1) or 1)
                * int(dataset.get("NumberOfFrames", 1) or 1) * bits // 8)
    if expected and length < expected:
        raise InputError(
            f"{label} is truncated: it holds {length} of {expected} bytes of pixel data"
        )


def _check_rescale_slope(path: Path, dataset) -> None:
    """Raise InputError for a RescaleSlope of 0 or not a finite number: every pixel of that
    slice would read as the intercept (a blank slice fused as if it were real)."""
    slope = dataset.get("RescaleSlope")
    if slope is None:
        return
    try:
        value = float(slope)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value == 0.0:
        raise InputError(
            f"{path.parent.name}/{path.name} has RescaleSlope {slope}: its pixel values would "
            "all be lost; fix the header or remove the slice"
        )


def _numbers(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and np.all(np.isfinite(numbers)) else None


def read_slice_infos(files: list[str]) -> list[SliceInfo]:
    """Header of every file (checked whole), in the given order."""
    infos = []
    for name in files:
        path = Path(name)
        dataset = _read_header(path)
        _check_pixel_data_whole(path, dataset)
        _check_rescale_slope(path, dataset)
        infos.append(SliceInfo(
            path=path,
            modality=str(dataset.get("Modality", "")),
            frame_of_reference=str(dataset.get("FrameOfReferenceUID", "")),
            rows=int(dataset.get("Rows", 0) or 0),
            columns=int(dataset.get("Columns", 0) or 0),
            frames=int(dataset.get("NumberOfFrames", 1) or 1),
            orientation=_numbers(dataset.get("ImageOrientationPatient"), 6) or (),
            position=_numbers(dataset.get("ImagePositionPatient"), 3),
            spacing=_numbers(dataset.get("PixelSpacing"), 2) or (),
        ))
    return infos


def frame_of_reference(folder: Path) -> str:
    """The FrameOfReferenceUID of the DICOM series in ``folder`` ("" when it has none), from the
    first DICOM file's header (the series was checked to agree on it when it was read)."""
    import pydicom
    from pydicom.misc import is_dicom

    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.name.upper() == "DICOMDIR":
            continue
        try:
            if not is_dicom(path):
                continue
        except OSError:  # unreadable: not a slice of the series (it was read already)
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["FrameOfReferenceUID"])
        except Exception:  # noqa: BLE001 - pydicom raises many kinds; a warning is not worth a failure
            return ""
        return str(header.get("FrameOfReferenceUID", ""))
    return ""


def check_no_stray_files(folder: Path, series_files: list[str]) -> None:
    """Raise InputError when a DICOM file of ``folder`` is not among the series' files (GDCM
    skips files it cannot parse, e.g. a slice cut in half). Non-DICOM files are ignored."""
    from pydicom.misc import is_dicom

    listed = {Path(name).resolve() for name in series_files}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.name.upper() == "DICOMDIR":
            continue
        if path.resolve() in listed:
            continue
        try:
            looks_dicom = path.suffix.lower() == ".dcm" or is_dicom(path)
        except OSError:
            looks_dicom = False
        if looks_dicom:
            _read_header(path)  # raises when unreadable
            raise InputError(
                f"{folder.name}/{path.name} is a DICOM file that ITK cannot read as a slice of "
                "the series (truncated or corrupt); remove it or give the complete series"
            )


_AGREEING = (
    ("modality", "modalities"),
    ("frame_of_reference", "frames of reference"),
    ("frames", "frame counts"),
)


def check_consistent(infos: list[SliceInfo], label: str) -> None:
    """Raise InputError naming the odd files when the slices disagree on what must be one."""
    checks = [*_AGREEING, ("size", "slice sizes"), ("orientation", "orientations"),
              ("spacing", "pixel spacings"), ("placed", "ImagePositionPatient")]
    for field, plural in checks:
        keys = [_key(info, field) for info in infos]
        counts = Counter(keys)
        if len(counts) <= 1:
            continue
        common = counts.most_common(1)[0][0]
        odd = [info.path.name for info, key in zip(infos, keys, strict=True) if key != common]
        shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        values = ", ".join(_show(key) for key in counts)
        raise InputError(
            f"the slices of the DICOM series in {label} differ in their {plural} ({values}): "
            f"odd file(s) {shown}; give one homogeneous series per folder"
        )
    if any(info.frames > 1 for info in infos) and len(infos) > 1:
        raise InputError(
            f"{label} holds several multi-frame DICOM files in one series; give one file"
        )


def _key(info: SliceInfo, field: str):
    if field == "size":
        return (info.columns, info.rows)
    if field in ("orientation", "spacing"):
        return tuple(round(v, 3) for v in getattr(info, field))
    if field == "placed":  # a slice without a position would be stacked at a guessed place
        return "given" if info.position is not None else "missing"
    return getattr(info, field)


def _show(key) -> str:
    if isinstance(key, str) and len(key) > 16:
        return "..." + key[-12:]  # a UID's tail tells them apart and keeps the line short
    if isinstance(key, tuple):
        return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in key) or "none"
    return str(key) or "none"


def slice_positions(infos: list[SliceInfo]) -> np.ndarray | None:
    """Positions (mm) of the slices along their normal, or None when a header lacks them."""
    if not infos or any(info.position is None or not info.orientation for info in infos):
        return None
    orientation = np.asarray(infos[0].orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return np.array([float(np.dot(info.position, normal)) for info in infos])


def find_gaps(positions: np.ndarray) -> tuple[list[int], list[int]]:
    """Indices (into the sorted positions) ``i`` whose step to ``i + 1`` is a gap, and those
    whose position equals the next one's. Steps are compared with their neighbours' median, so
    a series with two regular spacings (4 mm then 7 mm) has no gap."""
    steps = np.diff(np.sort(positions))
    scale = float(np.median(steps)) if steps.size else 0.0
    duplicates = [i for i, step in enumerate(steps) if step <= 1e-3 * max(scale, 1e-6)]
    gaps = []
    if steps.size >= 2:
        for i, step in enumerate(steps):
            around = np.concatenate(
                [steps[max(0, i - _NEIGHBOURS): i], steps[i + 1: i + 1 + _NEIGHBOURS]]
            )
            around = around[around > 1e-3 * max(scale, 1e-6)]
            if around.size and step > GAP_FACTOR * float(np.median(around)):
                gaps.append(i)
    return gaps, duplicates


def check_positions(infos: list[SliceInfo], label: str, allow_gaps: bool) -> bool:
    """Raise InputError for slices at one position, or a gap unless ``allow_gaps``.

    Returns True when there is a gap that is allowed (the caller restacks the volume).
    """
    positions = slice_positions(infos)
    if positions is None or len(infos) < 2:
        return False
    order = np.argsort(positions)
    ordered = positions[order]
    names = [infos[i].path.name for i in order]
    gaps, duplicates = find_gaps(ordered)
    if duplicates:
        i = duplicates[0]
        raise InputError(
            f"{names[i]} and {names[i + 1]} in {label} lie at the same slice position "
            f"({ordered[i]:.2f} mm): two series or frames mixed in one folder?"
        )
    if not gaps:
        return False
    steps = np.diff(ordered)
    described = "; ".join(
        f"between {names[i]} and {names[i + 1]} ({ordered[i]:.1f} to {ordered[i + 1]:.1f} mm, "
        f"{steps[i]:.1f} mm apart)" for i in gaps[:3]
    )
    more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
    if not allow_gaps:
        raise InputError(
            f"the DICOM series in {label} has missing slices: {described}{more}, where the "
            f"slices are {float(np.median(steps)):.1f} mm apart; give the complete series, or "
            "--allow-slice-gaps to fuse it on a regular grid with the gap interpolated"
        )
    logger.warning("%s: missing slices %s%s; interpolating across the gap (--allow-slice-gaps)",
                   label, described, more)
    return True


UNEVEN_TOLERANCE = 0.1  # of the mean step: how far ITK's even placement may move a slice


def uneven_spacing(infos: list[SliceInfo]) -> tuple[float, float, float] | None:
    """``(smallest step, largest step, worst misplacement)`` in mm when the slices are so
    unevenly spaced that ITK's stack, which places them evenly at the mean step, would put a
    slice more than :data:`UNEVEN_TOLERANCE` of that step from its real position; else None
    (a regular series, or positions unknown)."""
    positions = slice_positions(infos)
    if positions is None or len(infos) < 3:
        return None
    ordered = np.sort(positions)
    even = np.linspace(ordered[0], ordered[-1], ordered.size)
    worst = float(np.abs(ordered - even).max())
    steps = np.diff(ordered)
    if worst <= UNEVEN_TOLERANCE * float(steps.mean()):
        return None
    return float(steps.min()), float(steps.max()), worst


def planes_at(planes: np.ndarray, positions: np.ndarray, targets: np.ndarray,
              dtype: type = np.float64) -> np.ndarray:
    """``planes`` (n >= 2, rows, columns), taken at the increasing ``positions`` (mm), linearly
    interpolated at each of ``targets`` (the end planes held beyond the ends), as ``dtype``:
    one plane in memory at a time besides the result."""
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((targets - positions[lower]) / (positions[upper] - positions[lower])).clip(0, 1)
    out = np.empty((len(targets), *planes.shape[1:]), dtype=dtype)
    for k in range(len(targets)):
        out[k] = ((1.0 - weight[k]) * planes[lower[k]].astype(dtype)
                  + weight[k] * planes[upper[k]].astype(dtype))
    return out


def restack_regularly(image, infos: list[SliceInfo], label: str):
    """Resample a series read by ITK from the files of ``infos`` (in that order, which ITK
    places evenly) onto a regular grid at the slices' real positions: positions measured along
    the image's slice axis, step = the lower quartile of the non-gap steps (the series' finer
    spacing), first plane at the first slice, values linearly interpolated between the two real
    slices around each plane. In-plane spacing, origin and direction are kept."""
    import SimpleITK as sitk

    axis = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = np.array([float(np.dot(info.position, axis)) for info in infos])
    if np.any(np.diff(positions) <= 0):
        raise InputError(f"cannot order the slices of the DICOM series in {label} by position")
    steps = np.diff(positions)
    regular = np.delete(steps, find_gaps(positions)[0])
    # the finer spacing of the series (its lower quartile step), so no region is thinned out
    step = float(np.percentile(regular, 25)) if regular.size else float(np.median(steps))
    count = int(round((positions[-1] - positions[0]) / step)) + 1
    grid = positions[0] + step * np.arange(count)
    source = sitk.GetArrayViewFromImage(image)  # (z, y, x), z in position order
    regular = sitk.GetImageFromArray(planes_at(source, positions, grid, np.float32))
    spacing = list(image.GetSpacing())
    spacing[2] = step
    regular.SetSpacing(spacing)
    regular.SetOrigin(image.GetOrigin())
    regular.SetDirection(image.GetDirection())
    return regular
