"""DICOM series whose slices are sheared (gantry tilt) and the missing-slice message.

A CT taken with the gantry tilted moves the table along the patient's z axis while the slices
are tilted: each slice's ImagePositionPatient moves along z, not along the slice normal (the
cross product of the ImageOrientationPatient rows), so every slice is also shifted in its own
plane. ITK's stack (and a restack that keeps only the positions along the normal) drops that
shift: the real GE head CT (18.5 degrees) had its last slices 48 mm from where they were taken,
without a word. The reader resamples such a series onto a regular orthogonal grid in physical
space and says so. Real files only: the GE series from ``../shared/data`` and small series
written with pydicom here.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medfusion.errors import InputError
from medfusion.io import dicom_series
from medfusion.io.volumes import read_volume


# --------------------------------------------------------------------------- helpers
def _geometry(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ImagePositionPatient, row direction, column direction, PixelSpacing (row, column))."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return (np.asarray(ds.ImagePositionPatient, dtype=float), iop[:3], iop[3:],
            np.asarray(ds.PixelSpacing, dtype=float))


def _at_pixels_of(image: sitk.Image, ds: pydicom.Dataset) -> np.ndarray:
    """``image`` linearly interpolated at the physical point of every pixel (r, c) of the slice
    ``ds``: IPP + c * column spacing * row direction + r * row spacing * column direction."""
    position, row, column, spacing = _geometry(ds)
    grid = sitk.Image(int(ds.Columns), int(ds.Rows), 1, sitk.sitkFloat32)
    grid.SetOrigin(position.tolist())
    grid.SetSpacing([float(spacing[1]), float(spacing[0]), 1.0])
    grid.SetDirection(np.column_stack([row, column, np.cross(row, column)]).ravel().tolist())
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, np.nan,
                              sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)[0]


def _hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _local_range(plane: np.ndarray) -> np.ndarray:
    """Max - min of each pixel's 3 x 3 neighbourhood (edges: infinite)."""
    out = np.full(plane.shape, np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(plane, (3, 3))
    out[1:-1, 1:-1] = windows.max(axis=(2, 3)) - windows.min(axis=(2, 3))
    return out


def _write_series(folder: Path, positions, row, column, planes: np.ndarray,
                  spacing: float = 1.0) -> Path:
    """A CT series of ``len(planes)`` slices with the given ImagePositionPatient values and
    ImageOrientationPatient (``row``, ``column``), pixels ``planes`` (k, rows, columns) stored
    as unsigned 16-bit with slope 1, intercept 0."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, (position, plane) in enumerate(zip(positions, planes, strict=True)):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "TILT^TEST", "MFTILT0001"
        ds.Modality = "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
        ds.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = plane.astype(np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(folder / f"{k + 1:02d}.dcm", enforce_file_format=True)
    return folder


def _centroid_mm(image: sitk.Image) -> np.ndarray:
    """Physical centroid of the voxel values above the background (the minimum)."""
    array = sitk.GetArrayFromImage(image).astype(float)
    weights = array - array.min()
    z, y, x = np.nonzero(weights)
    index = np.stack([x, y, z], axis=1).astype(float)
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (index * spacing) @ direction.T
    return (points * weights[z, y, x, None]).sum(axis=0) / weights.sum()


# --------------------------------------------------------------------------- the real GE CT
def test_real_tilted_ct_holds_each_slices_pixels_at_their_physical_points(
        ct_dicom_dir: Path, caplog) -> None:
    """The GE series (18.5 degree tilt): at the physical point of pixel (r, c) of a file, the
    volume read holds that file's value. Checked where the file is smooth (3 x 3 range under
    40 HU), since the in-plane shift is interpolated (bilinearly) and so is this check; the
    slices 4 mm apart lie on the 4 mm grid, and 28.dcm (7 mm part) almost on its last plane.
    Before, 14.dcm's pixels were 17 mm and 28.dcm's 48 mm from their places (plane 36 held
    28.dcm's pixels at y = -77.8, z = 142.5 instead of y = -123.5, z = 157.8)."""
    with caplog.at_level(logging.WARNING):
        image = read_volume(ct_dicom_dir)
    assert "ct-head-ge has a gantry tilt of 18.5°" in caplog.text
    assert "resampled onto a regular grid" in caplog.text
    assert "uneven DICOM slice spacing" in caplog.text  # the other note stays
    for name in ("01.dcm", "05.dcm", "10.dcm", "14.dcm", "28.dcm"):
        ds = pydicom.dcmread(ct_dicom_dir / name)
        real = _hounsfield(ds)
        read = _at_pixels_of(image, ds)
        assert not np.isnan(read).any(), f"{name} lies partly outside the volume read"
        smooth = _local_range(real) < 40
        assert smooth.sum() > 20000, name
        error = np.abs(read - real)[smooth]
        assert error.max() < 40, (name, float(error.max()))  # within its 3 x 3 range
        assert np.median(error) < 1, (name, float(np.median(error)))


def test_real_tilted_ct_grid_is_regular_and_covers_every_slice(ct_dicom_dir: Path) -> None:
    """The grid keeps the slices' in-plane axes and their normal as the third axis (4 mm
    apart), with rows added so that every pixel of every slice lies inside it."""
    image = read_volume(ct_dicom_dir)
    first = pydicom.dcmread(ct_dicom_dir / "01.dcm", stop_before_pixels=True)
    position, row, column, spacing = _geometry(first)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], row, atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], column, atol=1e-6)
    np.testing.assert_allclose(direction[:, 2], np.cross(row, column), atol=1e-6)
    assert image.GetSpacing() == pytest.approx((spacing[1], spacing[0], 4.0), abs=0.01)
    columns, rows, planes = image.GetSize()
    assert columns == 512 and planes == 37 and 600 <= rows <= 620  # 48 mm of shift: ~99 rows
    for path in sorted(ct_dicom_dir.glob("*.dcm")):
        position, row, column, spacing = _geometry(pydicom.dcmread(path, stop_before_pixels=True))
        for r in (0, 511):
            for c in (0, 511):
                point = position + c * spacing[1] * row + r * spacing[0] * column
                index = np.asarray(image.TransformPhysicalPointToContinuousIndex(point.tolist()))
                assert np.all(index > -0.5 - 1e-3), (path.name, r, c, index)
                assert np.all(index < np.asarray(image.GetSize()) - 0.5 + 1e-3), (path.name, index)


def test_sample_at_slices_gives_back_the_files(ct_dicom_dir: Path) -> None:
    """:func:`dicom_series.sample_at_slices` (a volume on the restacked grid back at each
    reference slice's pixels, for a derived series) gives back the files' pixels where they lie
    on the grid (the 4 mm part), to the interpolation of a smooth region."""
    image = read_volume(ct_dicom_dir)
    names = ["02.dcm", "09.dcm", "13.dcm"]
    headers = [pydicom.dcmread(ct_dicom_dir / name) for name in names]
    back = dicom_series.sample_at_slices(
        image, sitk.GetArrayViewFromImage(image),
        [np.asarray(ds.ImagePositionPatient, dtype=float) for ds in headers], (512, 512))
    assert back.shape == (3, 512, 512)
    for ds, plane in zip(headers, back, strict=True):
        real = _hounsfield(ds)
        smooth = _local_range(real) < 40
        error = np.abs(plane - real)[smooth]
        assert error.max() < 40 + 1 and np.median(error) < 3, (ds.InstanceNumber, error.max())


# --------------------------------------------------------------------------- synthetic series
TILT = np.radians(20.0)
ROW = np.array([1.0, 0.0, 0.0])
TILTED_COLUMN = np.array([0.0, np.cos(TILT), -np.sin(TILT)])


def _dot_series(folder: Path, column: np.ndarray, dot: tuple[int, int, int]):
    """Seven 24 x 20 slices, 3 mm apart along patient z (as the table moves), background 100,
    one pixel of 1100 at ``dot`` (slice, row, column). Returns the folder and the dot's
    physical point."""
    planes = np.full((7, 24, 20), 100, dtype=np.uint16)
    planes[dot] = 1100
    positions = [np.array([-10.0, -12.0, 3.0 * k]) for k in range(7)]
    k, r, c = dot
    point = positions[k] + c * ROW + r * column
    return _write_series(folder, positions, ROW, column, planes), point


def test_synthetic_tilted_series_puts_a_dot_at_its_physical_point(tmp_path: Path,
                                                                  caplog) -> None:
    """A 20 degree tilt written with pydicom: one bright pixel, whose physical point is known
    from its file's header, is read back there (its interpolated spread keeps its centroid),
    and the value at that point is the dot's. ITK alone stacks the slices along the normal,
    3 mm apart, and put it 4.1 mm off along the column direction and 0.7 mm along the normal."""
    folder, point = _dot_series(tmp_path / "tilted", TILTED_COLUMN, (4, 10, 8))
    with caplog.at_level(logging.WARNING):
        image = read_volume(folder)
    assert "tilted has a gantry tilt of 20.0°" in caplog.text
    assert "resampled onto a regular grid" in caplog.text
    np.testing.assert_allclose(_centroid_mm(image), point, atol=1e-3)
    normal = np.cross(ROW, TILTED_COLUMN)
    assert image.GetSpacing() == pytest.approx((1.0, 1.0, 3.0 * normal[2]), abs=1e-4)
    index = image.TransformPhysicalPointToContinuousIndex(point.tolist())
    assert index[2] == pytest.approx(4.0, abs=1e-4)  # on a plane: only the in-plane shift
    value = sitk.GetArrayFromImage(image)
    i, j = int(round(index[1])), int(round(index[0]))
    assert value[4, i - 1: i + 2, j].sum() - 2 * 100 == pytest.approx(1100, abs=0.5)
    # every pixel of every slice is inside the grid, and the background is kept
    assert image.GetSize()[1] > 24 and value.min() == pytest.approx(100)
    for ds_path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(ds_path)
        read = _at_pixels_of(image, ds)
        assert not np.isnan(read).any()
        if ds.InstanceNumber != 5:  # slices without the dot are flat at 100
            np.testing.assert_allclose(read, 100, atol=1e-3)


def test_untilted_series_is_not_resampled(tmp_path: Path, caplog) -> None:
    """The same series with its slices along their normal (no tilt): ITK's stack as it was,
    voxel for voxel, no note, the dot on its voxel."""
    folder, point = _dot_series(tmp_path / "straight", np.array([0.0, 1.0, 0.0]), (4, 10, 8))
    with caplog.at_level(logging.INFO):
        image = read_volume(folder)
    assert "gantry tilt" not in caplog.text and "resampled" not in caplog.text
    assert image.GetSize() == (20, 24, 7)
    assert image.GetOrigin() == pytest.approx((-10.0, -12.0, 0.0))
    assert image.GetSpacing() == pytest.approx((1.0, 1.0, 3.0))
    array = sitk.GetArrayFromImage(image)
    assert array.dtype != np.float32  # not resampled: ITK's own integer pixels
    assert array[4, 10, 8] == 1100 and np.count_nonzero(array != 100) == 1
    assert image.TransformIndexToPhysicalPoint((8, 10, 4)) == pytest.approx(tuple(point))


def test_tilt_below_a_tenth_of_a_pixel_is_not_resampled(tmp_path: Path, caplog) -> None:
    """Rounded header positions (a shift of hundredths of a millimetre) are not a tilt."""
    planes = np.full((5, 16, 16), 100, dtype=np.uint16)
    positions = [np.array([0.0, 0.01 * (k % 2), 2.0 * k]) for k in range(5)]
    folder = _write_series(tmp_path / "rounded", positions, ROW, np.array([0.0, 1.0, 0.0]),
                           planes)
    with caplog.at_level(logging.INFO):
        image = read_volume(folder)
    assert "gantry tilt" not in caplog.text and image.GetSize() == (16, 16, 5)


# --------------------------------------------------------------------------- missing slice
@pytest.mark.parametrize("removed,neighbours,apart,local", [
    ("04.dcm", ("03.dcm", "05.dcm"), "8.0", "4.0"),
    ("21.dcm", ("20.dcm", "22.dcm"), "14.0", "7.0"),
])
def test_missing_slice_message_quotes_the_local_spacing(
        ct_dicom_dir: Path, tmp_path: Path, removed, neighbours, apart, local) -> None:
    """The GE series is 4 mm apart, then 7 mm: a slice missing from one part is measured against
    the spacing of the slices around it, and the message quotes that spacing (it used to quote
    the series' median step, i.e. the other part's: "8.0 mm apart, where the slices are 7.0 mm
    apart")."""
    folder = tmp_path / "ct"
    shutil.copytree(ct_dicom_dir, folder)
    (folder / removed).unlink()
    with pytest.raises(InputError) as caught:
        read_volume(folder)
    message = str(caught.value)
    assert f"between {neighbours[0]} and {neighbours[1]} (" in message
    assert f"{apart} mm apart), where the slices are {local} mm apart;" in message


def test_a_restacked_series_on_as_many_planes_as_slices_is_derived_at_its_slices(
        tmp_path: Path) -> None:
    """11 slices, 7 steps of 4 mm then 3 of 4.5 mm: the regular 4 mm grid holds every slice
    (the last one 1.5 mm past a whole step was dropped), and a derived series samples the
    volume at each slice's real position. Its plane count used to decide: with as many planes
    as slices, plane k was copied as slice k (slices 8-10 from up to 2.5 mm away)."""
    from medfusion.pacs.derived import _fused_array

    positions = np.concatenate([[0.0], np.cumsum([4.0] * 7 + [4.5] * 3)])
    rows, columns = np.mgrid[0:18, 0:26]
    planes = np.stack([200 + 10 * rows + 3 * columns + 50 * k
                       for k in range(len(positions))]).astype(np.uint16)
    folder = _write_series(tmp_path / "uneven", [(-10.0, -12.0, z) for z in positions],
                           (1, 0, 0), (0, 1, 0), planes)
    image = read_volume(folder)
    assert image.GetSize()[2] == 12 and image.GetSpacing()[2] == pytest.approx(4.0)
    ordered = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    derived = _fused_array(image, ordered)
    errors = [float(np.abs(plane - ds.pixel_array).max())
              for plane, ds in zip(derived, ordered, strict=True)]
    # on the grid and between its planes: exact (linear content); the last slice lies between
    # the last plane with data on both sides and the plane held past it: interpolated twice,
    # within a quarter of a slice's step of 50 (the copy was off by 5.6, 11.1 and 16.7)
    assert max(errors[:10]) < 1e-3 and errors[10] < 12.5, errors
