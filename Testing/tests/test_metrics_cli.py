"""``medfusion metrics``: 2D images and volumes, the three formats, files and errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import medfusion.metrics as M
from medfusion.cli import main


@pytest.fixture(scope="module")
def pet_pair(aanlib):
    return (aanlib / "PET-MRI" / "PET" / "25015.png", aanlib / "PET-MRI" / "MRI" / "25015.png")


@pytest.fixture()
def fused_png(tmp_path, pet_pair):
    """Average fusion of the PET luminance and the MRI, saved as 8-bit PNG."""
    from PIL import Image

    rgb = np.asarray(Image.open(pet_pair[0]).convert("RGB"), float) / 255
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    mri = np.asarray(Image.open(pet_pair[1]).convert("L"), float) / 255
    path = tmp_path / "fused.png"
    Image.fromarray(np.round((y + mri) / 2 * 255).astype(np.uint8)).save(path)
    return path, y, mri


def test_json_output_matches_the_library(fused_png, pet_pair, capsys):
    path, y, mri = fused_png
    code = main(["metrics", str(path), *map(str, pet_pair), "--names", "EN", "QAB/F", "SSIM",
                 "--format", "json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)["metrics"]
    fused = np.round((y + mri) / 2 * 255) / 255
    # colour PET enters as its luminance (medfusion.color, float32), like the fusion does
    expected = M.compute_metrics(fused, [y, mri], names=["EN", "QABF", "SSIM"], data_range=1.0)
    assert list(payload) == ["EN", "QABF", "SSIM"]
    for name, value in expected.items():
        assert payload[name] == pytest.approx(value, rel=1e-4)


def test_csv_file_with_target_and_markdown(fused_png, pet_pair, tmp_path, capsys):
    path, _, _ = fused_png
    out = tmp_path / "m.csv"
    assert main(["metrics", str(path), *map(str, pet_pair), "--target", str(pet_pair[1]),
                 "--names", "RMSE,PSNR", "-o", str(out)]) == 0
    rows = dict(csv.reader(out.read_text().splitlines()[1:]))
    assert set(rows) == {"RMSE", "PSNR", "RMSE_target", "PSNR_target"}
    assert float(rows["RMSE_target"]) > 0
    assert main(["metrics", str(path), *map(str, pet_pair), "--names", "MEAN"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| metric | value |") and "| MEAN |" in text


def test_errors_exit_1(fused_png, pet_pair, tmp_path, capsys):
    path, _, _ = fused_png
    assert main(["metrics", str(path), str(pet_pair[0]), "--names", "BOGUS"]) == 1
    assert "unknown metric" in capsys.readouterr().err
    assert main(["metrics", str(path), str(tmp_path / "missing.png")]) == 1
    assert "not found" in capsys.readouterr().err
    from PIL import Image

    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small)
    assert main(["metrics", str(path), str(small)]) == 1
    assert "pixels" in capsys.readouterr().err
    renamed = tmp_path / "renamed.nii"
    renamed.write_bytes(path.read_bytes())
    assert main(["metrics", str(path), str(renamed)]) == 1
    assert "renamed.nii: not a valid NIfTI file (its content looks like PNG)" in (
        capsys.readouterr().err)


def test_output_never_overwrites_an_input_nor_takes_an_image_name(fused_png, pet_pair,
                                                                    tmp_path, capsys):
    """``-o`` naming the fused image or a source (also by another spelling) is refused before
    any work, and an extension that is no table format (an image's) is an error rather than a
    markdown table under that name; both leave every file as it was."""
    import shutil

    path, _, _ = fused_png
    source = tmp_path / "mri.png"
    shutil.copy(pet_pair[1], source)
    before = {p: p.read_bytes() for p in (path, source)}
    for output, extra in ((source, ["--format", "csv"]), (tmp_path / "." / path.name, []),
                          (tmp_path / "table.png", [])):
        code = main(["metrics", str(path), str(source), str(pet_pair[0]), "-o", str(output),
                     "--names", "EN", *extra])
        assert code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medfusion: error: ")
        assert ("would overwrite an input" in err[0]) != output.name.startswith("table")
    assert {p: p.read_bytes() for p in (path, source)} == before
    assert not (tmp_path / "table.png").exists()
    assert main(["metrics", str(path), str(source), "-o", str(tmp_path / "t.txt"),
                 "--names", "EN"]) == 0
    assert (tmp_path / "t.txt").read_text().startswith("| metric | value |")


def test_undefined_metrics_warn_in_one_line_each(tmp_path, capsys):
    """A metric undefined on a tiny image is NaN with a warning: on the command line that is
    one ``medfusion: warning: ...`` line, not Python's file, line and source echo."""
    from PIL import Image

    for name, scale in (("a.png", 20), ("b.png", 10), ("f.png", 15)):
        Image.fromarray((np.arange(9).reshape(3, 3) * scale).astype(np.uint8)).save(tmp_path / name)
    assert main(["metrics", str(tmp_path / "f.png"), str(tmp_path / "a.png"),
                 str(tmp_path / "b.png"), "--names", "SSIM,EN", "--format", "json"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert warned == ["medfusion: warning: SSIM is undefined: images of shape (3, 3) are "
                      "smaller than its 11x11 window; returning NaN"]
    assert json.loads(captured.out)["metrics"]["SSIM"] is None


def test_volumes_per_slice(spm12, tmp_path, capsys):
    import SimpleITK as sitk

    t1 = sitk.ReadImage(str(spm12 / "T1.nii"), sitk.sitkFloat32)
    t2 = sitk.ReadImage(str(spm12 / "T2.nii"), sitk.sitkFloat32)
    a, b = (sitk.GetArrayFromImage(v) for v in (t1, t2))
    fused = sitk.GetImageFromArray(np.maximum(a / a.max(), b / b.max()))
    fused.CopyInformation(t1)
    path = tmp_path / "fused.nrrd"
    sitk.WriteImage(fused, str(path))
    assert main(["metrics", str(path), str(spm12 / "T1.nii"), str(spm12 / "T2.nii"),
                 "--names", "EN", "SSIM", "--per-slice", "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    slices = payload["slices"]
    assert 0 < len(slices) <= a.shape[0] and payload["metrics"]["slices"] == len(slices)
    assert payload["metrics"]["SSIM"] == pytest.approx(np.mean([s["SSIM"] for s in slices]))
    assert all(0 < s["SSIM"] <= 2 for s in slices)


def test_no_metric_named_is_an_error(fused_png, pet_pair, capsys):
    """``--names ""`` printed an empty table and exited 0."""
    path, _, _ = fused_png
    for names in ("", ",,"):
        assert main(["metrics", str(path), *map(str, pet_pair), "--names", names]) == 1
        err = capsys.readouterr().err
        assert "names no metric" in err and "Traceback" not in err


def test_a_float_image_that_is_rescaled_is_said_to_be(fused_png, pet_pair, tmp_path, capsys,
                                                      caplog):
    """A float TIFF outside [0, 1] is scored min-max scaled (an all-negative one as its
    inverse) while the log said "as written": now a warning names the file and its range."""
    from PIL import Image

    path, _, _ = fused_png
    pixels = np.asarray(Image.open(path), np.float32)
    tiffs = {"unit.tif": pixels / 255, "negative.tif": -pixels}
    for name, values in tiffs.items():
        Image.fromarray(values).save(tmp_path / name)
        assert main(["metrics", str(tmp_path / name), *map(str, pet_pair), "--names", "MEAN"]) == 0
        capsys.readouterr()
        rescaled = "min-max scaled" in caplog.text
        assert rescaled == (name == "negative.tif"), caplog.text
        if rescaled:
            assert f"{name} holds float32 values from -{pixels.max():g} to 0," in caplog.text
        caplog.clear()


def test_volume_options_given_for_images_are_warned_about(fused_png, pet_pair, capsys,
                                                          caplog):
    """``--axis``, ``--per-slice`` and the other volume options did nothing on 2D images,
    silently; each is now named in a warning (the numbers are the same)."""
    path, _, _ = fused_png
    args = ["metrics", str(path), *map(str, pet_pair), "--names", "MEAN", "--format", "json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "applies to volumes only" not in caplog.text
    assert main([*args, "--axis", "coronal", "--per-slice", "--normalisation", "minmax"]) == 0
    assert json.loads(capsys.readouterr().out) == plain
    for flag in ("--axis", "--per-slice", "--normalisation"):
        assert f"{flag} applies to volumes only; ignored for 2D images" in caplog.text
    assert "--mask" not in caplog.text and "--resample" not in caplog.text
