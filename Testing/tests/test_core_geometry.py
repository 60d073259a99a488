"""Physical-space geometry on real volumes: SPM12 flipped SPECT grid, TCGA oblique grids."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion import geometry
from medfusion.errors import GeometryError
from medfusion.io.volumes import read_volume


def test_spect_flipped_grid_is_resampled_exactly(spm12: Path, caplog) -> None:
    t1 = read_volume(spm12 / "T1.nii")
    spect = read_volume(spm12 / "SPECT.nii")
    assert not geometry.same_grid(t1, spect)
    assert geometry.grid_differences(t1, spect) == ["origin", "direction"]
    assert geometry.overlap_fraction(t1, spect) == pytest.approx(1.0)
    with caplog.at_level(logging.INFO, logger="medfusion.geometry"):
        aligned = geometry.align_to_reference(t1, spect, "SPECT.nii")
    assert "resampling" in caplog.text and "SPECT.nii" in caplog.text
    assert aligned.GetSize() == t1.GetSize()
    assert np.allclose(aligned.GetOrigin(), t1.GetOrigin())
    assert np.allclose(aligned.GetDirection(), t1.GetDirection())
    # Same voxel centres with the x axis reversed: resampling is an exact flip.
    flipped = sitk.GetArrayFromImage(spect)[:, :, ::-1]
    assert np.allclose(sitk.GetArrayViewFromImage(aligned), flipped, atol=1e-3)


def test_same_grid_is_returned_untouched(spm12: Path) -> None:
    t1 = read_volume(spm12 / "T1.nii")
    t2 = read_volume(spm12 / "T2.nii")
    assert geometry.align_to_reference(t1, t2) is t2


def test_non_overlapping_volume_is_refused(spm12: Path) -> None:
    t1 = read_volume(spm12 / "T1.nii")
    moved = read_volume(spm12 / "T2.nii")
    moved.SetOrigin((1000.0, 126.0, -72.0))
    with pytest.raises(GeometryError, match="does not overlap the reference"):
        geometry.align_to_reference(t1, moved, "T2.nii")


def test_tcga_t2_resampled_onto_t1(tcga: Path) -> None:
    t1 = read_volume(tcga / "t1.nii.gz")
    t2 = read_volume(tcga / "t2.nii.gz")
    aligned = geometry.align_to_reference(t1, t2, "t2")
    assert aligned.GetSize() == t1.GetSize()
    # The brain lines up: T2 is bright where T1 has tissue, in the middle slice.
    t1_mid = sitk.GetArrayViewFromImage(t1)[13].astype(float)
    t2_mid = sitk.GetArrayViewFromImage(aligned)[13].astype(float)
    assert np.corrcoef((t1_mid > np.percentile(t1_mid, 60)).ravel(),
                       (t2_mid > np.percentile(t2_mid, 60)).ravel())[0, 1] > 0.5


def test_slicing_axis_follows_patient_space(spm12: Path, tcga: Path) -> None:
    t1 = read_volume(spm12 / "T1.nii")  # stored axial: array (z, y, x)
    assert geometry.slicing_axis(t1, "axial") == 0
    assert geometry.slicing_axis(t1, "coronal") == 1
    assert geometry.slicing_axis(t1, "sagittal") == 2
    permuted = sitk.PermuteAxes(t1, [2, 0, 1])  # voxel axes reordered, same anatomy
    assert geometry.slicing_axis(permuted, "axial") == 2 - 0
    with pytest.raises(GeometryError, match="unknown axis"):
        geometry.slicing_axis(t1, "oblique")


def test_mismatched_2d_sizes() -> None:
    with pytest.raises(GeometryError, match="image sizes differ"):
        geometry.check_same_dimensions([(256, 256), (128, 256)], ["a.png", "b.png"])
