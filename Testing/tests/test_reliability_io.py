"""Reliability of input/output (issue 13): nothing wrong passes as success.

Each case runs the real command line on fixtures built from ``../shared/data`` at test time and
checks the exit code, the one-line ``medfusion: error: ...`` message, that nothing is left in the
output folder, and that the inputs are unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from medfusion.cli import main
from medfusion.io.volumes import read_volume

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers
# each main() call logs to this test's stderr (the conftest's fresh_logging)
pytestmark = pytest.mark.usefixtures("fresh_logging")


def _hash(path: Path) -> str:
    if path.is_dir():
        return "".join(p.name + _hash(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_clean_error(args, capsys, inputs, out_dir: Path, pattern: str,
                       kept: tuple[str, ...] = ()) -> str:
    """Run; expect exit 1, one ``medfusion: error:`` line matching ``pattern``, no traceback,
    nothing new in ``out_dir`` (besides ``kept``) and the inputs unchanged."""
    import re

    before = {str(p): _hash(Path(p)) for p in inputs}
    code, err = _run(args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("medfusion: error:")]
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(kept)
    assert {str(p): _hash(Path(p)) for p in inputs} == before
    return lines[0]


def _crop(source: Path, target: Path, first: int, count: int, compress: bool = False) -> Path:
    image = read_volume(source)
    size = list(image.GetSize())
    size[2] = count
    sitk.WriteImage(sitk.RegionOfInterest(image, size, [0, 0, first]), str(target),
                    useCompression=compress)
    return target


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    return inputs, outputs


@pytest.fixture
def t1_t2(spm12: Path, dirs) -> tuple[Path, Path]:
    """Eight axial slices of the SPM12 T1 and T2 (float32 NIfTI, 91x109x8)."""
    inputs, _ = dirs
    return (_crop(spm12 / "T1.nii", inputs / "t1.nii", 40, 8),
            _crop(spm12 / "T2.nii", inputs / "t2.nii", 40, 8))


@pytest.fixture
def ct_series(ct_dicom_dir: Path, dirs) -> Path:
    """The first ten slices of the real GE head CT (4 mm apart), in their own folder."""
    inputs, _ = dirs
    folder = inputs / "ct"
    folder.mkdir()
    for name in [f"{i:02d}.dcm" for i in range(1, 11)]:
        shutil.copy(ct_dicom_dir / name, folder / name)
    return folder


def _fuse(inputs, output: Path, *extra) -> list:
    return ["fuse", *inputs, "-o", output, "--method", "average", "--progress", "none",
            "--device", "cpu", *extra]


# --------------------------------------------------------------------------- truncated files
@pytest.mark.parametrize("suffix,compress", [(".nii", False), (".nii.gz", True),
                                             (".nrrd", False), (".nrrd", True),
                                             (".mha", False), (".mha", True)])
def test_truncated_volume_is_an_error(spm12, dirs, t1_t2, capsys, suffix, compress) -> None:
    inputs, out = dirs
    cut = _crop(spm12 / "T1.nii", inputs / f"cut{suffix}", 30, 30, compress)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert_clean_error(_fuse([cut, t1_t2[1]], out / "f.nii.gz"), capsys, [cut, t1_t2[1]], out,
                       r"cut\S* (is truncated|.*corrupt)")


def test_truncated_nifti_names_the_slices(spm12, dirs, t1_t2, capsys) -> None:
    inputs, out = dirs
    cut = inputs / "T1.nii"
    data = (spm12 / "T1.nii").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    line = assert_clean_error(_fuse([cut, spm12 / "T2.nii"], out / "f.nii"), capsys, [cut], out,
                              "T1.nii is truncated")
    assert "30 of its 91 slices" in line


def test_dicom_slice_cut_in_half_is_named(ct_series, dirs, capsys) -> None:
    _, out = dirs
    data = (ct_series / "06.dcm").read_bytes()
    (ct_series / "06.dcm").write_bytes(data[: len(data) // 2])
    assert_clean_error(_fuse([ct_series, ct_series], out / "f.nii.gz"), capsys, [ct_series],
                       out, r"ct/06\.dcm .*(truncated|cannot read)")


# --------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_nifti_is_refused(dirs, t1_t2, capsys, suffix, bad) -> None:
    inputs, out = dirs
    image = read_volume(t1_t2[0])
    array = sitk.GetArrayFromImage(image)
    array[4, 50, 45] = bad
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    path = inputs / f"bad{suffix}"
    sitk.WriteImage(broken, str(path))
    assert_clean_error(_fuse([t1_t2[1], path], out / "f.nrrd"), capsys, [path], out,
                       f"bad{suffix.replace('.', '.')} contains NaN or infinite values")


# --------------------------------------------------------------------------- the file named
def test_named_file_only(dirs, t1_t2, aanlib, capsys) -> None:
    inputs, out = dirs
    t1, t2 = t1_t2
    # a.nii.gz given, only a.nii exists: SimpleITK would read a.nii
    named = inputs / "t1.nii.gz"
    assert_clean_error(_fuse([named, t2], out / "f.nii"), capsys, [t1, t2], out,
                       "input not found: .*t1.nii.gz")
    # a PNG renamed .nii
    png_as_nii = inputs / "pet.nii"
    shutil.copy(aanlib / "PET-MRI" / "PET" / "25015.png", png_as_nii)
    assert_clean_error(_fuse([t1, png_as_nii], out / "f.nii"), capsys, [png_as_nii], out,
                       r"pet\.nii: not a valid NIfTI file \(its content looks like PNG\)")
    # an uncompressed NIfTI named .nii.gz
    plain_as_gz = inputs / "plain.nii.gz"
    shutil.copy(t2, plain_as_gz)
    assert_clean_error(_fuse([t1, plain_as_gz], out / "f.nii"), capsys, [plain_as_gz], out,
                       "plain.nii.gz: not a valid gzip-compressed NIfTI file")
    # a NIfTI renamed .png
    nii_as_png = inputs / "mri.png"
    shutil.copy(t1, nii_as_png)
    mri = aanlib / "PET-MRI" / "MRI" / "25015.png"
    assert_clean_error(_fuse([mri, nii_as_png], out / "f.png"), capsys, [nii_as_png], out,
                       r"mri\.png: not a valid PNG file \(its content looks like uncompressed")
    # a folder named x.png (holding an image) is not a 3D volume, nor an image
    folder = inputs / "x.png"
    folder.mkdir()
    shutil.copy(mri, folder / "25015.png")
    assert_clean_error(_fuse([folder, mri], out / "f.png"), capsys, [folder], out,
                       "x.png is a folder, not a PNG file")
    assert_clean_error(_fuse([folder, t1], out / "f.nii"), capsys, [folder], out,
                       "(x.png is a folder|cannot fuse a 2D image)")
    # an unknown extension is not passed to SimpleITK to guess
    odd = inputs / "t1.vol"
    shutil.copy(t1, odd)
    assert_clean_error(_fuse([odd, t2], out / "f.nii"), capsys, [odd], out,
                       "unsupported file extension '.vol'")


# --------------------------------------------------------------------------- DICOM series
def test_dicom_gap_is_refused_and_named(ct_series, dirs, capsys) -> None:
    _, out = dirs
    (ct_series / "05.dcm").unlink()
    assert_clean_error(_fuse([ct_series, ct_series], out / "f.nii.gz"), capsys, [ct_series],
                       out, r"missing slices: between 04\.dcm and 06\.dcm \(.*8\.0 mm apart\)"
                       r".*--allow-slice-gaps")


def test_dicom_gap_allowed_keeps_real_positions(ct_series, dirs, capsys, caplog) -> None:
    _, out = dirs
    whole = read_volume(ct_series)
    (ct_series / "05.dcm").unlink()
    before = _hash(ct_series)
    output = out / "f.nii.gz"
    code, err = _run(_fuse([ct_series, ct_series], output, "--allow-slice-gaps"), capsys)
    assert code == 0, err
    assert "missing slices between 04.dcm and 06.dcm" in err + caplog.text
    assert _hash(ct_series) == before
    gapped = read_volume(ct_series, allow_slice_gaps=True)
    # on a regular grid at the slices' real positions: the step along the slice normal (4.0 mm;
    # ITK's 4.22 mm for the whole series is the distance between the tilted slices' corners)
    headers = [pydicom.dcmread(ct_series / f"{i:02d}.dcm", stop_before_pixels=True)
               for i in (1, 2)]
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    step = float(np.dot(np.subtract(np.array(headers[1].ImagePositionPatient, dtype=float),
                                    np.array(headers[0].ImagePositionPatient, dtype=float)),
                        normal))
    assert gapped.GetSize() == whole.GetSize()
    assert np.isclose(gapped.GetSpacing()[2], step, atol=1e-3)
    assert np.allclose(gapped.GetSpacing()[:2], whole.GetSpacing()[:2])
    assert np.allclose(gapped.GetDirection(), whole.GetDirection())
    # the grid starts at the first slice along the normal, and its rows begin where the last
    # slice's do (the tilt shifts each slice 1.27 mm further along its columns)
    last = np.array(pydicom.dcmread(ct_series / "10.dcm", stop_before_pixels=True)
                    .ImagePositionPatient, dtype=float)
    first = np.array(headers[0].ImagePositionPatient, dtype=float)
    column = iop[3:]
    assert np.allclose(gapped.GetOrigin(), first + np.dot(last - first, column) * column,
                       atol=1e-3)
    real, filled = sitk.GetArrayFromImage(whole), sitk.GetArrayFromImage(gapped)
    kept = [k for k in range(10) if k != 4]
    assert np.allclose(filled[kept], real[kept], atol=0.05)  # real slices stay where they were
    between = (real[3].astype(np.float32) + real[5]) / 2  # the missing one is interpolated
    assert np.allclose(filled[4], between, atol=1.0)
    fused = read_volume(output)
    assert fused.GetSize() == whole.GetSize()
    assert sorted(p.name for p in out.iterdir()) == ["f.nii.gz"]


def test_dicom_mixed_modalities_name_the_odd_file(ct_series, dirs, capsys) -> None:
    _, out = dirs
    odd = pydicom.dcmread(ct_series / "03.dcm")
    odd.Modality = "MR"
    odd.save_as(ct_series / "03.dcm")
    assert_clean_error(_fuse([ct_series, ct_series], out / "f.nii.gz"), capsys, [ct_series],
                       out, r"differ in their modalities \(CT, MR\): odd file\(s\) 03\.dcm")


@pytest.mark.parametrize("keyword,value,plural", [
    ("Rows", 256, "slice sizes"),
    ("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], "orientations"),
    ("FrameOfReferenceUID", "1.2.826.0.1.3680043.8.498.1", "frames of reference"),
    ("PixelSpacing", [0.7, 0.7], "pixel spacings"),  # was fused on the others' spacing
    ("ImagePositionPatient", None, "ImagePositionPatient"),  # (given, missing): was stacked
])
def test_dicom_mixed_slices_name_the_odd_file(keyword, value, plural, ct_series, dirs,
                                               capsys) -> None:
    _, out = dirs
    odd = pydicom.dcmread(ct_series / "07.dcm")
    if value is None:
        delattr(odd, keyword)
    else:
        setattr(odd, keyword, value)
    odd.save_as(ct_series / "07.dcm")
    assert_clean_error(_fuse([ct_series, ct_series], out / "f.nii.gz"), capsys, [ct_series],
                       out, rf"differ in their {plural} .*: odd file\(s\) 07\.dcm")


def test_dicom_slice_with_rescale_slope_zero_is_refused(ct_series, dirs, capsys) -> None:
    """A slice whose RescaleSlope is 0 read as a blank slice and was fused as if real."""
    _, out = dirs
    odd = pydicom.dcmread(ct_series / "05.dcm")
    odd.RescaleSlope = 0
    odd.save_as(ct_series / "05.dcm")
    assert_clean_error(_fuse([ct_series, ct_series], out / "f.nii.gz"), capsys, [ct_series],
                       out, r"05\.dcm has RescaleSlope 0(\.0)?: its pixel values would all be lost")


def test_dicom_two_slices_at_one_position(ct_series, dirs, capsys) -> None:
    _, out = dirs
    twin = pydicom.dcmread(ct_series / "03.dcm")
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    twin.save_as(ct_series / "03b.dcm")
    assert_clean_error(_fuse([ct_series, ct_series], out / "f.nii.gz"), capsys, [ct_series],
                       out, r"03b?\.dcm and 03b?\.dcm in ct lie at the same slice position")


def test_real_ct_with_two_spacings_is_read_at_its_slices_real_positions(
        ct_dicom_dir: Path, caplog) -> None:
    """The GE series steps 4 mm (14 slices), 1.08 mm, then 7 mm (uneven, nothing missing).
    ITK stacks it evenly, 5.34 mm apart: slices up to 21.6 mm from where they were taken, a
    wrong fusion with any other series. It is read onto a regular 4 mm grid at the slices'
    real positions instead, with a warning: each slice's pixels lie where its header says
    (shifted in-plane by the gantry tilt, so interpolated: compared where the slice is smooth)."""
    import SimpleITK as sitk

    from medfusion.io.dicom_series import sample_at_slices

    with caplog.at_level(logging.WARNING):
        image = read_volume(ct_dicom_dir)
    assert "uneven DICOM slice spacing" in caplog.text and "21.6 mm off" in caplog.text
    assert image.GetSize() == (512, 611, 37)
    assert image.GetSpacing()[2] == pytest.approx(4.0, abs=0.01)
    axis = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    origin = np.asarray(image.GetOrigin())
    planes = sitk.GetArrayFromImage(image)
    on_grid = 0
    for path in sorted(ct_dicom_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        offset = float(np.dot(np.asarray(ds.ImagePositionPatient, float) - origin, axis))
        plane = offset / image.GetSpacing()[2]
        if abs(plane - round(plane)) < 1e-3:  # a slice on the grid: its own pixels
            hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            back = sample_at_slices(image, planes, [ds.ImagePositionPatient], (512, 512))[0]
            windows = np.lib.stride_tricks.sliding_window_view(hounsfield, (3, 3))
            smooth = np.ptp(windows, axis=(2, 3)) < 40  # its 3 x 3 neighbourhood
            error = np.abs(back - hounsfield)[1:-1, 1:-1][smooth]
            assert error.max() < 40 and np.median(error) < 1, (path.name, error.max())
            on_grid += 1
    assert on_grid == 14  # the slices 4 mm apart


# --------------------------------------------------------------------------- full disk
@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 16 KiB file system (tmpfs, needs root as in CI), or None where mount is refused."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _run_out_of_space(args: list, out_dir: Path, tiny) -> tuple[int, str]:
    """Run the CLI where writes beyond 16 KiB fail: on the tiny tmpfs, else (no mount rights)
    in a subprocess with RLIMIT_FSIZE (writes past the limit fail with EFBIG)."""
    if tiny is not None:
        return main([str(a) for a in args]), ""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)); "
              "from medfusion.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    return done.returncode, done.stderr


@pytest.mark.parametrize("output", ["f.nii.gz", "f.nii", "f.nrrd", "f.png"])
def test_full_disk_is_a_clean_error(output, dirs, t1_t2, aanlib, tiny_disk, capsys) -> None:
    _, out = dirs
    folder = tiny_disk if tiny_disk is not None else out
    if output.endswith(".png"):
        inputs = [aanlib / "PET-MRI" / m / "25015.png" for m in ("MRI", "PET")]
    else:
        inputs = list(t1_t2)
    before = [_hash(p) for p in inputs]
    code, err = _run_out_of_space(_fuse(inputs, folder / output), folder, tiny_disk)
    err = err or capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("medfusion: error:")]
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{output}" in lines[0]
    assert ("No space left" in lines[0] or "not written completely" in lines[0]
            or "too large" in lines[0] or "failed to write" in lines[0]), lines[0]
    assert list(folder.iterdir()) == []
    assert [_hash(p) for p in inputs] == before


# --------------------------------------------------------------------------- geometry
def _nrrd(path: Path, directions: str, origin: str = "(0,0,0)") -> Path:
    image = read_volume(Path(str(path.parent / "t1.nii")))
    data = sitk.GetArrayFromImage(image).astype("<f4").tobytes()
    size = " ".join(str(n) for n in image.GetSize())
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {size}\nspace directions: {directions}\nencoding: raw\n"
              f"endian: little\nspace origin: {origin}\n\n")
    path.write_bytes(header.encode() + data)
    return path


def _nifti_with(source: Path, target: Path, offset: int, value: float) -> Path:
    raw = bytearray(source.read_bytes())
    raw[offset: offset + 4] = struct.pack("<f", value)
    target.write_bytes(bytes(raw))
    return target


@pytest.mark.parametrize("case,pattern", [
    ("nrrd zero spacing", "cannot read volume|spacing"),
    ("nrrd singular", "cannot read volume|orthonormal"),
    ("nrrd sheared", "direction matrix that is not orthonormal"),
    ("nrrd nan origin", "cannot read volume|origin"),
    ("nifti zero pixdim", r"unusable voxel spacing .*pixdim 0x2x2"),
    ("nifti negative pixdim", r"unusable voxel spacing .*pixdim -2x2x2"),
    ("nifti nan pixdim", r"unusable voxel spacing .*pixdim nanx2x2"),
    ("nifti nan origin", "non-finite qform"),
])
def test_degenerate_geometry_is_refused(case, pattern, dirs, t1_t2, capsys) -> None:
    inputs, out = dirs
    t1 = t1_t2[0]
    if case == "nrrd zero spacing":
        bad = _nrrd(inputs / "bad.nrrd", "(0,0,0) (0,2,0) (0,0,2)")
    elif case == "nrrd singular":
        bad = _nrrd(inputs / "bad.nrrd", "(2,0,0) (2,0,0) (0,0,2)")
    elif case == "nrrd sheared":
        bad = _nrrd(inputs / "bad.nrrd", "(2,0,0) (1,2,0) (0,0,2)")
    elif case == "nrrd nan origin":
        bad = _nrrd(inputs / "bad.nrrd", "(2,0,0) (0,2,0) (0,0,2)", "(nan,0,0)")
    else:
        # NIfTI-1 header: pixdim[1] at byte 80, qoffset_x at byte 268
        offset, value = {"nifti zero pixdim": (80, 0.0), "nifti negative pixdim": (80, -2.0),
                         "nifti nan pixdim": (80, float("nan")),
                         "nifti nan origin": (268, float("nan"))}[case]
        bad = _nifti_with(t1, inputs / "bad.nii", offset, value)
    assert_clean_error(_fuse([t1, bad], out / "f.nii"), capsys, [bad, t1], out, pattern)


@pytest.mark.parametrize("method", ["average", "max", "laplacian", "gff"])
def test_one_voxel_thick_volume_across_its_short_axis(method, spm12, dirs, capsys) -> None:
    """A one-slice volume fused coronally: 1x91 slices, fused by every classical method (the
    cnn's padding is tested on a 3-slice volume below)."""
    inputs, out = dirs
    t1 = _crop(spm12 / "T1.nii", inputs / "t1.nii", 45, 1)
    t2 = _crop(spm12 / "T2.nii", inputs / "t2.nii", 45, 1)
    code, err = _run(["fuse", t1, t2, "-o", out / "f.nii", "--method", method, "--axis",
                      "coronal", "--progress", "none", "--device", "cpu"], capsys)
    assert code == 0, err
    fused = sitk.GetArrayFromImage(read_volume(out / "f.nii"))
    assert fused.shape == (1, 109, 91) and np.isfinite(fused).all() and fused.max() > 0


# --------------------------------------------------------------------------- metrics
def test_metrics_compares_geometry_in_physical_space(spm12, dirs, capsys) -> None:
    inputs, out = dirs
    t1 = _crop(spm12 / "T1.nii", inputs / "t1.nii", 30, 10)
    # the SPECT on its flipped x grid, one hemisphere blanked so that a mirrored score shows
    spect_image = read_volume(spm12 / "SPECT.nii")
    blanked = sitk.GetArrayFromImage(spect_image)
    blanked[:, :, :45] = 0
    half = sitk.GetImageFromArray(blanked)
    half.CopyInformation(spect_image)
    spect = inputs / "spect.nii"
    sitk.WriteImage(half, str(spect))
    fused = out / "fused.nii"
    assert _run(_fuse([t1, spect], fused), capsys)[0] == 0
    before = [_hash(p) for p in (t1, spect, fused)]
    code, err = _run(["metrics", fused, t1, spect, "--names", "CC"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("medfusion: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert "spect.nii is not on the fused volume's voxel grid (different" in errors[0]
    assert "origin" in errors[0] and "--resample" in errors[0]
    code = main([str(a) for a in ["metrics", fused, t1, spect, "--names", "CC,MI",
                                  "--resample", "--format", "json"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    payload = json.loads(captured.out)
    assert "normalised" in payload["scored"]
    # scored in physical space: the fused volume correlates with the resampled SPECT better
    # than with the SPECT taken voxel by voxel (mirrored)
    from medfusion.metrics import volume_metrics

    fused_array = sitk.GetArrayFromImage(read_volume(fused)).astype(np.float64)
    mirrored = sitk.GetArrayFromImage(read_volume(spect))[30:40].astype(np.float64)
    mirrored = (mirrored - mirrored.min()) / (mirrored.max() - mirrored.min())
    _, naive = volume_metrics(fused_array, [mirrored, mirrored], axis=0, names=["CC"],
                              data_range=1.0)
    assert payload["metrics"]["CC"] > naive["CC"] + 0.05
    assert [_hash(p) for p in (t1, spect, fused)] == before


def test_fuse_metrics_equal_metrics_command_on_colour_pair(aanlib, dirs, capsys) -> None:
    _, out = dirs
    mri = aanlib / "PET-MRI" / "MRI" / "25015.png"
    pet = aanlib / "PET-MRI" / "PET" / "25015.png"
    fused = out / "fused.png"
    code = main([str(a) for a in ["fuse", mri, pet, "-o", fused, "--progress", "none",
                                  "--method", "laplacian", "--metrics", out / "m.json"]])
    assert code == 0
    from_fuse = json.loads((out / "m.json").read_text())
    capsys.readouterr()
    assert main([str(a) for a in ["metrics", fused, mri, pet, "--format", "json"]]) == 0
    from_metrics = json.loads(capsys.readouterr().out)
    assert from_fuse["metrics"] == from_metrics["metrics"]
    assert from_fuse["scored"] == from_metrics["scored"]
    assert "8-bit" in from_fuse["scored"] and "luminance" in from_fuse["scored"]
    assert 0 < from_fuse["metrics"]["FMI"] < 1


# --------------------------------------------------------------------------- CT window
def test_ct_window_refuses_non_hounsfield_inputs(aanlib, dirs, t1_t2, capsys) -> None:
    _, out = dirs
    ct = aanlib / "CT-MRI" / "CT" / sorted(os.listdir(aanlib / "CT-MRI" / "CT"))[0]
    mri = aanlib / "CT-MRI" / "MRI" / ct.name
    assert_clean_error(_fuse([ct, mri], out / "f.png", "--ct-window", "40,80"), capsys,
                       [ct, mri], out, f"{ct.name} holds 8-bit grey levels .*not CT numbers")
    assert_clean_error(_fuse(list(t1_t2), out / "f.nii", "--ct-window", "40,80"), capsys,
                       list(t1_t2), out, "t1.nii does not look like a CT in HU")


# --------------------------------------------------------------------------- names
def test_name_length_limits_are_one_line_errors(aanlib, dirs, capsys) -> None:
    inputs, out = dirs
    mri = aanlib / "PET-MRI" / "MRI" / "25015.png"
    pet = aanlib / "PET-MRI" / "PET" / "25015.png"
    long_name = "x" * 300 + ".png"
    assert_clean_error(_fuse([mri, pet], out / long_name), capsys, [mri, pet], out,
                       "name too long")
    assert_clean_error(_fuse([inputs / long_name, pet], out / "f.png"), capsys, [pet], out,
                       "name too long")
    deep = out / "/".join(["d" * 200] * 25) / "f.png"
    assert_clean_error(_fuse([mri, pet], deep), capsys, [mri, pet], out, "too long")
    # a name near the limit works: the temporary file's name is shortened, not the output's
    near = out / ("y" * 250 + ".png")
    code, err = _run(_fuse([mri, pet], near), capsys)
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == [near.name]


# --------------------------------------------------------------------------- cnn
@pytest.mark.parametrize("shape", [(2, 2), (1, 256), (256, 1)])
def test_cnn_fuses_tiny_images(shape, aanlib, dirs, capsys) -> None:
    inputs, out = dirs
    paths = []
    for modality in ("MRI", "PET"):
        image = Image.open(aanlib / "PET-MRI" / modality / "25015.png")
        paths.append(inputs / f"{modality}.png")
        image.resize((shape[1], shape[0]), Image.BILINEAR).save(paths[-1])
    code, err = _run(["fuse", *paths, "-o", out / "f.png", "--progress", "none", "--device",
                      "cpu"], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(out / "f.png")).shape[:2] == shape


def test_cnn_three_slice_volume_across_short_axis(spm12, dirs, capsys) -> None:
    inputs, out = dirs
    t1 = _crop(spm12 / "T1.nii", inputs / "t1.nii", 44, 3)
    t2 = _crop(spm12 / "T2.nii", inputs / "t2.nii", 44, 3)
    code, err = _run(["fuse", t1, t2, "-o", out / "f.nii", "--axis", "sagittal", "--progress",
                      "none", "--device", "cpu"], capsys)
    assert code == 0, err
    assert read_volume(out / "f.nii").GetSize() == (91, 109, 3)


def test_cnn_weights_error_is_one_line_without_unsafe_advice(aanlib, dirs, capsys) -> None:
    inputs, out = dirs
    bundle = inputs / "bundle"
    shutil.copytree(REPO / "monai_bundle", bundle, ignore=shutil.ignore_patterns("__pycache__"))
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "note": Path("not a tensor")}, bundle / "models" / "model.pt")
    mri = aanlib / "PET-MRI" / "MRI" / "25015.png"
    line = assert_clean_error(["fuse", mri, mri, "-o", out / "f.png", "--bundle", bundle,
                               "--progress", "none"], capsys, [bundle, mri], out,
                              "cannot read CNN weights .*never unpickles")
    assert "weights_only" not in line and "False" not in line


def test_gzip_stream_cut_is_caught_even_with_intact_header(dirs, t1_t2, capsys) -> None:
    inputs, out = dirs
    packed = gzip.compress(t1_t2[0].read_bytes())
    cut = inputs / "cut.nii.gz"
    cut.write_bytes(packed[: len(packed) - 200])
    assert_clean_error(_fuse([cut, t1_t2[1]], out / "f.nii"), capsys, [cut], out,
                       "cut.nii.gz is truncated")


def test_metrics_refuses_nan_sources(dirs, t1_t2, capsys) -> None:
    inputs, out = dirs
    image = read_volume(t1_t2[1])
    array = sitk.GetArrayFromImage(image)
    array[3, 40, 40] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    nan_nrrd = inputs / "t2nan.nrrd"
    sitk.WriteImage(broken, str(nan_nrrd))
    assert_clean_error(["metrics", t1_t2[0], t1_t2[0], nan_nrrd, "-o", out / "m.csv"], capsys,
                       [nan_nrrd, t1_t2[0]], out, "t2nan.nrrd contains NaN or infinite values")
