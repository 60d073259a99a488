"""``medfusion fuse``: real data in, files out; every bad input a one-line error and exit 1."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medfusion.cli import main
from medfusion.io.volumes import read_volume


def _hash(path: Path) -> str:
    if path.is_dir():
        return "".join(_hash(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _crop(source: Path, target: Path, slices: slice) -> Path:
    """A few axial slices of a real volume (keeps tests fast; geometry stays physical)."""
    image = read_volume(source)
    size = list(image.GetSize())
    start = slices.start
    size[2] = slices.stop - slices.start
    sitk.WriteImage(sitk.RegionOfInterest(image, size, [0, 0, start]), str(target))
    return target


def test_fuse_colour_pair_with_metrics(aanlib: Path, tmp_path: Path, capsys) -> None:
    mri = aanlib / "PET-MRI" / "MRI" / "25030.png"
    pet = aanlib / "PET-MRI" / "PET" / "25030.png"
    out = tmp_path / "fused.png"
    code = main(["fuse", str(mri), str(pet), "-o", str(out), "--method", "laplacian",
                 "--progress", "json", "--metrics", str(tmp_path / "m.json")])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"event": "done", "output": str(out)}
    assert {"event": "progress", "done": 1, "total": 1} in lines
    image = np.asarray(Image.open(out))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["method"] == "laplacian"
    assert 0 < metrics["metrics"]["QABF"] <= 1 and metrics["metrics"]["MI"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.png", "m.json"]


def test_fuse_volumes_flipped_spect(spm12: Path, tmp_path: Path, capsys, caplog) -> None:
    t1 = _crop(spm12 / "T1.nii", tmp_path / "t1.nii.gz", slice(40, 46))
    spect = spm12 / "SPECT.nii"  # whole volume on its own flipped grid
    out = tmp_path / "fused.nrrd"
    with caplog.at_level(logging.INFO, logger="medfusion"):
        code = main(["fuse", str(t1), str(spect), "-o", str(out), "--method", "laplacian",
                     "--batch-size", "4", "--progress", "json", "--device", "cpu",
                     "--metrics", str(tmp_path / "m.csv")])
    assert code == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["done"] for e in events if e["event"] == "progress"] == [4, 6]
    assert "SPECT.nii is on another voxel grid" in caplog.text  # stderr in a real process
    fused, ref = read_volume(out), read_volume(t1)
    assert fused.GetSize() == ref.GetSize() == (91, 109, 6)
    assert np.allclose(fused.GetOrigin(), ref.GetOrigin())
    assert np.allclose(fused.GetDirection(), ref.GetDirection())
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0].startswith("slice,") and rows[-1].startswith("mean,")
    assert len(rows) == 1 + 6 + 1


def test_missing_cnn_bundle_suggests_laplacian(aanlib: Path, tmp_path: Path, capsys) -> None:
    mri = aanlib / "PET-MRI" / "MRI" / "25030.png"
    code = main(["fuse", str(mri), str(mri), "-o", str(tmp_path / "f.png"),
                 "--bundle", str(tmp_path / "no-bundle")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("medfusion: error: ") and "--method laplacian" in err
    assert not (tmp_path / "f.png").exists()


def _bad_inputs(kind: str, tmp_path: Path, aanlib: Path, spm12: Path) -> tuple[list[Path], str]:
    """Input paths and the output name of each bad-input case; files built in tmp_path."""
    mri = aanlib / "PET-MRI" / "MRI" / "25030.png"
    t1 = spm12 / "T1.nii"
    if kind == "missing":
        return [mri, tmp_path / "nope.png"], "out.png"
    if kind == "corrupt":
        broken = tmp_path / "broken.png"
        broken.write_bytes(mri.read_bytes()[:300])
        return [mri, broken], "out.png"
    if kind == "image_with_volume":
        return [mri, t1], "out.png"
    if kind == "png_named_nii":  # the renamed file is named, not taken for a 2D/3D mix
        renamed = tmp_path / "renamed.nii"
        renamed.write_bytes(mri.read_bytes())
        return [renamed, mri], "out.png"
    if kind == "size_mismatch":
        small = tmp_path / "small.png"
        Image.open(mri).resize((128, 128)).save(small)
        return [mri, small], "out.png"
    if kind == "nan_voxels":
        image = read_volume(t1)
        image[45, 50, 40] = float("nan")
        sitk.WriteImage(image, str(tmp_path / "nan.mha"))  # NIfTI writer zeroes NaN
        assert np.isnan(sitk.GetArrayViewFromImage(read_volume(tmp_path / "nan.mha"))).any()
        return [t1, tmp_path / "nan.mha"], "out.nii.gz"
    if kind == "all_zero":
        Image.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "zero.png")
        return [mri, tmp_path / "zero.png"], "out.png"
    if kind == "no_overlap":
        image = read_volume(spm12 / "T2.nii")
        image.SetOrigin((500.0, 126.0, -72.0))
        sitk.WriteImage(image, str(tmp_path / "far.nii.gz"))
        return [t1, tmp_path / "far.nii.gz"], "out.nii.gz"
    if kind == "missing_output_folder":
        return [mri, mri], "missing/out.png"
    if kind == "output_overwrites_input":
        copy = tmp_path / "in.png"
        copy.write_bytes(mri.read_bytes())
        return [copy, mri], "../in.png"
    raise AssertionError(kind)


BAD_CASES = {
    "missing": "input not found",
    "corrupt": "cannot read image broken.png",
    "image_with_volume": "cannot fuse a 2D image",
    "png_named_nii": "renamed.nii: not a valid NIfTI file (its content looks like PNG)",
    "size_mismatch": "image sizes differ",
    "nan_voxels": "NaN or infinite",
    "all_zero": "zero.png is all zero",
    "no_overlap": "does not overlap the reference",
    "missing_output_folder": "output folder does not exist",
    "output_overwrites_input": "would overwrite an input",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_is_one_line_exit_1_nothing_written(
    kind: str, tmp_path: Path, aanlib: Path, spm12: Path, capsys
) -> None:
    inputs, output_name = _bad_inputs(kind, tmp_path, aanlib, spm12)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = {p: _hash(p) for p in inputs if p.exists()}
    code = main(["fuse", *map(str, inputs), "-o", str(out_dir / output_name),
                 "--method", "average", "--progress", "none"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("medfusion: error:")]
    assert code == 1
    assert len(errors) == 1 and BAD_CASES[kind] in errors[0], err
    assert list(out_dir.iterdir()) == []
    assert {p: _hash(p) for p in before} == before


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "medfusion", "fuse", str(tmp_path / "a.png"),
         str(tmp_path / "b.png"), "-o", str(tmp_path / "o.png"), "--method", "max"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"medfusion: error: input not found: "
                                                  f"{tmp_path / 'a.png'}"]
    assert result.stdout == ""


def test_ct_window_on_dicom_folder(ct_dicom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct.mha"
    code = main(["fuse", str(ct_dicom_dir), str(ct_dicom_dir), "-o", str(out),
                 "--method", "max", "--ct-window", "40,80", "--progress", "none"])
    assert code == 0
    fused = read_volume(out)
    # the uneven series restacked 4 mm apart; its gantry tilt shifts the slices 48 mm in-plane
    assert fused.GetSize() == (512, 611, 37)
    values = sitk.GetArrayViewFromImage(fused)
    assert values.min() == 0.0 and values.max() == 1.0


def test_options_that_change_nothing_are_not_silent(aanlib: Path, tmp_path: Path, capsys,
                                                    caplog) -> None:
    """--block-exponent or --bundle with a method that has neither is an error (one line,
    nothing written); volume options with 2D images, and one file given twice, succeed with a
    warning that says what was ignored or repeated."""
    ct, mri = aanlib / "CT-MRI" / "CT" / "20005.png", aanlib / "CT-MRI" / "MRI" / "20005.png"
    out = tmp_path / "f.png"
    for option in (["--block-exponent", "2"], ["--bundle", str(tmp_path)]):
        code = main(["fuse", str(ct), str(mri), "-o", str(out), "--method", "average",
                     "--progress", "none", *option])
        assert code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"medfusion: error: {option[0]} applies to --method cnn and sesf only, "
                       "not average"]
        assert not out.exists()
    with caplog.at_level(logging.WARNING):
        code = main(["fuse", str(ct), str(ct), "-o", str(out), "--method", "average",
                     "--progress", "none", "--axis", "coronal", "--batch-size", "4"])
    assert code == 0 and out.exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["--axis applies to volumes only; ignored for 2D images",
                      "--batch-size applies to volumes only; ignored for 2D images",
                      "20005.png and 20005.png are the same file: it is fused with itself"]
