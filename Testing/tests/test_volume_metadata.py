"""Volume outputs keep the reference's space, and a failed read or write is one line on stderr.

Metadata: the SPM12 templates are in MNI152 space (NIfTI qform_code = sform_code = 4); ITK's
NIfTI writer always writes 1 (scanner anatomical), so a fusion of them claimed scanner space.
The output must declare the reference's space, say it is a derived fusion, and carry none of the
reference's own description (dcm2niix writes acquisition details there).

One-line errors: ITK's niftilib and MetaIO print straight to file descriptor 2 (``** ERROR:
NWAD: wrote only ...``, ``MetaImage: Read: Cannot open data file``), before MedFusion's own
message. These tests capture descriptor 2 itself (``capfd``, or a subprocess), where Python-level
redirection would miss them, and make real faults: a full disk is a subprocess whose file size
limit (``RLIMIT_FSIZE``) makes writes fail with EFBIG, as CI cannot mount a small file system.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from medfusion.cli import main
from medfusion.io.volumes import read_volume

REPO = Path(__file__).resolve().parents[2]
FSIZE_LIMIT = 16384  # bytes a process in _run_with_file_size_limit may write to one file


# each main() call logs to this test's stderr (the conftest's fresh_logging)
pytestmark = pytest.mark.usefixtures("fresh_logging")


def _crop(source: Path, target: Path, first: int = 40, count: int = 6) -> Path:
    """A few axial slices of a real volume, written with nibabel so that its NIfTI header (space
    codes, description) is the source's own, not what ITK's writer would make of it."""
    image = nibabel.load(source)
    piece = image.slicer[:, :, first:first + count]
    piece.set_qform(piece.affine, code=int(image.header["qform_code"]))
    piece.set_sform(piece.affine, code=int(image.header["sform_code"]))
    piece.header["descrip"] = image.header["descrip"]
    nibabel.save(piece, target)
    return target


def _fuse(reference: Path, other: Path, output: Path) -> list[str]:
    return ["fuse", str(reference), str(other), "-o", str(output), "--method", "average",
            "--device", "cpu"]


def _run_with_file_size_limit(args: list[str]) -> subprocess.CompletedProcess:
    """The command line in a subprocess that may write at most FSIZE_LIMIT bytes to a file (a
    real short write: the write past the limit fails with EFBIG, SIGXFSZ ignored)."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT})); "
              "from medfusion.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


# --------------------------------------------------------------------------- space codes
@pytest.mark.parametrize("output", ["fused.nii.gz", "fused.nii"])
def test_fusion_of_mni_templates_stays_in_mni_space(output, spm12: Path, tmp_path: Path) -> None:
    """SPM12 T1 + T2 (MNI152, codes 4): the fused NIfTI says MNI152 in both qform_code and
    sform_code, places the voxels as the reference does, keeps millimetres and seconds, and its
    description says it is a MedFusion fusion. For ``.nii.gz`` the header is patched before
    compression, so the voxels must also be those of the plain ``.nii`` (nothing lost)."""
    t1, t2 = _crop(spm12 / "T1.nii", tmp_path / "t1.nii"), _crop(spm12 / "T2.nii",
                                                                 tmp_path / "t2.nii")
    out = tmp_path / output
    assert main(_fuse(t1, t2, out)) == 0
    reference, fused = nibabel.load(t1), nibabel.load(out)
    assert (int(reference.header["qform_code"]), int(reference.header["sform_code"])) == (4, 4)
    assert int(fused.header["qform_code"]) == 4 and int(fused.header["sform_code"]) == 4
    np.testing.assert_allclose(fused.header.get_qform(), reference.header.get_qform(), atol=1e-4)
    np.testing.assert_allclose(fused.header.get_sform(), reference.header.get_sform(), atol=1e-4)
    assert fused.header.get_xyzt_units() == ("mm", "sec")
    assert fused.header["descrip"].item().startswith(b"MedFusion fusion")
    # The same fusion through ITK's own writer (.nrrd): the voxels are the same.
    assert main(_fuse(t1, t2, tmp_path / "same.nrrd")) == 0
    expected = sitk.GetArrayFromImage(read_volume(tmp_path / "same.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(out)), expected)


def test_reference_description_is_not_copied_and_scanner_space_stays(tcga: Path,
                                                                    tmp_path: Path) -> None:
    """A real patient's T1 (scanner space, code 1; its ``descrip`` holds the echo and acquisition
    times dcm2niix wrote): the fusion keeps code 1 and the reference's geometry, and its
    description is MedFusion's, not the patient series' own."""
    t1 = _crop(tcga / "t1.nii.gz", tmp_path / "t1.nii.gz", first=10, count=4)
    t1c = _crop(tcga / "t1c.nii.gz", tmp_path / "t1c.nii.gz", first=10, count=4)
    assert b"Time=" in nibabel.load(t1).header["descrip"].item()
    out = tmp_path / "fused.nii.gz"
    assert main(_fuse(t1, t1c, out)) == 0
    header = nibabel.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(nibabel.load(out).affine, nibabel.load(t1).affine, atol=1e-3)
    description = header["descrip"].item()
    assert description.startswith(b"MedFusion fusion") and b"Time=" not in description


def test_codes_follow_the_transform_itk_placed_the_voxels_by(spm12: Path,
                                                             tmp_path: Path) -> None:
    """A header whose qform (ALIGNED_ANAT, code 2) and sform (MNI152, code 4) disagree by
    10 mm: ITK places the voxels by the qform and writes that one matrix into both, so both
    codes of the output must say ALIGNED_ANAT (labelling the qform's coordinates MNI152, or
    scanner space as before, would be false)."""
    t1 = nibabel.load(spm12 / "T1.nii")
    data = np.asarray(t1.dataobj)[:, :, 40:46].astype(np.float32)
    shifted = t1.affine.copy()
    shifted[0, 3] += 10.0
    mixed = nibabel.Nifti1Image(data, t1.affine)
    mixed.set_qform(shifted, code=2)
    mixed.set_sform(t1.affine, code=4)
    nibabel.save(mixed, tmp_path / "mixed.nii")
    out = tmp_path / "fused.nii"
    assert main(_fuse(tmp_path / "mixed.nii", spm12 / "T2.nii", out)) == 0
    fused = nibabel.load(out)
    assert (int(fused.header["qform_code"]), int(fused.header["sform_code"])) == (2, 2)
    np.testing.assert_allclose(fused.header.get_sform(), shifted, atol=1e-4)


# --------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("output", ["f.nii", "f.nii.gz", "f.mha", "f.nrrd"])
def test_short_volume_write_is_one_line_saying_why(output, spm12: Path, tmp_path: Path) -> None:
    """A fused volume larger than the file size limit: exit 1, stderr exactly one line (no
    ``** ERROR: NWAD`` or ``MetaImage:`` line of ITK's before it) that names the file, the
    cause (EFBIG, "File too large", and the limit) and that nothing was saved; no file left."""
    t1 = _crop(spm12 / "T1.nii", tmp_path / "t1.nii", first=30, count=24)
    t2 = _crop(spm12 / "T2.nii", tmp_path / "t2.nii", first=30, count=24)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = _run_with_file_size_limit(_fuse(t1, t2, out_dir / output))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"medfusion: error: cannot write {output}: File too large")
    assert f"file size limit (RLIMIT_FSIZE, ulimit -f) of {FSIZE_LIMIT} bytes" in lines[0]
    assert lines[0].endswith("nothing saved")
    assert list(out_dir.iterdir()) == []


def test_short_register_write_is_one_error_line(spm12: Path, tmp_path: Path) -> None:
    """``medfusion register -o r.nii.gz`` past the file size limit: its log lines, then exactly
    one error line saying why; no line of ITK's (every line is MedFusion's)."""
    t1 = _crop(spm12 / "T1.nii", tmp_path / "t1.nii", first=30, count=24)
    t2 = _crop(spm12 / "T2.nii", tmp_path / "t2.nii", first=30, count=24)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = _run_with_file_size_limit(["register", str(t1), str(t2), "-o",
                                      str(out_dir / "r.nii.gz")])
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith("medfusion: ") for line in lines), done.stderr
    errors = [line for line in lines if line.startswith("medfusion: error:")]
    assert errors == [f"medfusion: error: cannot write r.nii.gz: File too large: over this "
                      f"process's file size limit (RLIMIT_FSIZE, ulimit -f) of {FSIZE_LIMIT} "
                      "bytes; nothing saved"], done.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("fault,reason", [
    ("missing", "its data file t2.raw (ElementDataFile) is missing"),
    ("truncated", "its data file t2.raw (ElementDataFile) is truncated: it holds 1000 of the"),
])
def test_mhd_data_file_fault_is_one_line_naming_it(fault, reason, spm12: Path, tmp_path: Path,
                                                   capfd) -> None:
    """An ``.mhd`` header whose ``.raw`` data file is missing or cut short: stderr (file
    descriptor 2, where MetaIO prints ``MetaImage: Read: Cannot open data file``) holds exactly
    MedFusion's one line, which names the data file and what is wrong with it, not the header."""
    image = sitk.Cast(read_volume(spm12 / "T1.nii"), sitk.sitkFloat32)[:, :, 40:44]
    sitk.WriteImage(image, str(tmp_path / "t2.mhd"))
    raw = tmp_path / "t2.raw"
    if fault == "missing":
        raw.unlink()
    else:
        os.truncate(raw, 1000)
    out = tmp_path / "f.nii"
    assert main(_fuse(tmp_path / "t2.mhd", spm12 / "T1.nii", out)) == 1
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"medfusion: error: cannot read volume t2.mhd: {reason}")
    assert not out.exists()


def test_registered_volume_and_decision_map_stay_in_the_references_space(
        spm12: Path, tmp_path: Path) -> None:
    """The other volumes a command writes on the reference's grid say its space too: ``register
    -o`` (the moving volume on the fixed grid) and sesf's decision map (labels on the
    reference's grid) both said scanner space (code 1) for MNI templates."""
    t1 = _crop(spm12 / "T1.nii", tmp_path / "t1.nii", first=30, count=30)
    t2 = _crop(spm12 / "T2.nii", tmp_path / "t2.nii", first=30, count=30)
    assert main(["register", str(t1), str(t2), "-o", str(tmp_path / "r.nii.gz")]) == 0
    labels = tmp_path / "labels.nii.gz"
    assert main([*_fuse(t1, t2, tmp_path / "f.nii.gz")[:-4], "--method", "sesf",
                 "--save-decision-map", str(labels)]) == 0
    for written, words in ((tmp_path / "r.nii.gz", b"MedFusion registration"),
                           (labels, b"MedFusion decision map")):
        header = nibabel.load(written).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (4, 4), written.name
        assert header["descrip"].item().startswith(words), header["descrip"]


def test_a_nifti_without_any_spatial_transform_is_warned_about(spm12: Path, tmp_path: Path,
                                                               caplog) -> None:
    """A NIfTI with qform_code = sform_code = 0 declares no space: ITK puts its voxels at the
    origin, unrotated, and it was fused beside an MNI template (18 % overlap) with no word of
    that. A template that declares its space reads without the warning."""
    piece = nibabel.load(spm12 / "T1.nii").slicer[:, :, 40:46]
    bare = nibabel.Nifti1Image(np.asarray(piece.dataobj), None, piece.header.copy())
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    nibabel.save(bare, tmp_path / "bare.nii")
    with caplog.at_level(logging.WARNING):
        read_volume(_crop(spm12 / "T1.nii", tmp_path / "t1.nii"))
        assert "no spatial transform" not in caplog.text
        image = read_volume(tmp_path / "bare.nii")
    assert "bare.nii has no spatial transform (NIfTI qform_code and sform_code 0)" in caplog.text
    assert image.GetOrigin() == (0.0, 0.0, 0.0)


def test_a_long_list_of_data_files_is_checked_as_far_as_it_is_read(tmp_path: Path) -> None:
    """A MetaImage header whose ``LIST`` of slice files runs past the part read (64 KiB) is not
    refused for the name the read cut in two; a file missing from the part read still is."""
    from medfusion.errors import InputError
    from medfusion.io.formats import check_data_file

    names = [f"slice_with_a_rather_long_descriptive_file_name_{i:05d}.raw" for i in range(1500)]
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 4)
    header = tmp_path / "v.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 1 1500\nElementType = "
                      "MET_USHORT\nElementDataFile = LIST 2D\n" + "\n".join(names) + "\n")
    assert header.stat().st_size > 1 << 16
    check_data_file(header)
    (tmp_path / names[10]).unlink()
    with pytest.raises(InputError, match=f"its data file {names[10]} .* is missing"):
        check_data_file(header)
