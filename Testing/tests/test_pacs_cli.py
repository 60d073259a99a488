"""``medfusion pacs echo|find|fuse|batch`` against the real Orthanc (config files on disk)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pydicom
import pytest

from medfusion.cli import main

# Helper module with the Orthanc fixtures: rewrite its asserts, then register it once.
pytest.register_assert_rewrite("orthanc_server")
from orthanc_server import PATIENT_IDS, PATIENT_NAMES, write_node_file  # noqa: E402

pytest_plugins = ["orthanc_server"]
pytestmark = pytest.mark.pacs

FUSION_ARGS = ["--reference", "modality=MR", "--other", "modality=PT", "--method", "average"]


def test_echo_and_find_with_toml_and_yaml(orthanc, pacs_studies, tmp_path: Path, capsys) -> None:
    toml = write_node_file(orthanc, tmp_path / "nodes.toml")
    yaml = write_node_file(orthanc, tmp_path / "nodes.yaml", retrieve="move")
    assert main(["pacs", "echo", "--config", str(toml), "--node", "orthanc"]) == 0
    assert "node orthanc: OK" in capsys.readouterr().out
    assert main(["pacs", "echo", "--config", str(yaml), "--transport", "dicomweb"]) == 0

    batch = pacs_studies["batch"]
    code = main(["pacs", "find", "--config", str(toml), "--patient-id", "MFBATCH0001", "--series"])
    out = capsys.readouterr().out
    assert code == 0
    assert batch.study_uid in out and "MFBATCH0001" in out  # patient ID is asked-for output
    assert batch.series["MR"] in out and "TEST T1" in out and "TEST PET" in out

    code = main(
        ["pacs", "find", "--config", str(yaml), "--transport", "dicomweb", "--json",
         "--study", batch.study_uid]
    )  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    assert code == 0
    series = payload["series"][batch.study_uid]
    assert {s["modality"]: s["n_instances"] for s in series} == {"MR": 16, "PT": 16}

    # The real GE head CT is its own study; dates filter it out, modality filter finds it.
    ct = pacs_studies["ct"]
    assert main(["pacs", "find", "--config", str(toml), "--modality", "CT", "--json"]) == 0
    studies = json.loads(capsys.readouterr().out)["studies"]
    assert [s["study_uid"] for s in studies] == [ct.study_uid]
    assert studies[0]["n_instances"] == 28


def test_cli_errors_are_one_line(orthanc, tmp_path: Path, capsys) -> None:
    wrong = write_node_file(orthanc, tmp_path / "wrong.toml", called_aet="NOTORTHANC")
    # Orthanc closes the connection right after its A-ASSOCIATE-RJ; on a loaded machine
    # pynetdicom may see the close first. The rejection must be named every time, so try a
    # few times (each try takes milliseconds: the answer never waits for a timeout).
    for _ in range(8):
        assert main(["pacs", "echo", "--config", str(wrong)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("medfusion: error: PACS node 'orthanc'")
        assert "rejected the association (called ae title not recognised)" in err[0]
    assert main(["pacs", "echo", "--config", str(tmp_path / "none.toml")]) == 1
    assert "configuration file not found" in capsys.readouterr().err


def test_fuse_to_folder_only_stores_nothing(orthanc, pacs_studies, tmp_path: Path, capsys):
    config = write_node_file(orthanc, tmp_path / "nodes.toml")
    batch = pacs_studies["batch"]
    before = orthanc.study_series_uids(batch.study_uid)
    out_dir = tmp_path / "fused"
    code = main(
        ["pacs", "fuse", "--config", str(config), "--transport", "dicomweb", "--study",
         batch.study_uid, *FUSION_ARGS, "--no-store", "--output-dir", str(out_dir)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "written to" in capsys.readouterr().out
    files = sorted(out_dir.glob("*.dcm"))
    assert len(files) == 16
    first = pydicom.dcmread(files[0])
    assert first.StudyInstanceUID == batch.study_uid
    assert first.SeriesDescription.startswith("MedFusion fusion MR+PT (average)")
    assert orthanc.study_series_uids(batch.study_uid) == before


def test_batch_fuses_skips_and_reports_failures(
    orthanc, pacs_studies, tmp_path: Path, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    config = write_node_file(orthanc, tmp_path / "nodes.yaml")
    summary = tmp_path / "summary.csv"
    command = [
        "-v", "pacs", "batch", "--config", str(config), "--patient-id", "MFBATCH*", *FUSION_ARGS,
        "--device", "cpu", "--summary", str(summary),
    ]  # fmt: skip
    batch, incomplete = pacs_studies["batch"], pacs_studies["incomplete"]

    assert main(command) == 1  # one study failed
    captured = capsys.readouterr()
    assert "2 studies: 1 fused, 0 skipped, 1 failed" in captured.out
    rows = {row["study_uid"]: row for row in csv.DictReader(summary.open())}
    assert rows[batch.study_uid]["status"] == "fused"
    assert rows[batch.study_uid]["n_instances"] == "16"
    assert rows[incomplete.study_uid]["status"] == "failed"
    assert "incomplete" in rows[incomplete.study_uid]["message"]
    fused_uid = rows[batch.study_uid]["series_uid"]
    assert len(orthanc.series_instances(fused_uid)) == 16
    assert orthanc.study_series_uids(incomplete.study_uid) == set(incomplete.series.values())
    assert "batch: 2 studies match" in caplog.text
    for secret in (*PATIENT_NAMES, *PATIENT_IDS):
        assert secret not in captured.err and secret not in caplog.text

    # Run again: the fused study is skipped (resume), the broken one still fails.
    assert main(command) == 1
    assert "2 studies: 0 fused, 1 skipped, 1 failed" in capsys.readouterr().out
    rows = {row["study_uid"]: row for row in csv.DictReader(summary.open())}
    assert rows[batch.study_uid]["status"] == "skipped"
    assert rows[batch.study_uid]["series_uid"] == fused_uid
    assert len(orthanc.study_series_uids(batch.study_uid)) == 3  # MR, PT, one fused series


def test_batch_summary_that_cannot_be_written_is_refused_before_any_study(
    orthanc, pacs_studies, tmp_path: Path, capsys
) -> None:
    """A --summary in a missing folder used to fail only after the first study was fused and
    stored; one named as the node file overwrote it with the summary."""
    config = write_node_file(orthanc, tmp_path / "nodes.toml")
    batch = pacs_studies["batch"]
    before = orthanc.study_series_uids(batch.study_uid)
    config_text = config.read_text()
    for summary, words in ((tmp_path / "missing" / "s.csv", "output folder does not exist"),
                           (config, "would overwrite an input")):
        code = main(["pacs", "batch", "--config", str(config), "--patient-id", "MFBATCH0001",
                     *FUSION_ARGS, "--device", "cpu", "--summary", str(summary), "--force"])
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if "error" in line]
        assert code == 1 and len(errors) == 1 and words in errors[0], captured.err
        assert "studies:" not in captured.out
        assert orthanc.study_series_uids(batch.study_uid) == before  # nothing stored
    assert config.read_text() == config_text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.toml"]


def test_batch_whose_query_matches_no_study_is_an_error(orthanc, pacs_studies, tmp_path: Path,
                                                         capsys) -> None:
    """A batch over a query that matches nothing (e.g. a mistyped patient ID) used to print
    "0 studies" and exit 0, which a scheduled job reads as success."""
    config = write_node_file(orthanc, tmp_path / "nodes.toml")
    code = main(["pacs", "batch", "--config", str(config), "--patient-id", "NOSUCHPATIENT*",
                 *FUSION_ARGS, "--device", "cpu"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1, captured.err
    assert "no study on node orthanc matches the query" in errors[0]
    assert "studies:" not in captured.out
