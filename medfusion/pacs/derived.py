"""Build the derived (fused) DICOM series from the reference series and the fused volume.

Each output instance starts as a copy of the reference instance at the same position, so the
patient, study, frame-of-reference and equipment modules, the SOP class and the geometry
(ImagePositionPatient per slice, ImageOrientationPatient, PixelSpacing, SliceThickness) are the
reference's exactly, including gantry tilt and uneven slice spacing. Then:

- private tags, overlays, LUTs, padding values, signatures and old derivation data are dropped;
- new SeriesInstanceUID and SOPInstanceUIDs; ImageType ``DERIVED\\SECONDARY``;
- pixel data: unsigned 16-bit with RescaleSlope/RescaleIntercept chosen so that
  ``stored * slope + intercept`` gives the fused value within ``slope / 2``; the slope is a
  power of ten, so the decimal string is exact;
- SeriesDescription names the modalities and says "not for diagnostic use";
  DerivationDescription, DerivationCodeSequence, SourceImageSequence (the reference slice and the
  nearest slice of each other source) and ReferencedSeriesSequence (their series) say where it
  came from; ContributingEquipmentSequence records MedFusion, the method and the model.

The whole series is built in memory before anything is written or stored.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config as dicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import MAX_VALUE_LEN

from medfusion import __version__
from medfusion.errors import GeometryError, InputError, OutputError
from medfusion.io.dicom_series import sample_at_slices

MAX_STORED = 65535
DESCRIPTION_PREFIX = "MedFusion fusion"
_POSITION_TOLERANCE_MM = 0.05

# Elements that describe the reference's pixels or provenance and would be wrong on the copy.
log = logging.getLogger(__name__)

# Free-text VRs whose over-long values are cut to the maximum length; any other over-long value
# (a code string, number or UID cannot be cut without changing its meaning) is emptied.
_TRIMMABLE_VRS = ("LO", "SH", "ST", "LT")

_DROPPED = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames",
    "LargestImagePixelValue", "SmallestImagePixelValue", "LargestPixelValueInSeries",
    "SmallestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
    "VOILUTSequence", "ModalityLUTSequence", "RescaleType", "PresentationLUTShape",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "PaletteColorLookupTableUID", "IconImageSequence", "RealWorldValueMappingSequence",
    "SourceImageSequence", "DerivationCodeSequence", "DerivationDescription",
    "ReferencedSeriesSequence", "ImageComments", "InstanceCreatorUID",
    "StorageMediaFileSetUID", "DigitalSignaturesSequence", "MACParametersSequence",
    "EncryptedAttributesSequence", "OriginalAttributesSequence", "SUVType",
    "LossyImageCompressionRatio", "LossyImageCompressionMethod", "PixelDataProviderURL",
)  # fmt: skip


@dataclass(frozen=True)
class Provenance:
    """What produced the fused volume, recorded in the derived series."""

    method: str
    model_name: str | None = None
    model_version: str | None = None
    software_version: str = __version__

    def software_versions(self) -> list[str]:
        """Values of SoftwareVersions (LO, one per component, each <= 64 characters)."""
        values = [f"medfusion {self.software_version}", f"method {self.method}"]
        if self.model_name:
            values.append(f"{self.model_name} {self.model_version or ''}".strip())
        return values

    def software_text(self) -> str:
        model = ""
        if self.model_name:
            model = f"; model {self.model_name}"
            if self.model_version:
                model += f" {self.model_version}"
        return f"medfusion {self.software_version}; method {self.method}{model}"


@dataclass(frozen=True)
class Rescale:
    """Linear map from stored unsigned 16-bit values to fused values."""

    slope: float
    intercept: float
    decimals: int

    @property
    def slope_text(self) -> str:
        return _decimal(self.slope, self.decimals)

    @property
    def intercept_text(self) -> str:
        return _decimal(self.intercept, self.decimals)

    def encode(self, values: np.ndarray) -> np.ndarray:
        stored = np.rint((values.astype(np.float64) - self.intercept) / self.slope)
        return np.clip(stored, 0, MAX_STORED).astype(np.uint16)


def choose_rescale(low: float, high: float) -> Rescale:
    """The finest power-of-ten slope that fits ``[low, high]`` into 0..65535 (and 0 if possible).

    A fused volume in [0, 1] gets slope 0.0001 and intercept 0: stored values 0..10000.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError("fused volume contains NaN or infinite values")
    if low >= 0:
        low = 0.0
    span = max(high - low, 1e-12)
    exponent = math.ceil(math.log10(span / MAX_STORED))
    slope = 10.0**exponent
    # Guard the power-of-ten rounding at the edge (span / slope could exceed 65535 by one step).
    if (high - math.floor(low / slope) * slope) / slope > MAX_STORED:
        exponent += 1
        slope = 10.0**exponent
    intercept = math.floor(low / slope) * slope
    return Rescale(slope=slope, intercept=intercept, decimals=max(0, -exponent))


def sort_by_position(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Single-frame instances of one series in slice order along the slice normal (as GDCM
    and SimpleITK order them); raise when they are not one stack of parallel slices."""
    if not datasets:
        raise InputError("the reference series has no instances")
    for ds in datasets:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
            if keyword not in ds:
                raise InputError(f"reference instance without {keyword}: cannot place the slices")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise InputError("multi-frame reference series are not supported; use single-frame")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    for ds in datasets:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation,
                           atol=1e-4):  # fmt: skip
            raise GeometryError("reference series slices have different orientations")
        if (ds.Rows, ds.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise GeometryError("reference series slices have different sizes")
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, _position(ds))))
    distances = np.diff([float(np.dot(normal, _position(ds))) for ds in ordered])
    if len(distances) and float(distances.min()) < 1e-3:
        raise GeometryError("reference series has two slices at the same position")
    return ordered


def build_derived_series(
    reference: Sequence[Dataset],
    fused: Any,
    *,
    others: Sequence[Sequence[Dataset]],
    provenance: Provenance,
    series_number: int | None = None,
    description: str | None = None,
    now: dt.datetime | None = None,
) -> list[Dataset]:
    """Datasets of the derived series, one per reference slice, in slice order.

    ``reference``: headers of every reference instance (pixel data not needed). ``fused``: a
    ``SimpleITK.Image`` on the reference grid (as :func:`medfusion.engine.fuse_volumes` returns)
    or a ``(slices, rows, columns)`` array in the reference's slice order. ``others``: headers of
    the other source series, for the references.
    """
    ordered = sort_by_position(reference)
    array = _fused_array(fused, ordered)
    rescale = choose_rescale(float(array.min()), float(array.max()))
    now = now or dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series_uid = generate_uid()
    modalities = _modalities([ordered, *others])
    first = ordered[0]
    if series_number is None:
        series_number = int(first.get("SeriesNumber", 0) or 0) + 1000
    description = description or series_description(modalities, provenance.method)
    derivation = (
        f"Fusion of {' + '.join(modalities)} series "
        f"{', '.join(str(s[0].SeriesInstanceUID) for s in [ordered, *others])} by "
        f"{provenance.software_text()}. Sources resampled onto the {modalities[0]} reference "
        "grid and normalised; pixel values are fused intensities in [0, 1] "
        "(not physical units). Not for diagnostic use."
    )
    low, high = float(array.min()), float(array.max())
    output = []
    repaired: dict[str, set[str]] = {"trimmed": set(), "emptied": set()}
    for index, (source, plane) in enumerate(zip(ordered, array, strict=True)):
        ds = _clean_copy(source, repaired)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = description
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        image_type = [str(v) for v in ds.get("ImageType", [])]
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:3]]
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = [_code("110001", "DCM", "Image Processing")]
        sources = _source_images(source, others)
        ds.SourceImageSequence = [item for item, _series in sources]
        ds.ReferencedSeriesSequence = _referenced_series(sources)
        ds.ContributingEquipmentSequence = [
            *ds.get("ContributingEquipmentSequence", []),
            _equipment(provenance, now),
        ]
        ds.BurnedInAnnotation = "NO"
        if str(source.get("LossyImageCompression", "00")) != "01":
            ds.LossyImageCompression = "00"
        if ds.get("Modality") == "PT":
            ds.Units = "NONE"  # fused intensities have no physical unit
        _set_pixels(ds, rescale.encode(plane), rescale, low, high)
        ds.file_meta = _file_meta(ds)
        output.append(ds)
    if repaired["trimmed"] or repaired["emptied"]:
        log.debug(
            "reference header values too long for their VR: trimmed %s; emptied %s",
            ", ".join(sorted(repaired["trimmed"])) or "none",
            ", ".join(sorted(repaired["emptied"])) or "none",
        )
    return output


def series_description(modalities: Sequence[str], method: str) -> str:
    """``MedFusion fusion MR+PT (cnn) NOT FOR DIAGNOSTIC USE``, cut to the 64-character LO."""
    text = f"{DESCRIPTION_PREFIX} {'+'.join(modalities)} ({method}) not for diagnostic use"
    return text[:64]


def is_medfusion_series(description: str) -> bool:
    """True for series MedFusion made (how batch runs recognise already-fused studies)."""
    return description.strip().lower().startswith(DESCRIPTION_PREFIX.lower())


def write_series(datasets: Sequence[Dataset], folder: str | os.PathLike[str]) -> list[Path]:
    """Write the series into a new folder, all or nothing (temporary folder, then rename)."""
    target = Path(folder)
    if target.exists():
        raise OutputError(f"output folder already exists: {target} (choose a new one)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder's parent does not exist: {parent}")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        for index, ds in enumerate(datasets):
            ds.save_as(staging / f"{index + 1:05d}.dcm", enforce_file_format=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(target.glob("*.dcm"))


# -- helpers ------------------------------------------------------------------------------


def _position(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.ImagePositionPatient, dtype=float)


def _fused_array(fused: Any, ordered: Sequence[Dataset]) -> np.ndarray:
    rows, columns = int(ordered[0].Rows), int(ordered[0].Columns)
    if isinstance(fused, np.ndarray):
        array = fused
    else:  # SimpleITK.Image on the reference grid
        import SimpleITK as sitk

        if fused.GetDimension() != 3 or fused.GetNumberOfComponentsPerPixel() != 1:
            raise GeometryError("the fused volume must be a 3D scalar image")
        array = sitk.GetArrayFromImage(fused)
        # Plane k is slice k (or the stack reversed) only where every plane starts at its
        # slice's position; otherwise the reference was restacked (uneven spacing, gaps, a
        # gantry tilt), even onto as many planes as it has slices, and each slice is sampled
        # at its real pixels.
        starts = [np.asarray(fused.TransformIndexToPhysicalPoint((0, 0, k)), dtype=float)
                  for k in range(array.shape[0])]
        slices = [_position(ds) for ds in ordered]
        if array.shape == (len(ordered), rows, columns) and _same_points(starts, slices):
            pass
        elif array.shape == (len(ordered), rows, columns) and _same_points(starts[::-1], slices):
            array = array[::-1]  # the reader stacked the slices the other way round
        else:
            array = _planes_at_slices(fused, array, ordered)
    expected = (len(ordered), rows, columns)
    if array.shape != expected:
        raise GeometryError(
            f"fused volume has shape {array.shape}, the reference series {expected} "
            "(slices, rows, columns)"
        )
    if not np.issubdtype(array.dtype, np.number):
        raise InputError("fused volume must hold numbers")
    return np.asarray(array, dtype=np.float64)


def _same_points(points: Sequence[np.ndarray], others: Sequence[np.ndarray]) -> bool:
    return all(np.linalg.norm(a - b) < _POSITION_TOLERANCE_MM
               for a, b in zip(points, others, strict=True))


def _planes_at_slices(fused: Any, array: np.ndarray, ordered: Sequence[Dataset]) -> np.ndarray:
    """The fused volume at the reference slices' pixels, each at its real place (linear along
    the slice axis, bilinear in-plane): the reference was read onto a regular grid of its own
    (``medfusion.io.dicom_series.restack_regularly``: a series with uneven spacing or gaps, or
    sheared by a gantry tilt, on a larger grid), while the derived series has one instance per
    reference slice, at that slice's place."""
    axes = np.asarray(fused.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(fused.GetOrigin(), dtype=float)
    spacing = np.asarray(fused.GetSpacing(), dtype=float)
    rows, columns = int(ordered[0].Rows), int(ordered[0].Columns)
    positions = [_position(ds) for ds in ordered]
    # pixel (0, 0) and (rows - 1, columns - 1) of each slice, in the fused grid's voxels
    first = (np.asarray(positions) - origin) @ axes / spacing
    last = first + [columns - 1, rows - 1, 0]
    extent = np.asarray(array.shape[::-1], dtype=float) - 1
    tolerance = _POSITION_TOLERANCE_MM / spacing
    if (array.shape[0] < 2 or np.any(first < -tolerance)
            or np.any(last > extent + tolerance)):
        raise GeometryError(
            "the fused volume is not on the reference series grid (reference slices lie "
            "outside it)"
        )
    return sample_at_slices(fused, array, positions, (rows, columns))


def _clean_copy(source: Dataset, repaired: dict[str, set[str]]) -> Dataset:
    """A copy of a reference instance without private tags, overlays, the ``_DROPPED``
    attributes, and without values that break their VR's length (see :func:`_repair_lengths`)."""
    with _lenient_reading():
        ds = copy.deepcopy(source)
        ds.remove_private_tags()
        for tag in list(ds.keys()):
            group = tag.group
            if 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF:
                del ds[tag]
        for keyword in _DROPPED:
            if keyword in ds:
                delattr(ds, keyword)
        _repair_lengths(ds, repaired)
    return ds


@contextmanager
def _lenient_reading() -> Iterator[None]:
    """Decode copied header values without pydicom's warnings: bad values are repaired (and
    reported once, at debug level) by :func:`_repair_lengths` instead."""
    settings = dicom_config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = dicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


def _repair_lengths(ds: Dataset, repaired: dict[str, set[str]]) -> None:
    """Cut over-long free-text values (LO, SH, ST, LT) to their VR's maximum and empty other
    over-long values, in ``ds`` and its sequences; note the keywords in ``repaired``."""
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value or []:
                _repair_lengths(item, repaired)
            continue
        limit = MAX_VALUE_LEN.get(element.VR)
        if limit is None or element.value is None:
            continue
        multiple = isinstance(element.value, (list, MultiValue))
        values = list(element.value) if multiple else [element.value]
        if all(len(str(value)) <= limit for value in values):
            continue
        name = element.keyword or str(element.tag)
        if element.VR in _TRIMMABLE_VRS and all(isinstance(v, str) for v in values):
            cut = [value[:limit].rstrip() for value in values]
            element.value = cut if multiple else cut[0]
            repaired["trimmed"].add(name)
        else:  # emptied, not deleted: the attribute may be required (type 2) in its module
            element.value = None
            repaired["emptied"].add(name)


def _set_pixels(ds: Dataset, stored: np.ndarray, rescale: Rescale, low: float,
                high: float) -> None:  # fmt: skip
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = rescale.slope_text
    ds.RescaleIntercept = rescale.intercept_text
    if ds.get("Modality") != "PT":  # PET states its units in Units instead
        ds.RescaleType = "US"  # unspecified: fused intensities, not Hounsfield units
    width = max(high - low, rescale.slope)
    ds.WindowCenter = _decimal(low + width / 2, rescale.decimals + 1)
    ds.WindowWidth = _decimal(width, rescale.decimals + 1)
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype="<u2").tobytes())


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _reference(ds: Dataset, purpose: bool = False) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if purpose:
        item.PurposeOfReferenceCodeSequence = [
            _code("121322", "DCM", "Source image for image processing operation")
        ]
    return item


def _source_images(
    source: Dataset, others: Sequence[Sequence[Dataset]]
) -> list[tuple[Dataset, str]]:
    """(reference item, series UID): the reference slice, then the slice of each other series
    nearest to its plane."""
    chosen = [source]
    orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    here = float(np.dot(normal, _position(source)))
    for series in others:
        placed = [ds for ds in series if "ImagePositionPatient" in ds]
        if placed:
            chosen.append(
                min(placed, key=lambda ds: abs(float(np.dot(normal, _position(ds))) - here))
            )
    return [(_reference(ds, purpose=True), str(ds.SeriesInstanceUID)) for ds in chosen]


def _referenced_series(sources: Sequence[tuple[Dataset, str]]) -> list[Dataset]:
    """Common Instance Reference module: the series of every instance referenced above."""
    by_series: dict[str, list[Dataset]] = {}
    for item, series_uid in sources:
        reference = Dataset()
        reference.ReferencedSOPClassUID = item.ReferencedSOPClassUID
        reference.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
        by_series.setdefault(series_uid, []).append(reference)
    items = []
    for series_uid, references in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedInstanceSequence = references
        items.append(item)
    return items


def _equipment(provenance: Provenance, now: dt.datetime) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [_code("109102", "DCM", "Processing Equipment")]
    item.Manufacturer = "MedFusion"
    item.ManufacturerModelName = (provenance.model_name or f"MedFusion {provenance.method}")[:64]
    item.SoftwareVersions = [value[:64] for value in provenance.software_versions()]
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    description = f"Image fusion ({provenance.method}); not for diagnostic use"
    item.ContributionDescription = description[:64]
    return item


def _modalities(all_series: Sequence[Sequence[Dataset]]) -> list[str]:
    return [str(series[0].get("Modality", "OT") or "OT") for series in all_series]


def _decimal(value: float, decimals: int) -> str:
    """A DS string with at most 16 characters."""
    text = f"{value:.{decimals}f}"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text
