"""Group discovery for ``medfusion benchmark``: aanlib folders, splits, CSV/JSON lists, volumes."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from medfusion.errors import InputError
from medfusion.report.dataset import discover_groups, select_subset


def test_aanlib_validation_split_has_the_documented_pairs(aanlib: Path) -> None:
    groups = discover_groups(aanlib, split="validation")
    counts = Counter(g.pair_type for g in groups)
    assert counts == {"CT-MRI": 39, "PET-MRI": 94, "SPECT-MRI": 56}
    split = json.loads((aanlib / "splits.json").read_text())["pairs"]
    for group in groups:
        assert group.kind == "image"
        assert group.modalities == tuple(split[group.pair_type]["modalities"])
        assert f"{group.group_id}.png" in split[group.pair_type]["validation"]
        assert all(p.is_file() and p.name == f"{group.group_id}.png" for p in group.paths)
    assert len(discover_groups(aanlib)) == 694  # no split: every pair of every folder


def _copy_pair(aanlib: Path, root: Path, pair: str, name: str) -> None:
    for modality_dir in (aanlib / pair).iterdir():
        target = root / pair / modality_dir.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(modality_dir / name, target / name)


def test_folder_without_split_file_pairs_files_by_name(aanlib: Path, tmp_path: Path) -> None:
    _copy_pair(aanlib, tmp_path, "CT-MRI", "2004.png")
    _copy_pair(aanlib, tmp_path, "PET-MRI", "25038.png")
    (tmp_path / "PET-MRI" / "MRI" / "99999.png").write_bytes(b"")  # no PET partner: left out
    groups = discover_groups(tmp_path)
    assert [g.label for g in groups] == ["CT-MRI/2004", "PET-MRI/25038"]
    assert groups[0].modalities == ("CT", "MRI")  # sorted without a split file
    with pytest.raises(InputError, match="no split file"):
        discover_groups(tmp_path, split="validation")


def test_unknown_split_and_missing_files_are_clear_errors(aanlib: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="split 'test' not in"):
        discover_groups(aanlib, split="test")
    _copy_pair(aanlib, tmp_path, "CT-MRI", "2004.png")
    (tmp_path / "splits.json").write_text(
        json.dumps(
            {"pairs": {"CT-MRI": {"modalities": ["MRI", "CT"], "val": ["2004.png", "x.png"]}}}
        )
    )
    with pytest.raises(InputError, match="not in every modality folder"):
        discover_groups(tmp_path, split="val")


def test_empty_or_missing_dataset_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset not found"):
        discover_groups(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no co-registered groups found"):
        discover_groups(tmp_path)
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(InputError, match="folder, a .csv or a .json"):
        discover_groups(tmp_path / "list.txt")


def test_csv_list_with_relative_paths_and_split(aanlib: Path, tmp_path: Path) -> None:
    _copy_pair(aanlib, tmp_path, "SPECT-MRI", "25012.png")
    table = tmp_path / "groups.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "split", "MRI", "SPECT"])
        writer.writerow(["a", "test", "SPECT-MRI/MRI/25012.png", "SPECT-MRI/SPECT/25012.png"])
        writer.writerow(["b", "train", "SPECT-MRI/MRI/25012.png", "SPECT-MRI/SPECT/25012.png"])
    groups = discover_groups(table, split="test")
    assert [g.label for g in groups] == ["MRI-SPECT/a"]
    assert groups[0].paths[1] == tmp_path / "SPECT-MRI" / "SPECT" / "25012.png"
    table.write_text("id,MRI,CT\nz,missing.png,missing2.png\n")
    with pytest.raises(InputError, match="MRI file not found"):
        discover_groups(table)


def test_json_list_of_volume_groups(spm12: Path, tmp_path: Path) -> None:
    listing = tmp_path / "volumes.json"
    listing.write_text(
        json.dumps(
            {
                "groups": [
                    {
                        "id": "t1-pet",
                        "pair_type": "PET-MRI",
                        "sources": {"MRI": str(spm12 / "T1.nii"), "PET": str(spm12 / "PET.nii")},
                    },
                ]
            }
        )
    )
    (group,) = discover_groups(listing)
    assert (group.kind, group.pair_type, group.modalities) == ("volume", "PET-MRI", ("MRI", "PET"))
    listing.write_text(json.dumps([{"id": "x", "sources": {"MRI": str(spm12 / "T1.nii")}}]))
    with pytest.raises(InputError, match="needs >= 2"):
        discover_groups(listing)


def test_seeded_subset_is_stable_and_covers_every_pair_type(aanlib: Path) -> None:
    groups = discover_groups(aanlib, split="validation")
    first = select_subset(groups, 30, seed=0)
    assert first == select_subset(groups, 30, seed=0)
    assert first != select_subset(groups, 30, seed=1)
    assert Counter(g.pair_type for g in first) == {"CT-MRI": 6, "PET-MRI": 15, "SPECT-MRI": 9}
    assert select_subset(groups, 500, seed=0) == groups


def test_files_without_a_partner_are_named_not_dropped_silently(aanlib: Path, tmp_path: Path,
                                                                caplog) -> None:
    import logging

    for modality in ("MRI", "PET"):
        (tmp_path / "P" / modality).mkdir(parents=True)
    names = sorted(p.name for p in (aanlib / "PET-MRI" / "PET").iterdir())[:3]
    for name in names:
        shutil.copy(aanlib / "PET-MRI" / "MRI" / name, tmp_path / "P" / "MRI" / name)
    for name in names[:2]:
        shutil.copy(aanlib / "PET-MRI" / "PET" / name, tmp_path / "P" / "PET" / name)
    with caplog.at_level(logging.WARNING):
        groups = discover_groups(tmp_path)
    assert len(groups) == 2
    assert f"P: 1 file(s) not in every modality folder, left out: {names[2]}" in caplog.text
