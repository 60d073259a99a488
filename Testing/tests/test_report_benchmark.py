"""``medfusion benchmark`` end to end on a tiny real dataset (one atlas pair per pair type)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfusion.cli import main
from medfusion.engine import fuse_images
from medfusion.io.images import to_uint8
from medfusion.metrics import compute_metrics
from medfusion.report.runner import mean_ranks, summarise

PAIRS = {"CT-MRI": "2004.png", "PET-MRI": "25038.png", "SPECT-MRI": "25012.png"}
METRICS = "QABF,VIF,SSIM,MI,EN,SD"
ROBUST = ["gaussian:0.05:0.1", "poisson:0.1"]


@pytest.fixture(scope="module")
def tiny_dataset(aanlib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real co-registered groups in the aanlib layout, with a split file."""
    root = tmp_path_factory.mktemp("tiny")
    split = json.loads((aanlib / "splits.json").read_text())["pairs"]
    pairs = {}
    for pair, name in PAIRS.items():
        for modality in split[pair]["modalities"]:
            (root / pair / modality).mkdir(parents=True)
            shutil.copy(aanlib / pair / modality / name, root / pair / modality / name)
        pairs[pair] = {"modalities": split[pair]["modalities"], "validation": [name]}
    (root / "splits.json").write_text(json.dumps({"pairs": pairs}))
    return root


def _run(dataset: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "benchmark",
            str(dataset),
            "-o",
            str(out),
            "--split",
            "validation",
            "--methods",
            "laplacian,average,max",
            "--metrics",
            METRICS,
            "--perturbations",
            *ROBUST,
            "--speed-images",
            "1",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def report(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert _run(tiny_dataset, out, "--seed", "7", "--workers", "2") == 0
    return out


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_has_tables_figures_and_raw_numbers(report: Path) -> None:
    text = (report / "report.md").read_text()
    for heading in (
        "## How to read this",
        "## Quality per pair type",
        "### CT-MRI (1 groups)",
        "### PET-MRI",
        "### SPECT-MRI",
        "## Mean rank",
        "## Block size",
        "## Robustness",
        "### gaussian",
        "### poisson",
        "## Speed and memory",
        "## Image panels",
    ):
        assert heading in text
    assert "| QABF ↑ |" in text and "| mean rank ↓ |" in text
    assert "medfusion benchmark " in text and "--seed 7" in text
    assert "no CNN method" in text  # block-size study skipped without a CNN, and says so
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) >= 6
    for link in links:
        with Image.open(report / link) as image:
            image.verify()
            assert image.format == "PNG"
    # 3 pair types -> 3 panels; 2 perturbation kinds -> 2 robustness curves
    assert sum("panel_" in link for link in links) == 3
    assert sum("robustness_" in link for link in links) == 2
    for name in (
        "metrics.csv",
        "summary.csv",
        "ranks.csv",
        "robustness.csv",
        "speed.csv",
        "results.json",
    ):
        assert (report / name).stat().st_size > 0


def test_csv_numbers_equal_compute_metrics_on_the_same_fusion(
    report: Path, tiny_dataset: Path
) -> None:
    rows = _csv(report / "metrics.csv")
    assert len(rows) == 3 * 3
    names = METRICS.split(",")
    for row in rows:
        pair, group_id = row["group"].split("/")
        modalities = sorted(p.name for p in (tiny_dataset / pair).iterdir())
        paths = [
            tiny_dataset / pair / m / f"{group_id}.png"
            for m in ("MRI", *[m for m in modalities if m != "MRI"])
        ]
        fused = fuse_images(paths, method=row["method"], device="cpu")
        # scored as the 8-bit file `medfusion fuse` writes, on the [0, 1] scale
        eight_bit = to_uint8(fused.luminance).astype(np.float32) / np.float32(255.0)
        expected = compute_metrics(eight_bit, list(fused.sources), names=names, data_range=1.0)
        for name in names:
            assert float(row[name]) == pytest.approx(expected[name], rel=1e-9, abs=1e-12)


def test_summary_and_ranks_follow_the_rows(report: Path) -> None:
    rows = _csv(report / "metrics.csv")
    summary = {(r["pair_type"], r["method"], r["metric"]): r for r in _csv(report / "summary.csv")}
    for row in rows:  # one group per pair type: the mean is the value, the std 0
        entry = summary[(row["pair_type"], row["method"], "QABF")]
        assert float(entry["mean"]) == pytest.approx(float(row["QABF"]))
        assert float(entry["std"]) == 0.0 and entry["n"] == "1"
    results = json.loads((report / "results.json").read_text())
    ranks = results["mean_rank"]["all"]
    assert set(ranks) == {"laplacian", "average", "max"}
    assert sum(ranks.values()) == pytest.approx(1 + 2 + 3)  # ranks of 3 methods average to 2


def test_robustness_has_clean_and_two_levels_against_clean_sources(report: Path) -> None:
    rows = _csv(report / "robustness.csv")
    gaussian = {float(r["level"]) for r in rows if r["kind"] == "gaussian"}
    assert gaussian == {0.0, 0.05, 0.1}
    poisson_groups = {r["group"] for r in rows if r["kind"] == "poisson"}
    assert poisson_groups == {"PET-MRI/25038", "SPECT-MRI/25012"}  # no PET/SPECT in CT-MRI
    results = json.loads((report / "results.json").read_text())
    by_level = {(e["level"], e["method"]): e["QABF"] for e in results["robustness"]["gaussian"]}
    for method in ("laplacian", "average", "max"):
        assert by_level[(0.0, method)] > by_level[(0.1, method)]  # noise costs edge fidelity


def test_same_seed_same_numbers_any_worker_count(
    report: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    assert _run(tiny_dataset, tmp_path, "--seed", "7", "--workers", "1", "--speed-images", "0") == 0
    assert "_Skipped (`--speed-images 0`)._" in (tmp_path / "report.md").read_text()
    for name in ("metrics.csv", "summary.csv", "ranks.csv", "robustness.csv"):
        assert (tmp_path / name).read_text() == (report / name).read_text(), name


def test_missing_or_empty_dataset_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["benchmark", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 1
    assert "medfusion: error: dataset not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["benchmark", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    assert "no co-registered groups found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_options_are_clear_errors(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = str(tmp_path / "out")
    assert main(["benchmark", str(tiny_dataset), "-o", out, "--metrics", "FOO"]) == 1
    assert "medfusion: error: unknown metric 'FOO'" in capsys.readouterr().err
    assert (
        main(
            [
                "benchmark",
                str(tiny_dataset),
                "-o",
                out,
                "--metrics",
                "QABF",
                "--rank-metrics",
                "VIF",
            ]
        )
        == 1
    )
    assert "rank metric 'VIF' must be one of the selected metrics" in capsys.readouterr().err
    assert main(["benchmark", str(tiny_dataset), "-o", out, "--methods", "median"]) == 1
    assert "unknown method 'median'" in capsys.readouterr().err
    assert main(["benchmark", str(tiny_dataset), "-o", out, "--perturbations", "salt"]) == 1
    assert "unknown perturbation 'salt'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mean_ranks_and_summaries() -> None:
    rows = [
        {"group": "g1", "method": "a", "X": 1.0, "Y": 5.0},
        {"group": "g1", "method": "b", "X": 2.0, "Y": 5.0},
        {"group": "g2", "method": "a", "X": 3.0, "Y": math.nan},
        {"group": "g2", "method": "b", "X": 1.0, "Y": 1.0},
    ]
    ranks = mean_ranks(rows, ["a", "b"], ["X", "Y"], {"X": "higher", "Y": "lower"})
    # g1/X: b best; g1/Y: tie (1.5 each); g2/X: a best; g2/Y skipped (NaN)
    assert ranks == {"a": pytest.approx((2 + 1.5 + 1) / 3), "b": pytest.approx((1 + 1.5 + 2) / 3)}
    mean, std, count = summarise([1.0, 3.0, math.nan])
    assert (mean, std, count) == (2.0, pytest.approx(np.sqrt(2.0)), 2)


def test_volume_groups_run_end_to_end(spm12: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from medfusion.engine import fuse_volumes
    from medfusion.intensity import fit_normaliser
    from medfusion.metrics import volume_metrics

    paths = {}
    for modality, name in (("MRI", "T1.nii"), ("PET", "PET.nii")):
        slab = sitk.ReadImage(str(spm12 / name))[:, :, 40:44]  # 4 axial slices, same geometry
        paths[modality] = tmp_path / f"{modality}.nii.gz"
        sitk.WriteImage(slab, str(paths[modality]))
    listing = tmp_path / "groups.json"
    listing.write_text(
        json.dumps(
            [
                {
                    "id": "spm12",
                    "pair_type": "PET-MRI",
                    "sources": {m: str(p) for m, p in paths.items()},
                }
            ]
        )
    )
    out = tmp_path / "report"
    assert (
        main(
            [
                "benchmark",
                str(listing),
                "-o",
                str(out),
                "--methods",
                "average",
                "--metrics",
                "QABF,SSIM",
                "--perturbations",
                "blur:1:2",
                "--speed-images",
                "1",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = {r["method"]: r for r in _csv(out / "metrics.csv")}
    assert set(rows) == {"average", "max"}
    fused = fuse_volumes(paths["MRI"], [paths["PET"]], method="max", device="cpu")
    sources = []
    for path in paths.values():
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        sources.append(fit_normaliser(values, "percentile")(values))
    _, expected = volume_metrics(
        sitk.GetArrayFromImage(fused),
        sources,
        axis=0,
        mask="foreground",
        names=["QABF", "SSIM"],
        data_range=1.0,
    )
    assert float(rows["max"]["QABF"]) == pytest.approx(expected["QABF"], rel=1e-6)
    assert float(rows["max"]["SSIM"]) == pytest.approx(expected["SSIM"], rel=1e-6)
    text = (out / "report.md").read_text()
    assert "| PET-MRI | MRI + PET | volume | 1 |" in text
    with Image.open(out / "figures" / "panel_PET-MRI_spm12.png") as image:
        image.verify()


def test_a_smaller_run_into_the_same_folder_leaves_no_stale_files(
    report: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The report's own files of an earlier, larger run (robustness table and figures, speed
    table) go when a run without them writes into the same folder; a file of the user's stays."""
    out = tmp_path / "again"
    shutil.copytree(report, out)
    (out / "notes.txt").write_text("mine")
    assert (out / "robustness.csv").is_file()
    assert main(["benchmark", str(tiny_dataset), "-o", str(out), "--split", "validation",
                 "--methods", "average,max", "--metrics", METRICS, "--perturbations", "none",
                 "--speed-images", "0", "--block-exponents", "", "--no-progress"]) == 0
    written = set((out / ".medfusion-report-files").read_text().splitlines())
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert present == written | {".medfusion-report-files", "notes.txt"}
    assert not (out / "robustness.csv").exists()


def test_report_folder_and_methods_are_checked_before_anything_runs(
        tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``-o`` naming a file was a FileExistsError traceback; ``-o`` inside the dataset wrote the
    report there (exit 0), and the next run read its ``figures`` folder as a modality;
    ``--methods ""`` ran the default methods without a word."""
    before = sorted(str(p.relative_to(tiny_dataset)) for p in tiny_dataset.rglob("*"))
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    cases = {
        "is a file": ["-o", str(a_file)],
        "inside the dataset folder": ["-o", str(tiny_dataset)],
        "inside the dataset folder ": ["-o", str(tiny_dataset / "CT-MRI" / "report")],
        "names no method": ["-o", str(tmp_path / "out"), "--methods", ","],
    }
    for words, options in cases.items():
        code = main(["benchmark", str(tiny_dataset), *options, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and words.strip() in err[0], err
    assert sorted(str(p.relative_to(tiny_dataset)) for p in tiny_dataset.rglob("*")) == before
    assert a_file.read_text() == "not a folder" and not (tmp_path / "out").exists()
