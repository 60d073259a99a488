"""Engine on real data: SPM12 T1 + flipped SPECT, TCGA T1 + T2, GE head CT DICOM, atlas pairs."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion import color, geometry, intensity
from medfusion.engine import fuse_images, fuse_volumes
from medfusion.errors import CancelledError, InputError
from medfusion.io.images import read_image, to_unit_range
from medfusion.io.volumes import read_volume


def _same_geometry(a, b) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin())
            and np.allclose(a.GetDirection(), b.GetDirection()))


def test_spm12_t1_spect_output_on_t1_grid_and_aligned(spm12: Path) -> None:
    t1 = read_volume(spm12 / "T1.nii")
    t1.SetMetaData("medfusion_test", "kept")
    calls: list[tuple[int, int]] = []
    fused = fuse_volumes(t1, [spm12 / "SPECT.nii"], method="average", device="cpu",
                         batch_size=16, progress=lambda done, total: calls.append((done, total)))
    assert _same_geometry(fused, t1)
    assert fused.GetPixelID() == sitk.sitkFloat32
    assert fused.GetMetaData("medfusion_test") == "kept"
    assert calls[-1] == (91, 91) and len(calls) == 6  # ceil(91 / 16) batches
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)

    # Independent expectation: SPECT's grid is T1's with x reversed, so flip the array.
    t1_array = sitk.GetArrayFromImage(t1)
    spect = sitk.GetArrayFromImage(read_volume(spm12 / "SPECT.nii"))[:, :, ::-1]
    expected = (intensity.fit_normaliser(t1_array, "percentile")(t1_array)
                + intensity.fit_normaliser(spect, "percentile")(spect)) / 2
    result = sitk.GetArrayViewFromImage(fused)
    assert np.allclose(result, expected, atol=1e-4)
    # Without the flip the anatomy would not line up: the unflipped sum differs clearly.
    wrong = (intensity.fit_normaliser(t1_array, "percentile")(t1_array)
             + intensity.fit_normaliser(spect, "percentile")(spect[:, :, ::-1])) / 2
    assert np.abs(result - wrong).mean() > 10 * np.abs(result - expected).mean() + 1e-3


def test_axis_choice_slices_in_patient_space(spm12: Path) -> None:
    paths = [spm12 / "T1.nii", spm12 / "PET.nii"]
    axial = sitk.GetArrayFromImage(fuse_volumes(*paths[:1], paths[1:], method="average",
                                                device="cpu"))
    coronal = sitk.GetArrayFromImage(fuse_volumes(paths[0], paths[1:], method="average",
                                                  axis="coronal", device="cpu", batch_size=40))
    assert np.allclose(axial, coronal, atol=1e-6)  # pixel-wise method: plane does not matter
    lap_axial = sitk.GetArrayFromImage(fuse_volumes(paths[0], paths[1:], method="laplacian",
                                                    device="cpu"))
    lap_sagittal = sitk.GetArrayFromImage(fuse_volumes(paths[0], paths[1:], method="laplacian",
                                                       axis="sagittal", device="cpu"))
    assert lap_axial.shape == lap_sagittal.shape
    assert not np.allclose(lap_axial, lap_sagittal, atol=1e-3)
    assert 0.0 <= lap_sagittal.min() and lap_sagittal.max() <= 1.0


def test_cancel_event_stops_fusion(spm12: Path) -> None:
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        stop.set()

    with pytest.raises(CancelledError):
        fuse_volumes(spm12 / "T1.nii", [spm12 / "T2.nii"], method="average", device="cpu",
                     batch_size=8, progress=progress, cancel=stop)
    with pytest.raises(CancelledError):
        fuse_volumes(spm12 / "T1.nii", [spm12 / "T2.nii"], method="average", device="cpu",
                     cancel=lambda: True)


def test_tcga_t1_t2_resampled_onto_t1(tcga: Path, caplog) -> None:
    t1 = read_volume(tcga / "t1.nii.gz")
    with caplog.at_level(logging.INFO, logger="medfusion"):
        fused = fuse_volumes(t1, [tcga / "t2.nii.gz"], method="laplacian", device="cpu")
    assert "t2.nii.gz is on another voxel grid" in caplog.text
    assert _same_geometry(fused, t1)
    values = sitk.GetArrayViewFromImage(fused)
    assert np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0
    # T2 signal lands inside the T1 head: the fused image is brighter than T1 alone there.
    t1_norm = intensity.fit_normaliser(sitk.GetArrayViewFromImage(t1))(
        sitk.GetArrayViewFromImage(t1))
    head = t1_norm > 0.2
    assert values[head].mean() > 0.2 and values[~head].mean() < values[head].mean()


def test_ct_dicom_folder_as_reference_with_ct_window(ct_dicom_dir: Path, tmp_path: Path) -> None:
    ct = read_volume(ct_dicom_dir)
    # A second input on a coarser grid, derived from the CT (same physical space).
    coarse = sitk.Shrink(ct, [4, 4, 1])
    fused = fuse_volumes(ct_dicom_dir, [coarse], method="average", device="cpu",
                         normalisation=["ct-window", "percentile"], ct_window=(40, 80))
    assert _same_geometry(fused, ct)
    assert fused.GetMetaDataKeys() == ()  # no DICOM tags in the output header
    values = sitk.GetArrayViewFromImage(fused)
    window = intensity.Normaliser(0.0, 80.0)(sitk.GetArrayViewFromImage(ct))
    # Where both inputs are air (-1000 HU), the result is 0; in brain it is mid-grey.
    assert values[window == 0].mean() < 0.1
    assert 0.0 <= values.min() and values.max() <= 1.0


def test_dicom_series_in_different_frames_of_reference_are_warned_about(
        ct_dicom_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two series whose FrameOfReferenceUIDs differ share patient coordinates only if they were
    registered: the fusion says so (it was silent), naming the folders but not the UIDs, by
    the ends of their paths where both are called ``DICOM`` (the two collapsed into one name;
    the whole paths may name patients); fusion that registers them first does not warn; the
    report, which only resamples, warns too."""
    import shutil

    import pydicom

    same, other = tmp_path / "ct_same", tmp_path / "b" / "DICOM"
    shutil.copytree(ct_dicom_dir, same)
    shutil.copytree(ct_dicom_dir, other)
    new_frame = pydicom.uid.generate_uid()
    for path in sorted(other.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.FrameOfReferenceUID = new_frame
        dataset.save_as(path)
    (other / "notes.txt").write_text("not DICOM")  # skipped, as in reading the series
    options = {"method": "average", "device": "cpu", "normalisation": "minmax"}

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "frames of reference" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="medfusion.engine"):
        fuse_volumes(ct_dicom_dir, [same], **options)
    assert not warnings()
    with caplog.at_level(logging.WARNING, logger="medfusion.engine"):
        fused = fuse_volumes(ct_dicom_dir, [other], **options)
    assert len(warnings()) == 1 and "ct-head-ge and DICOM" in warnings()[0]
    assert new_frame not in caplog.text
    assert fused.GetSize() == read_volume(ct_dicom_dir).GetSize()  # a warning, not a refusal

    caplog.clear()
    first = tmp_path / "a" / "DICOM"
    shutil.copytree(ct_dicom_dir, first)
    with caplog.at_level(logging.WARNING, logger="medfusion.engine"):
        fuse_volumes(first, [other], **options)
    assert len(warnings()) == 1 and "a/DICOM and b/DICOM" in warnings()[0]
    assert str(tmp_path) not in warnings()[0]

    caplog.clear()
    from medfusion.report.dataset import Group
    from medfusion.report.fusion import load_group

    with caplog.at_level(logging.WARNING, logger="medfusion.engine"):
        load_group(Group("study", "CT-CT", ("CT", "CT"), (ct_dicom_dir, other), "volume"))
    assert len(warnings()) == 1 and "ct-head-ge and DICOM" in warnings()[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medfusion.engine"):
        fuse_volumes(ct_dicom_dir, [other], register="rigid", **options)
    assert not warnings()


def test_non_finite_volume_is_refused(spm12: Path) -> None:
    t1 = read_volume(spm12 / "T1.nii")
    broken = sitk.Image(t1)
    broken[40, 50, 40] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite"):
        fuse_volumes(t1, [broken], method="average", device="cpu")


def test_pet_mri_colour_pair_keeps_pet_chroma(aanlib: Path) -> None:
    mri_path = aanlib / "PET-MRI" / "MRI" / "25030.png"
    pet_path = aanlib / "PET-MRI" / "PET" / "25030.png"
    result = fuse_images([mri_path, pet_path], method="laplacian", device="cpu")
    assert result.rgb is not None and result.rgb.shape == (256, 256, 3)
    assert result.to_uint8().dtype == np.uint8 and result.to_uint8().shape == (256, 256, 3)
    pet = color.rgb_to_ycbcr(to_unit_range(read_image(pet_path)))
    out = color.rgb_to_ycbcr(result.rgb)
    unclipped = ((result.rgb > 0.002) & (result.rgb < 0.998)).all(axis=-1)
    active = pet[..., 0] > 0.1  # where the PET shows activity
    assert unclipped[active].mean() > 0.2
    # Where no RGB channel clips, the chroma is the PET's exactly ...
    assert np.allclose(out[unclipped, 1:], pet[unclipped, 1:], atol=2e-3)
    # ... and over the whole active region it stays close (saturated colours clip a little).
    error = np.abs(out[..., 1:] - pet[..., 1:])[active].mean()
    assert error < 0.2 * np.abs(pet[..., 1:] - 0.5)[active].mean()
    assert np.allclose(out[unclipped, 0], result.luminance[unclipped], atol=2e-3)
    # The fused luminance carries MRI structure and PET activity.
    assert np.corrcoef(result.luminance.ravel(), result.sources[0].ravel())[0, 1] > 0.5
    assert np.corrcoef(result.luminance.ravel(), result.sources[1].ravel())[0, 1] > 0.3


def test_grey_pair_gives_grey_output_and_arrays_work(aanlib: Path) -> None:
    ct = read_image(aanlib / "CT-MRI" / "CT" / "28011.png")
    mri = read_image(aanlib / "CT-MRI" / "MRI" / "28011.png")
    result = fuse_images([ct, mri], method="max", device="cpu")
    assert result.rgb is None and result.to_uint8().shape == (256, 256)
    assert np.array_equal(result.to_uint8(), np.maximum(ct, mri))


def test_two_colour_inputs_merge_chroma(aanlib: Path) -> None:
    mri = aanlib / "SPECT-MRI" / "MRI"
    name = sorted(p.name for p in mri.iterdir())[0]
    spect = aanlib / "SPECT-MRI" / "SPECT" / name
    pet = aanlib / "PET-MRI" / "PET" / "25030.png"
    result = fuse_images([mri / name, spect, pet], method="average", device="cpu")
    assert result.rgb is not None and result.sources.shape == (3, 256, 256)


def test_image_size_mismatch_is_refused(aanlib: Path) -> None:
    from medfusion.errors import GeometryError

    mri = read_image(aanlib / "CT-MRI" / "MRI" / "28011.png")
    with pytest.raises(GeometryError, match="image sizes differ"):
        fuse_images([mri, mri[:128]], method="average", device="cpu")


def test_slicing_axis_used_by_engine_matches_geometry(spm12: Path) -> None:
    assert geometry.slicing_axis(read_volume(spm12 / "T1.nii"), "coronal") == 1


def _phantom_pair() -> tuple[sitk.Image, sitk.Image]:
    """Two small synthetic volumes with structure, the second on a shifted grid."""
    k, j, i = np.indices((6, 40, 48), dtype=np.float32)
    ramp = sitk.GetImageFromArray(i * 20.0 - 300.0 + 50.0 * np.sin(j / 3.0))
    blob = sitk.GetImageFromArray(np.where((j - 20) ** 2 + (i - 24) ** 2 < 150, 900.0, 150.0)
                                  .astype(np.float32) + k)
    blob.SetOrigin((0.3, 0.2, 0.1))
    return ramp, blob


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cnn_volume_on_cuda_matches_the_cpu() -> None:
    """The fused volume on a GPU is the CPU's to the backends' tolerance (with torch's default
    TF32 convolutions it was 3.6e-3 off), and a decision map is still refused for the CNN."""
    ramp, blob = _phantom_pair()
    on_cpu = sitk.GetArrayFromImage(fuse_volumes(ramp, [blob], method="cnn", device="cpu"))
    on_gpu = sitk.GetArrayFromImage(fuse_volumes(ramp, [blob], method="cnn", device="cuda"))
    assert on_gpu.shape == on_cpu.shape and float(np.abs(on_gpu - on_cpu).max()) <= 1e-4
    with pytest.raises(InputError, match="decision map"):
        fuse_volumes(ramp, [blob], method="cnn", device="cuda", decision_map=True)
