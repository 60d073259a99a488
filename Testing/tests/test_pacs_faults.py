"""Stores that a real PACS drops or refuses: never reported as done, always the real reason.

The misbehaving Orthanc (``faulty_orthanc`` in orthanc_server.py) answers success and then
discards MedFusion series, refuses them with a failure status, or refuses storage to one AE title
and one HTTP user by configuration. Each case runs ``medfusion pacs fuse`` end to end and checks
the exit code, the one-line message, that the originals on the PACS are untouched, that no fused
series is left there and that no temporary files remain.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from medfusion.cli import main

pytest.register_assert_rewrite("orthanc_server")
from orthanc_server import (  # noqa: E402
    NO_STORE_AET,
    NO_STORE_USER,
    write_node_file,
)

pytest_plugins = ["orthanc_server"]
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
