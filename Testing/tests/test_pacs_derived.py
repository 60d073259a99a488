"""The derived (fused) series writer on the real GE head CT: gantry tilt, uneven spacing.
No server needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfusion.errors import GeometryError, OutputError
from medfusion.pacs.derived import (
    Provenance,
    build_derived_series,
    choose_rescale,
    is_medfusion_series,
    sort_by_position,
    write_series,
)


@pytest.fixture(scope="module")
def ct_headers(ct_dicom_dir: Path) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(path, stop_before_pixels=True)
        for path in sorted(ct_dicom_dir.glob("*.dcm"))
    ]


def test_rescale_is_an_exact_power_of_ten() -> None:
    unit = choose_rescale(0.0, 1.0)
    assert (unit.slope_text, unit.intercept_text) == ("0.0001", "0.0000")
    assert unit.encode(np.array([0.0, 0.5, 1.0])).tolist() == [0, 5000, 10000]
    hounsfield = choose_rescale(-1024.0, 3071.0)
    assert float(hounsfield.slope_text) == 0.1 and float(hounsfield.intercept_text) <= -1024
    stored = hounsfield.encode(np.array([-1024.0, 3071.0]))
    assert stored.max() <= 65535
    back = stored * hounsfield.slope + hounsfield.intercept
    np.testing.assert_allclose(back, [-1024.0, 3071.0], atol=hounsfield.slope / 2 + 1e-9)


def test_ct_round_trip_keeps_geometry_and_values(ct_dicom_dir: Path, ct_headers, tmp_path: Path):
    import SimpleITK as sitk

    from medfusion.io.volumes import read_volume

    reference = read_volume(ct_dicom_dir)
    array = sitk.GetArrayFromImage(reference).astype(np.float32)
    fused_array = (array - array.min()) / (array.max() - array.min())
    fused = sitk.GetImageFromArray(fused_array)
    fused.CopyInformation(reference)
    other = [ds for ds in ct_headers[::2]]  # stands in for a second source series
    datasets = build_derived_series(
        ct_headers, fused, others=[other], provenance=Provenance("laplacian", "demo", "9.9")
    )
    assert len(datasets) == 28
    files = write_series(datasets, tmp_path / "fused")
    assert len(files) == 28

    back = read_volume(tmp_path / "fused")
    # restacked 4 mm apart; the gantry tilt's in-plane shift (48 mm) takes 99 rows more
    assert back.GetSize() == reference.GetSize() == (512, 611, 37)
    np.testing.assert_allclose(back.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), reference.GetDirection(), atol=1e-6)
    # The series steps 4 mm (14 slices), 1.08 mm, then 7 mm: its volume is a regular 4 mm grid
    # at the slices' real positions, each derived instance that grid at its slice's position.
    # The tilt shifts each slice in its plane by a fraction of a pixel: the values are
    # interpolated in-plane on the way to the derived instances and back (smoothed within a
    # pixel); further on, between grid planes, also along the slice axis (within a spacing).
    round_trip = np.abs(sitk.GetArrayFromImage(back) - fused_array)
    assert round_trip[:14].max() < 0.1 and round_trip[:14].mean() < 0.001
    assert round_trip[14:].max() < 0.15 and round_trip[14:].mean() < 0.005
    # Each derived instance holds its reference slice's pixels (here the CT itself, scaled).
    low, high = float(array.min()), float(array.max())
    for index in (0, 13, 27):
        source = pydicom.dcmread(sorted(ct_dicom_dir.glob("*.dcm"))[index])
        expected = (source.pixel_array * float(source.RescaleSlope)
                    + float(source.RescaleIntercept) - low) / (high - low)
        got = datasets[index].pixel_array * float(datasets[index].RescaleSlope)
        assert np.abs(got - expected).mean() < 0.002, index

    originals = {str(ds.SOPInstanceUID): ds for ds in ct_headers}
    ordered = sort_by_position(ct_headers)
    series_uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    assert len(series_uids) == 1 and series_uids.isdisjoint({str(ct_headers[0].SeriesInstanceUID)})
    for index, (ds, source) in enumerate(zip(datasets, ordered, strict=True)):
        assert str(ds.SOPInstanceUID) not in originals
        assert ds.SOPClassUID == source.SOPClassUID and ds.Modality == "CT"
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        # Patient, study and frame of reference copied; geometry is the source slice's, exactly.
        for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDescription"):
            assert ds.get(keyword) == source.get(keyword)
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.ImageOrientationPatient == source.ImageOrientationPatient
        assert ds.PixelSpacing == source.PixelSpacing
        assert ds.InstanceNumber == index + 1
        assert (ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType) == (0.0001, 0, "US")
        assert (ds.BitsStored, ds.PixelRepresentation) == (16, 0)
        # Private GE tags and the padding value of the source are gone.
        assert not any(element.tag.is_private for element in ds)
        assert "PixelPaddingValue" not in ds
        # Provenance.
        assert is_medfusion_series(ds.SeriesDescription)
        assert "not for diagnostic use" in ds.SeriesDescription
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert len(ds.SourceImageSequence) == 2
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for series in ds.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        assert referenced == {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
        equipment = ds.ContributingEquipmentSequence[-1]
        assert equipment.Manufacturer == "MedFusion"
        assert list(equipment.SoftwareVersions)[1:] == ["method laplacian", "demo 9.9"]
        assert equipment.ManufacturerModelName == "demo"
        assert "laplacian" in ds.DerivationDescription
    # The originals passed in are untouched.
    assert all(any(e.tag.is_private for e in ds) for ds in ct_headers)


def test_wrong_grid_and_existing_folder_are_refused(ct_headers, tmp_path: Path) -> None:
    with pytest.raises(GeometryError, match="shape"):
        build_derived_series(
            ct_headers, np.zeros((27, 512, 512)), others=[], provenance=Provenance("average")
        )
    with pytest.raises(GeometryError, match="same position"):
        sort_by_position([ct_headers[0], ct_headers[0]])
    datasets = build_derived_series(
        ct_headers, np.zeros((28, 512, 512)), others=[], provenance=Provenance("average")
    )
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        write_series(datasets, tmp_path / "taken")
    assert list(tmp_path.iterdir()) == [tmp_path / "taken"]  # no half-written folder left
