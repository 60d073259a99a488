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
their real positions by centimetres) is restacked the same way, always. So is a series whose
slices are shifted in their own planes from one slice to the next (:func:`gantry_tilt`: a CT
taken with the gantry tilted moves the table along the patient's z axis, not along the slice
normal; ITK stacks such slices along the normal and drops the shift, 48 mm over the GE head
CT): every slice is put at its real ImagePositionPatient and the sheared stack resampled onto
a regular orthogonal grid that covers it (as Slicer's "acquisition geometry regularization"
and dcm2niix's gantry-tilt correction do).
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
TILT_TOLERANCE = 0.1  # of the pixel spacing: a slice shifted in its plane by more is resampled
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


def _local_spacing(steps: np.ndarray, i: int, scale: float) -> float | None:
    """Median of the (non-zero) steps around step ``i``, up to :data:`_NEIGHBOURS` on each
    side: the spacing the slices have where step ``i`` is (None without neighbours)."""
    around = np.concatenate([steps[max(0, i - _NEIGHBOURS): i], steps[i + 1: i + 1 + _NEIGHBOURS]])
    around = around[around > 1e-3 * max(scale, 1e-6)]
    return float(np.median(around)) if around.size else None


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
            local = _local_spacing(steps, i, scale)
            if local is not None and step > GAP_FACTOR * local:
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
        # the spacing around each gap (a series may step 4 mm, then 7 mm), not the series'
        scale = float(np.median(steps))
        local = dict.fromkeys(f"{_local_spacing(steps, i, scale):.1f}" for i in gaps[:3])
        where = (f"the slices are {next(iter(local))} mm apart" if len(local) == 1 else
                 f"the slices around them are {' and '.join(local)} mm apart")
        raise InputError(
            f"the DICOM series in {label} has missing slices: {described}{more}, where "
            f"{where}; give the complete series, or --allow-slice-gaps to fuse it on a regular "
            "grid with the gap interpolated"
        )
    logger.warning("%s: missing slices %s%s; interpolating across the gap (--allow-slice-gaps)",
                   label, described, more)
    return True


def gantry_tilt(infos: list[SliceInfo]) -> tuple[float, float] | None:
    """``(tilt in degrees, largest in-plane shift in mm)`` when the slices are shifted in their
    own planes, from one to the next, by more than :data:`TILT_TOLERANCE` of a pixel (their
    ImagePositionPatient values do not move along the slice normal: a gantry tilt); else None
    (positions along the normal, or unknown). The tilt is the angle between the normal and the
    line the positions move along (a least-squares fit over all slices)."""
    normal_positions = slice_positions(infos)
    if normal_positions is None or len(infos) < 2:
        return None
    orientation = np.asarray(infos[0].orientation, dtype=float)
    row, column = orientation[:3], orientation[3:]
    order = np.argsort(normal_positions)
    points = np.array([info.position for info in infos], dtype=float)[order]
    shifts = (points - points[0]) @ np.stack([row, column], axis=1)  # (n, 2) mm, in-plane
    pixel = min(infos[0].spacing) if infos[0].spacing else 1.0
    largest = float(np.linalg.norm(shifts, axis=1).max())
    if largest <= TILT_TOLERANCE * pixel:
        return None
    along = normal_positions[order] - normal_positions[order][0]
    slope = np.linalg.lstsq(along[:, None], shifts, rcond=None)[0][0]  # mm in-plane per mm
    return float(np.degrees(np.arctan(np.linalg.norm(slope)))), largest


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
    lower, upper, weight = _bracket(positions, targets)
    out = np.empty((len(targets), *planes.shape[1:]), dtype=dtype)
    for k in range(len(targets)):
        out[k] = ((1.0 - weight[k]) * planes[lower[k]].astype(dtype)
                  + weight[k] * planes[upper[k]].astype(dtype))
    return out


def _bracket(positions: np.ndarray, targets: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``targets``: the indices of the increasing ``positions`` just below and
    above it, and the weight of the upper one (linear; the end positions held beyond the ends;
    a single position serves every target)."""
    targets = np.asarray(targets, dtype=float)
    if len(positions) < 2:
        zero = np.zeros(len(targets), dtype=int)
        return zero, zero, np.zeros(len(targets))
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = ((targets - positions[lower]) / (positions[upper] - positions[lower])).clip(0, 1)
    return lower, upper, weight


def _translated(plane: np.ndarray, row_offset: float, column_offset: float,
                shape: tuple[int, int], fill: float) -> np.ndarray:
    """``plane`` sampled at (i + ``row_offset``, j + ``column_offset``) for every (i, j) of
    ``shape``, bilinearly (a shift is the same fraction of a pixel everywhere, so four shifted
    windows of the plane), ``fill`` outside it; float32, a few planes of memory."""
    out = np.zeros(shape, dtype=np.float32)
    rows, columns = plane.shape
    bases, fractions = [], []
    for offset in (row_offset, column_offset):
        offset = round(float(offset), 6)  # a whole pixel stays one (no blend with the fill)
        base = int(np.floor(offset))
        bases.append(base)
        fractions.append(offset - base)
    for d_row, w_row in ((0, 1.0 - fractions[0]), (1, fractions[0])):
        for d_column, w_column in ((0, 1.0 - fractions[1]), (1, fractions[1])):
            weight = w_row * w_column
            if weight <= 0.0:
                continue
            a, b = bases[0] + d_row, bases[1] + d_column  # out[i, j] += plane[i + a, j + b]
            i0, i1 = max(0, -a), min(shape[0], rows - a)
            j0, j1 = max(0, -b), min(shape[1], columns - b)
            window = np.full(shape, fill, dtype=np.float32)
            if i0 < i1 and j0 < j1:
                window[i0:i1, j0:j1] = plane[i0 + a: i1 + a, j0 + b: j1 + b]
            out += np.float32(weight) * window
    return out


def _axes(image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image's row, column and slice axes (unit vectors, patient mm)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction[:, 0], direction[:, 1], direction[:, 2]


def restack_regularly(image, infos: list[SliceInfo], label: str,
                      tilt: tuple[float, float] | None = None):
    """Resample a series read by ITK from the files of ``infos`` (in that order, which ITK
    places evenly) onto a regular grid at the slices' real positions: positions measured along
    the image's slice axis, step = the lower quartile of the non-gap steps (the series' finer
    spacing), first plane at the first slice, values linearly interpolated between the two real
    slices around each plane. In-plane spacing and direction are kept.

    Slices shifted in their own planes (:func:`gantry_tilt`) are placed at their real
    ImagePositionPatient: pixel (r, c) of a slice lies at IPP + c * column spacing * row axis +
    r * row spacing * column axis, and each plane of the grid is the two slices around it, each
    shifted (bilinearly) to the grid, linearly blended along the normal; so every voxel holds
    the value at its physical point. The grid keeps the slices' own axes (their rows, columns
    and normal): the shear is then a translation of each slice in its plane, never a rotation
    (rows stay rows, the slice axis the acquisition's, which the engine slices along and a
    derived series maps back to), and only its extent grows, so that every pixel of every slice
    lies inside it (origin at the smallest shift, rows and columns added for the rest); where a
    slice has no data the grid holds the series' minimum (its background). An axial grid along
    the table axis would need a full 3D resampling and a larger box. Memory: the result and a
    few planes besides ITK's image. ``tilt``: :func:`gantry_tilt` of ``infos``, which the
    caller worked out to decide on restacking (None: not tilted); it is said on the log."""
    import SimpleITK as sitk

    row_axis, column_axis, axis = _axes(image)
    points = np.array([info.position for info in infos], dtype=float)
    positions = points @ axis
    if np.any(np.diff(positions) <= 0):
        raise InputError(f"cannot order the slices of the DICOM series in {label} by position")
    steps = np.diff(positions)
    regular = np.delete(steps, find_gaps(positions)[0])
    # the finer spacing of the series (its lower quartile step), so no region is thinned out
    step = float(np.percentile(regular, 25)) if regular.size else float(np.median(steps))
    # planes up to the last slice or just past it (its plane held there: planes_at), so the
    # grid holds every slice; a remainder under 5 % of a step is rounding, not a plane
    count = int(np.ceil((positions[-1] - positions[0]) / step - 0.05)) + 1
    grid = positions[0] + step * np.arange(count)
    source = sitk.GetArrayViewFromImage(image)  # (z, y, x), z in position order
    spacing = list(image.GetSpacing())
    if tilt is None:
        regular = sitk.GetImageFromArray(planes_at(source, positions, grid, np.float32))
        origin = image.GetOrigin()
    else:
        # each slice's shift from the grid's origin, in pixels (>= 0): along rows, columns
        along_rows = points @ column_axis
        along_columns = points @ row_axis
        shift_rows = (along_rows - along_rows.min()) / spacing[1]
        shift_columns = (along_columns - along_columns.min()) / spacing[0]
        shape = (source.shape[1] + int(np.ceil(shift_rows.max() - 1e-3)),
                 source.shape[2] + int(np.ceil(shift_columns.max() - 1e-3)))
        fill = float(source.min())
        lower, upper, weight = _bracket(positions, grid)
        from medfusion.io.volumes import writable_array_view  # (volumes imports this module)

        regular = sitk.Image(shape[1], shape[0], count, sitk.sitkFloat32)
        planes = writable_array_view(regular)  # filled in place: one copy of the result
        for k in range(count):
            planes[k] = 0.0
            for index, share in ((lower[k], 1.0 - weight[k]), (upper[k], weight[k])):
                if share > 0.0:
                    planes[k] += np.float32(share) * _translated(
                        source[index], -shift_rows[index], -shift_columns[index], shape, fill)
        del planes
        origin = (along_columns.min() * row_axis + along_rows.min() * column_axis
                  + positions[0] * axis)
        logger.warning(
            "%s has a gantry tilt of %.1f° (its slices shift in their planes by up to %.1f mm, "
            "which ITK's stack drops): resampled onto a regular grid in physical space "
            "(%d x %d x %d voxels)", label, *tilt, shape[1], shape[0], count,
        )
    spacing[2] = step
    regular.SetSpacing(spacing)
    regular.SetOrigin(tuple(float(v) for v in origin))
    regular.SetDirection(image.GetDirection())
    return regular


def sample_at_slices(image, array: np.ndarray, positions, shape: tuple[int, int],
                     dtype: type = np.float64) -> np.ndarray:
    """``array`` (z, y, x: the voxels of ``image``, or of a volume on its grid, e.g. a fused
    one) at the pixels of slices with the image's in-plane axes and spacing, at the given
    ImagePositionPatient values, ``shape`` (rows, columns) each: the inverse of
    :func:`restack_regularly` for a derived series with one instance per reference slice.
    Linear along the slice axis (the end planes held beyond the ends), bilinear in-plane (the
    array's minimum outside it); one output plane in memory at a time besides the result."""
    row_axis, column_axis, axis = _axes(image)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    offsets = np.asarray(positions, dtype=float).reshape(-1, 3) - np.asarray(image.GetOrigin())
    planes = np.asarray(offsets @ axis) / spacing[2]  # continuous plane indices
    lower, upper, weight = _bracket(np.arange(array.shape[0], dtype=float), planes)
    fill = float(np.min(array))
    out = np.empty((len(offsets), *shape), dtype=dtype)
    for k, offset in enumerate(offsets):
        row_offset = float(offset @ column_axis) / spacing[1]
        column_offset = float(offset @ row_axis) / spacing[0]
        plane = np.zeros(shape, dtype=np.float64)
        for index, share in ((lower[k], 1.0 - weight[k]), (upper[k], weight[k])):
            if share > 0.0:
                plane += share * _translated(array[index], row_offset, column_offset, shape,
                                             fill)
        out[k] = plane
    return out
