"""``pacs fuse`` and misalignment, against the real Orthanc: a study whose PET series is moved
14 mm off the MR is fused with a "misaligned" line in the summary, and ``--register rigid``
aligns it (the summary is then silent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfusion.cli import main

pytest.register_assert_rewrite("orthanc_server")
from orthanc_server import BIRTH_DATE, write_node_file, write_volume_series  # noqa: E402

pytest_plugins = ["orthanc_server"]
pytestmark = pytest.mark.pacs

FUSION_ARGS = ["--reference", "modality=MR", "--other", "modality=PT", "--method", "average",
               "--no-store"]


@pytest.fixture(scope="module")
def moved_study(orthanc, data_root: Path, tmp_path_factory) -> str:
    """Upload MR (SPM12 T1) and PT (SPM12 PET, origin moved by (12, -8, 4) mm); its UID."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    spm12 = data_root / "volumes" / "spm12"
    folder = tmp_path_factory.mktemp("pacs-moved")
    study = {
        "PatientName": "TEST^REGISTER", "PatientID": "MFREG0001",
        "PatientBirthDate": BIRTH_DATE, "PatientSex": "O",
        "StudyInstanceUID": generate_uid(), "StudyDate": "20240103", "StudyTime": "101500",
        "StudyID": "1", "AccessionNumber": "ACCREG1", "ReferringPhysicianName": "",
        "StudyDescription": "BRAIN MR PET MOVED", "FrameOfReferenceUID": generate_uid(),
    }
    files = []
    for modality, name, number, shift in (("MR", "T1.nii", 3, (0.0, 0.0, 0.0)),
                                          ("PT", "PET.nii", 4, (12.0, -8.0, 4.0))):
        image = sitk.ReadImage(str(spm12 / name), sitk.sitkFloat32)[:, :, 30:62]
        image.SetOrigin(tuple(o + s for o, s in zip(image.GetOrigin(), shift, strict=True)))
        out = folder / modality
        out.mkdir()
        files += write_volume_series(image, out, modality=modality, study=study,
                                     series_uid=generate_uid(), series_number=number,
                                     description=f"TEST {name[:-4]}")
    orthanc.upload(files)
    return study["StudyInstanceUID"]


def test_summary_says_misaligned_and_register_fixes_it(orthanc, moved_study: str,
                                                       tmp_path: Path, capsys) -> None:
    config = write_node_file(orthanc, tmp_path / "nodes.toml")
    base = ["pacs", "fuse", "--config", str(config), "--transport", "dicomweb", "--study",
            moved_study, *FUSION_ARGS]
    assert main([*base, "--output-dir", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "looks misaligned" in line]
    assert len(lines) == 1 and "--register rigid" in lines[0], out
    assert main([*base, "--output-dir", str(tmp_path / "registered"), "--register",
                 "rigid"]) == 0
    out = capsys.readouterr().out
    assert "looks misaligned" not in out and "written to" in out
    assert len(list((tmp_path / "registered").glob("*.dcm"))) == 32
