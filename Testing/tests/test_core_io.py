"""Atomic outputs, 2D image and 3D volume reading/writing, on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion.errors import InputError, OutputError
from medfusion.io import input_kind, stem
from medfusion.io.atomic import atomic_output
from medfusion.io.images import read_image, to_uint8, write_image
from medfusion.io.volumes import read_volume, writable_array_view, write_volume


def test_atomic_output_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    with atomic_output(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.endswith(".nii.gz")
        assert temporary != target
        temporary.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_atomic_output_keeps_old_file_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_atomic_output_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="output folder does not exist"):
        with atomic_output(tmp_path / "missing" / "out.png"):
            pass
    assert not (tmp_path / "missing").exists()


def test_input_kind_and_stem(tmp_path: Path) -> None:
    assert input_kind("a/b.PNG") == "image"
    assert input_kind("a/b.nii.gz") == "volume"
    assert input_kind(tmp_path) == "volume"
    assert stem("t1.nii.gz") == "t1" and stem("x.png") == "x"


def test_read_colour_and_grey_atlas_images(aanlib: Path) -> None:
    pet = read_image(aanlib / "PET-MRI" / "PET" / "25030.png")
    mri = read_image(aanlib / "PET-MRI" / "MRI" / "25030.png")
    assert pet.shape == (256, 256, 3) and pet.dtype == np.uint8
    assert mri.shape == (256, 256) and mri.dtype == np.uint8


def test_grey_rgb_file_reads_as_grey(tmp_path: Path, aanlib: Path) -> None:
    mri = read_image(aanlib / "PET-MRI" / "MRI" / "25030.png")
    rgb_path = tmp_path / "grey_rgb.bmp"
    write_image(rgb_path, np.repeat(mri[..., None], 3, axis=-1))
    again = read_image(rgb_path)
    assert again.ndim == 2 and np.array_equal(again, mri)


def test_write_image_quantises_without_wraparound(tmp_path: Path) -> None:
    values = np.array([[-0.2, 0.0, 0.5, 1.0, 1.7]], dtype=np.float32)
    assert to_uint8(values).tolist() == [[0, 0, 128, 255, 255]]
    for suffix in (".png", ".tif", ".bmp"):
        path = write_image(tmp_path / f"x{suffix}", values)
        assert read_image(path).tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(OutputError, match="must be saved as"):
        write_image(tmp_path / "x.nii.gz", values)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_image_is_a_clear_error(tmp_path: Path, aanlib: Path, content) -> None:
    path = tmp_path / "broken.png"
    if content == "truncated":
        data = (aanlib / "PET-MRI" / "MRI" / "25030.png").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read image broken.png"):
        read_image(path)


def test_missing_image_and_volume(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="input not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_corrupt_volume_is_a_clear_error(tmp_path: Path, spm12: Path) -> None:
    path = tmp_path / "broken.nii"
    path.write_bytes((spm12 / "T1.nii").read_bytes()[:200])
    with pytest.raises(InputError, match="cannot read volume broken.nii"):
        read_volume(path)


def test_read_dicom_series_folder(ct_dicom_dir: Path) -> None:
    image = read_volume(ct_dicom_dir)
    # uneven spacing: restacked 4 mm apart; gantry tilt: 99 rows more hold the in-plane shift
    assert image.GetSize() == (512, 611, 37)
    # Gantry tilt: the slice direction is not the z axis.
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert abs(direction[2, 2]) < 0.99
    # No DICOM tags (patient data) travel in the metadata dictionary.
    assert image.GetMetaDataKeys() == ()


def test_folder_with_two_series_names_them(tmp_path: Path, ct_dicom_dir: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(ct_dicom_dir.glob("*.dcm"))[:4]:
        shutil.copy(path, folder / f"a_{path.name}")
    uid = generate_uid()
    for path in sorted(ct_dicom_dir.glob("*.dcm"))[:3]:
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = uid
        dataset.SeriesDescription = "SECOND TEST SERIES"
        dataset.SeriesNumber = 77
        dataset.save_as(folder / f"b_{path.name}")
    with pytest.raises(InputError) as caught:
        read_volume(folder)
    message = str(caught.value)
    assert "holds 2 DICOM series" in message
    assert "'SECOND TEST SERIES' #77 (3 files)" in message
    assert "(4 files)" in message
    assert "\n" not in message


def test_empty_folder_is_not_a_series(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no DICOM series found"):
        read_volume(tmp_path)


def test_write_volume_round_trip_and_refuses_mhd(tmp_path: Path, spm12: Path) -> None:
    image = read_volume(spm12 / "SPECT.nii")
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = write_volume(tmp_path / f"v{suffix}", image)
        again = read_volume(path)
        assert np.allclose(again.GetOrigin(), image.GetOrigin())
        assert np.allclose(again.GetDirection(), image.GetDirection())
        assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(image))
    with pytest.raises(OutputError, match=r"\.mha"):
        write_volume(tmp_path / "v.mhd", image)


def test_writable_array_view_writes_into_the_image() -> None:
    image = sitk.Image([5, 4, 3], sitk.sitkFloat32)
    view = writable_array_view(image)
    view[2, 1, 4] = 7.5
    assert image[4, 1, 2] == 7.5


def test_sheared_nifti_is_named_as_such(tmp_path: Path) -> None:
    """A NIfTI whose affine shears the voxel axes is readable by nibabel but not by ITK; the
    error says what is wrong with it, not that the file is corrupt."""
    import nibabel as nib

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 1] = 0.4  # x moves with the row index: axes no longer orthogonal
    path = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), affine), path)
    with pytest.raises(InputError, match="voxel axes are not orthogonal"):
        read_volume(path)
