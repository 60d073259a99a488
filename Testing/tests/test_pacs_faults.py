"""Stores that a real PACS drops or refuses: never reported as done, always the real reason.

The misbehaving Orthanc (``faulty_orthanc`` in orthanc_server.py) answers success and then
discards MedFusion series, refuses them with a failure status, or refuses storage to one AE title
and one HTTP user by configuration. Each case runs ``medfusion pacs fuse`` end to end and checks
the exit code, the one-line message, that the originals on the PACS are untouched, that no fused
series is left there and that no temporary files remain.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from medfusion.cli import main

pytest.register_assert_rewrite("orthanc_server")
from orthanc_server import (  # noqa: E402
    DROP_PATIENT_ID,
    NO_STORE_AET,
    NO_STORE_USER,
    write_node_file,
)

pytest_plugins = ["orthanc_server"]
REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.pacs

FUSION_ARGS = ["--reference", "modality=MR", "--other", "modality=PT", "--method", "average",
               "--device", "cpu"]  # fmt: skip

CASES = {
    # case: (study, transport, node overrides, words the one-line message must contain)
    "dropped-dimse": ("drop", "dimse", {}, ["acknowledged all 8 instances", "holds 0 of them",
                                            "not stored"]),
    "dropped-dicomweb": ("drop", "dicomweb", {}, ["acknowledged all 8 instances",
                                                  "holds 0 of them", "not stored"]),
    "refused-status-dimse": ("refuse", "dimse", {}, ["refused instance 1 of 8",
                                                     "C-STORE status 0xA700",
                                                     "out of resources"]),
    "refused-ae-dimse": ("drop", "dimse", {"calling_aet": NO_STORE_AET},
                         ["aborted the association during C-STORE", repr(NO_STORE_AET),
                          "0 of 8 instances were stored"]),
    "refused-user-dicomweb": ("drop", "dicomweb", {"username": NO_STORE_USER},
                              ["denied access (HTTP 403) to the STOW-RS"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_store_the_pacs_does_not_keep_is_an_error(
    case: str, faulty_orthanc, tmp_path: Path, capsys, monkeypatch
) -> None:
    study_key, transport, overrides, words = CASES[case]
    study = faulty_orthanc.studies[study_key]
    config = write_node_file(faulty_orthanc, tmp_path / "nodes.toml", **overrides)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    series_before = faulty_orthanc.study_series_uids(study.study_uid)
    digests_before = {uid: faulty_orthanc.series_digest(uid) for uid in study.series.values()}

    code = main(["pacs", "fuse", "--config", str(config), "--transport", transport,
                 "--study", study.study_uid, *FUSION_ARGS])  # fmt: skip

    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert code == 1, captured.err
    assert "stored" not in captured.out  # no success line
    assert len(errors) == 1 and errors[0].startswith("medfusion: error: "), captured.err
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in captured.err
    assert faulty_orthanc.study_series_uids(study.study_uid) == series_before  # no fused series
    for uid, digests in digests_before.items():
        assert faulty_orthanc.series_digest(uid) == digests  # originals untouched
    assert list(private_tmp.iterdir()) == []  # retrieved DICOM removed


def test_source_values_too_long_for_their_vr_are_repaired_quietly(
    faulty_orthanc, tmp_path: Path, capsys, caplog, monkeypatch
) -> None:
    """A source SoftwareVersions (LO) over 64 characters: trimmed, with one debug line and no
    pydicom warning (it used to warn twice)."""
    import logging
    import warnings

    import pydicom

    caplog.set_level(logging.DEBUG)
    study = faulty_orthanc.studies["long-values"]
    config = write_node_file(faulty_orthanc, tmp_path / "nodes.toml")
    out_dir = tmp_path / "fused"
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["-v", "pacs", "fuse", "--config", str(config), "--study", study.study_uid,
                     *FUSION_ARGS, "--no-store", "--output-dir", str(out_dir)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [str(w.message) for w in caught if "exceeds the maximum length" in str(w.message)] == []
    assert [r for r in caplog.records if r.name == "pydicom"] == []
    repaired = [r.getMessage() for r in caplog.records if "too long for their VR" in r.getMessage()]
    assert len(repaired) == 1 and repaired[0].startswith("reference header values")
    assert "trimmed SoftwareVersions, StationName" in repaired[0]
    files = sorted(out_dir.glob("*.dcm"))
    assert len(files) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading the output back must not warn either
        first = pydicom.dcmread(files[0])
        versions = list(first.SoftwareVersions)
        station = first.StationName
    assert versions == [("scanner software " + "9.1." * 20)[:64], "recon 2"]
    assert station == "STATION-NAME-TOO"
    assert list(private_tmp.iterdir()) == []  # success removes the retrieved DICOM too


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_pacs_fuse_removes_the_retrieved_dicom(
    signum: int, faulty_orthanc, tmp_path: Path
) -> None:
    """Real signal to a real ``python -m medfusion pacs fuse`` while the retrieved series sit in
    its private temporary folder: the folder goes, the exit code is 128 + signal."""
    study = faulty_orthanc.studies["drop"]
    config = write_node_file(faulty_orthanc, tmp_path / "nodes.toml")
    private_tmp, out_dir = tmp_path / "tmp", tmp_path / "fused"
    private_tmp.mkdir()
    digests_before = {uid: faulty_orthanc.series_digest(uid) for uid in study.series.values()}
    environment = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "medfusion", "pacs", "fuse", "--config", str(config),
         "--study", study.study_uid, "--reference", "modality=MR", "--other", "modality=PT",
         "--method", "laplacian", "--no-store", "--output-dir", str(out_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        workdir = _wait_for_workdir(process, private_tmp)
        # Freeze it so the fusion cannot finish before the signal lands, then signal.
        process.send_signal(signal.SIGSTOP)
        mode = stat.S_IMODE(workdir.stat().st_mode)
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert mode == 0o700  # private: retrieved patient data
    assert process.returncode == 128 + signum, err
    expected = "medfusion: terminated" if signum == signal.SIGTERM else "medfusion: cancelled"
    assert err.strip().splitlines()[-1] == expected
    assert "Traceback" not in err
    assert list(private_tmp.iterdir()) == []  # no retrieved DICOM left
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.toml", "tmp"]
    for uid, digests in digests_before.items():
        assert faulty_orthanc.series_digest(uid) == digests


def _wait_for_workdir(process: subprocess.Popen, folder: Path, limit_s: float = 180) -> Path:
    """The ``medfusion-pacs-*`` folder once the first retrieved instance is in it."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for workdir in folder.glob("medfusion-pacs-*"):
            if any(workdir.rglob("*.dcm")):
                return workdir
        if process.poll() is not None:
            pytest.fail(f"pacs fuse ended ({process.returncode}) before it retrieved anything: "
                        f"{process.stderr.read() if process.stderr else ''}")
        time.sleep(0.002)
    pytest.fail("pacs fuse did not retrieve anything in time")


def test_failed_store_leaves_no_output_folder(faulty_orthanc, tmp_path: Path, capsys) -> None:
    """Store and folder together: a store the PACS refuses (our AE title may not store) left the
    fused folder behind, so the command failed yet looked half done, and a batch run again
    failed on "output folder already exists" instead of trying the store again. Now the folder
    is written only after the store is verified."""
    study = faulty_orthanc.studies["drop"]
    refused = write_node_file(faulty_orthanc, tmp_path / "nodes.toml", calling_aet=NO_STORE_AET)
    out = tmp_path / "fused"
    code = main(["pacs", "fuse", "--config", str(refused), "--transport", "dimse",
                 "--study", study.study_uid, *FUSION_ARGS, "--output-dir", str(out)])
    assert code == 1 and "aborted the association during C-STORE" in capsys.readouterr().err
    assert not out.exists()
    root = tmp_path / "batch"
    root.mkdir()
    summary = tmp_path / "summary.json"
    batch = ["pacs", "batch", "--config", str(refused), "--transport", "dimse", "--patient-id",
             DROP_PATIENT_ID, *FUSION_ARGS, "--output-root", str(root), "--summary", str(summary)]
    for _ in range(2):  # run again: the same reason, not "output folder already exists"
        assert main(batch) == 1
        rows = json.loads(summary.read_text())
        assert [r["status"] for r in rows] == ["failed"]
        assert "aborted the association during C-STORE" in rows[0]["message"], rows
        assert list(root.iterdir()) == []
    assert faulty_orthanc.study_series_uids(study.study_uid) == set(study.series.values())
    # the folder is written after the store, so its parent is checked before anything
    code = main(["pacs", "fuse", "--config", str(refused), "--transport", "dimse",
                 "--study", study.study_uid, *FUSION_ARGS,
                 "--output-dir", str(tmp_path / "missing" / "fused")])
    assert code == 1 and "output folder does not exist" in capsys.readouterr().err
    assert "series-" not in " ".join(p.name for p in tmp_path.iterdir())
