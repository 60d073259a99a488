"""``medfusion batch`` (folders and list files) and ``medfusion demo``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfusion.cli import main

NAMES = ("25030.png", "25031.png")


def _pair_folders(tmp_path: Path, aanlib: Path) -> tuple[Path, Path]:
    mri, pet = tmp_path / "MRI", tmp_path / "PET"
    mri.mkdir()
    pet.mkdir()
    for name in NAMES:
        shutil.copy(aanlib / "PET-MRI" / "MRI" / name, mri / name)
        shutil.copy(aanlib / "PET-MRI" / "PET" / name, pet / name)
    return mri, pet


def test_batch_folders_skips_failures_and_exits_1(tmp_path: Path, aanlib: Path, capsys) -> None:
    mri, pet = _pair_folders(tmp_path, aanlib)
    (mri / "broken.png").write_bytes(b"\x89PNG broken")
    (pet / "broken.png").write_bytes(b"\x89PNG broken")
    shutil.copy(mri / NAMES[0], mri / "lonely.png")  # no partner in PET
    out = tmp_path / "out"
    code = main(["batch", str(mri), str(pet), "-o", str(out), "--method", "laplacian",
                 "--progress", "json", "--metrics", str(tmp_path / "items.csv")])
    assert code == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    done = lines[-1]
    assert done["event"] == "done" and done["fused"] == 2
    failed = {item["item"]: item["error"] for item in done["failed"]}
    assert set(failed) == {"broken.png", "lonely.png"}
    assert "cannot read image" in failed["broken.png"]
    assert "input not found" in failed["lonely.png"]
    assert [e["done"] for e in lines if e["event"] == "progress"] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    for name in NAMES:
        assert np.asarray(Image.open(out / name)).shape == (256, 256, 3)
    rows = (tmp_path / "items.csv").read_text().splitlines()
    assert rows[0].startswith("item,") and len(rows) == 1 + 2 + 1


def test_batch_from_csv_and_json_lists(tmp_path: Path, aanlib: Path, spm12: Path) -> None:
    mri, pet = _pair_folders(tmp_path, aanlib)
    listing = tmp_path / "groups.csv"
    listing.write_text(
        "reference,other,output\n"
        f"MRI/{NAMES[0]},PET/{NAMES[0]},first.png\n"
        f"MRI/{NAMES[1]},PET/{NAMES[1]},\n"
    )
    assert main(["batch", "--list", str(listing), "-o", str(tmp_path / "a"),
                 "--method", "average", "--progress", "none"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(["first.png", NAMES[1]])

    # a cell past the header (here after the output) is refused, naming the line, rather than
    # taken as a third input; the output column's name is matched whatever its case
    listing.write_text("reference,other,Output\n"
                       f"MRI/{NAMES[0]},PET/{NAMES[0]},second.png,PET/{NAMES[1]}\n")
    assert main(["batch", "--list", str(listing), "-o", str(tmp_path / "c"),
                 "--method", "average", "--progress", "none"]) == 1
    assert not (tmp_path / "c").exists()
    listing.write_text(f"reference,other,Output\nMRI/{NAMES[0]},PET/{NAMES[0]},second.png\n")
    assert main(["batch", "--list", str(listing), "-o", str(tmp_path / "c"),
                 "--method", "average", "--progress", "none"]) == 0
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["second.png"]

    # an item that fails leaves no empty subfolder of its own behind; another item's stays
    listing.write_text("reference,other,output\n"
                       f"MRI/{NAMES[0]},PET/no-such.png,sub/deeper/x.png\n"
                       f"MRI/{NAMES[0]},PET/{NAMES[0]},kept/y.png\n")
    assert main(["batch", "--list", str(listing), "-o", str(tmp_path / "e"),
                 "--method", "average", "--progress", "none"]) == 1
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["kept"]

    # JSON: a misspelt key, or an input that is no file name, is refused naming the group
    for group in ({"inputs": [f"MRI/{NAMES[0]}", f"PET/{NAMES[0]}"], "outptu": "x.png"},
                  {"inputs": [f"MRI/{NAMES[0]}", None]}):
        (tmp_path / "bad.json").write_text(json.dumps([group]))
        assert main(["batch", "--list", str(tmp_path / "bad.json"), "-o", str(tmp_path / "d"),
                     "--method", "average", "--progress", "none"]) == 1
        assert not (tmp_path / "d").exists()

    groups = [{"inputs": [str(spm12 / "T1.nii"), str(spm12 / "PET.nii")], "output": "tp.nii.gz"}]
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    assert main(["batch", "--list", str(tmp_path / "groups.json"), "-o", str(tmp_path / "b"),
                 "--method", "average", "--progress", "none", "--device", "cpu"]) == 0
    assert (tmp_path / "b" / "tp.nii.gz").is_file()


def test_batch_needs_two_folders(tmp_path: Path, capsys) -> None:
    assert main(["batch", str(tmp_path), "-o", str(tmp_path / "o"), "--method", "max"]) == 1
    assert "at least one other folder" in capsys.readouterr().err


def test_demo_unknown_method_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["demo", "-o", str(tmp_path / "demo"), "--method", "bogus"])
    assert caught.value.code == 2
    assert not (tmp_path / "demo").exists()


def test_demo_writes_image_panel_and_metrics(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--method", "laplacian", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "fused.png") in printed and str(out / "panel.png") in printed
    fused = np.asarray(Image.open(out / "fused.png"))
    panel = np.asarray(Image.open(out / "panel.png"))
    assert fused.shape == (256, 256, 3)
    assert panel.shape[1] > 3 * 256 and panel.shape[2] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "laplacian" and metrics["metrics"]["EN"] > 0


def test_demo_sample_ships_with_notice(repo_root: Path) -> None:
    demo = repo_root / "Resources" / "demo"
    assert (demo / "mri.png").stat().st_size < 100_000
    assert "Whole Brain Atlas" in (demo / "NOTICE.md").read_text()


def test_refused_commands_create_no_output_folder(tmp_path: Path, aanlib: Path,
                                                  capsys) -> None:
    """A metrics file of the wrong kind (batch) or a missing GPU (demo) is refused after the
    output folder was made: an empty folder was left behind."""
    import torch

    mri, pet = _pair_folders(tmp_path, aanlib)
    out = tmp_path / "out"
    assert main(["batch", str(mri), str(pet), "-o", str(out), "--method", "average",
                 "--metrics", str(tmp_path / "m.txt")]) == 1
    assert "m.txt" in capsys.readouterr().err
    assert not out.exists()
    if not torch.cuda.is_available():
        assert main(["demo", "-o", str(out), "--method", "laplacian", "--device", "cuda"]) == 1
        assert "CUDA" in capsys.readouterr().err
        assert not out.exists()


def test_batch_names_namesakes_by_their_folders_and_tells_of_unmatched_entries(
        tmp_path: Path, aanlib: Path, caplog) -> None:
    """Folders pair entries by name, so a size mismatch names ``MRI/x.png`` and ``PET/x.png``
    (it said ``x.png`` twice); entries of another folder with no namesake in the reference
    folder are not fused, and the batch says which."""
    mri, pet = _pair_folders(tmp_path, aanlib)
    small = Image.open(pet / NAMES[0]).resize((200, 128))
    small.save(pet / NAMES[0])
    shutil.copy(pet / NAMES[1], pet / "extra.png")
    code = main(["batch", str(mri), str(pet), "-o", str(tmp_path / "out"), "--method",
                 "average", "--progress", "none"])
    err = caplog.text
    assert code == 1
    assert f"MRI/{NAMES[0]} is 256x256, PET/{NAMES[0]} is 200x128" in err, err
    assert "1 entry of PET has no namesake in the reference folder MRI" in err, err
    assert "extra.png" in err and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        NAMES[1]]


def test_batch_list_with_an_output_of_the_wrong_kind_is_refused_before_any_work(
        tmp_path: Path, aanlib: Path, capsys) -> None:
    """An output extension that cannot hold the group's result (a 2D image as ``.xyz`` or
    ``.nii.gz``) refuses the whole list up front, naming the row; nothing is created."""
    mri, pet = _pair_folders(tmp_path, aanlib)
    listing = tmp_path / "groups.csv"
    listing.write_text("reference,other,output\n"
                       f"MRI/{NAMES[0]},PET/{NAMES[0]},first.png\n"
                       f"MRI/{NAMES[1]},PET/{NAMES[1]},second.xyz\n")
    out = tmp_path / "out"
    code = main(["batch", "--list", str(listing), "-o", str(out), "--method", "average"])
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert code == 1 and not out.exists()
    assert len(err) == 1 and "line 3 of groups.csv" in err[0] and "second.xyz" in err[0], err


def test_namesakes_are_named_by_the_paths_given_and_no_more_folders_than_needed(
        tmp_path: Path) -> None:
    """Messages name same-named inputs by their paths as given (a link's target folders, which
    may name the patient, never show) and each by its own fewest folders."""
    from medfusion.engine import _labels

    for patient in ("Doe_John", "Roe_Jane"):
        (tmp_path / "store" / patient).mkdir(parents=True)
        (tmp_path / "store" / patient / "3.png").write_bytes(b"")
    for folder, patient in (("c", "Doe_John"), ("e", "Roe_Jane")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").symlink_to(tmp_path / "store" / patient / "3.png")
    assert _labels([tmp_path / "c" / "x.png", tmp_path / "e" / "x.png"]) == ["c/x.png", "e/x.png"]
    nested = [tmp_path / "Doe" / "scan1" / "3.png", tmp_path / "Roe" / "scan1" / "3.png",
              tmp_path / "Roe" / "scan2" / "3.png"]
    assert _labels(nested) == ["Doe/scan1/3.png", "Roe/scan1/3.png", "scan2/3.png"]
