"""Round trips and faults against a real Orthanc, over DIMSE (C-GET and C-MOVE) and DICOMweb.

find -> retrieve -> fuse -> build -> store -> find again; the stored series is read back and
compared (tags, geometry, voxel values) with a local fusion of the same source files.
"""

from __future__ import annotations

import logging
import socket

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medfusion.errors import PacsError
from medfusion.pacs.config import parse_config
from medfusion.pacs.records import StudyQuery
from medfusion.pacs.selection import SeriesSelector
from medfusion.pacs.workflow import FusionPlan, fuse_study, open_client

# Helper module with the Orthanc fixtures: rewrite its asserts, then register it once.
pytest.register_assert_rewrite("orthanc_server")
from orthanc_server import BIRTH_DATE, PATIENT_IDS, PATIENT_NAMES, free_port  # noqa: E402

pytest_plugins = ["orthanc_server"]
pytestmark = pytest.mark.pacs

PLAN = FusionPlan(
    reference=SeriesSelector.parse("modality=MR"),
    others=(SeriesSelector.parse("modality=PT"),),
    method="average",
    device="cpu",
)
TRANSPORTS = [("dimse", "get"), ("dimse", "move"), ("dicomweb", "get")]


def client_for(server, transport: str = "dimse", **overrides):
    return open_client(parse_config(server.node_config(**overrides)).node("orthanc"), transport)


@pytest.fixture(scope="module")
def expected_fusion(pacs_studies):
    """The same fusion computed locally from the files that were uploaded."""
    import SimpleITK as sitk

    from medfusion.engine import fuse_volumes
    from medfusion.io.volumes import read_volume

    study = pacs_studies["fusion"]
    mr = read_volume(study.files["MR"][0].parent)
    pt = read_volume(study.files["PT"][0].parent)
    fused = fuse_volumes(mr, [pt], method="average", device="cpu")
    return mr, sitk.GetArrayFromImage(fused)


@pytest.mark.parametrize(("transport", "retrieve"), TRANSPORTS)
def test_round_trip_find_fuse_store_find(
    orthanc,
    pacs_studies,
    expected_fusion,
    transport,
    retrieve,
    tmp_path,
    caplog,
):
    import SimpleITK as sitk

    from medfusion.io.volumes import read_volume

    caplog.set_level(logging.DEBUG)
    study = pacs_studies["fusion"]
    originals = {m: orthanc.series_digest(uid) for m, uid in study.series.items()}
    client = client_for(orthanc, transport, retrieve=retrieve)
    client.echo()

    found = client.find_studies(StudyQuery(patient_id="MFTEST*", modality="MR"))
    assert [s.study_uid for s in found] == [study.study_uid]
    assert set(found[0].modalities) >= {"MR", "PT"}
    before = {s.series_uid for s in client.find_series(study.study_uid)}

    result = fuse_study(client, study.study_uid, PLAN, output_dir=tmp_path / "written")
    assert result.stored and result.n_instances == 91
    assert result.source_series == (study.series["MR"], study.series["PT"])

    after = client.find_series(study.study_uid)
    new = [s for s in after if s.series_uid not in before]
    assert [s.series_uid for s in new] == [result.series_uid]
    assert new[0].n_instances == 91 and new[0].modality == "MR"
    assert new[0].description == "MedFusion fusion MR+PT (average) not for diagnostic use"

    # Read the stored series back from the PACS (not the local copy) and check it.
    folder = tmp_path / "back"
    files = client.retrieve_series(study.study_uid, result.series_uid, folder)
    assert len(files) == 91
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    source_uids = {
        m: {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        for m, paths in study.files.items()
    }
    first_source = pydicom.dcmread(study.files["MR"][0], stop_before_pixels=True)
    for ds in headers:
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SOPClassUID == first_source.SOPClassUID
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyInstanceUID",
            "AccessionNumber",
            "FrameOfReferenceUID",
            "StudyDate",
        ):
            assert ds.get(keyword) == first_source.get(keyword), keyword
        assert str(ds.SOPInstanceUID) not in source_uids["MR"] | source_uids["PT"]
        refs = [str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence]
        assert refs[0] in source_uids["MR"] and refs[1] in source_uids["PT"]
        assert {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence} == set(
            study.series.values()
        )
        assert "MR + PT" in ds.DerivationDescription
        assert ds.ContributingEquipmentSequence[-1].Manufacturer == "MedFusion"
        assert "method average" in list(ds.ContributingEquipmentSequence[-1].SoftwareVersions)
    assert len({str(ds.SOPInstanceUID) for ds in headers}) == 91

    reference, expected = expected_fusion
    back = read_volume(folder)
    assert back.GetSize() == reference.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), reference.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(back)
    assert float(values.max()) > 0.5  # real content, not an empty volume
    np.testing.assert_allclose(values, expected, atol=0.5e-4 + 1e-6)  # slope 0.0001
    # The local copy is the same series.
    assert len(list((tmp_path / "written").glob("*.dcm"))) == 91

    # The originals are byte-for-byte what was uploaded; no identifiers reached the logs.
    assert {m: orthanc.series_digest(uid) for m, uid in study.series.items()} == originals
    assert "C-" in caplog.text or "RS" in caplog.text  # the transport did log
    for secret in (*PATIENT_NAMES, *PATIENT_IDS, BIRTH_DATE, "ACC0001"):
        assert secret not in caplog.text


@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_pacs_down_is_a_clear_error(orthanc, transport):
    client = client_for(orthanc, transport, dicom_port=free_port(), http_port=free_port())
    with pytest.raises(PacsError, match="cannot reach .*connection refused"):
        client.echo()


def test_wrong_called_ae_title_is_rejected(orthanc, pacs_studies):
    study = pacs_studies["fusion"]
    before = orthanc.study_series_uids(study.study_uid)
    client = client_for(orthanc, "dimse", called_aet="NOTORTHANC")
    with pytest.raises(PacsError, match="rejected the association .*called_aet 'NOTORTHANC'"):
        client.echo()
    with pytest.raises(PacsError, match="rejected the association"):
        fuse_study(client, study.study_uid, PLAN)
    assert orthanc.study_series_uids(study.study_uid) == before


@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_timeout_is_a_clear_error(orthanc, transport):
    """A server that accepts TCP connections and never answers (listening, never reading)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = client_for(orthanc, transport, dicom_port=port, http_port=port, timeout=1)
        with pytest.raises(PacsError, match="within 1 s"):
            client.find_studies(StudyQuery())


@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_missing_study_and_series(orthanc, pacs_studies, transport, tmp_path):
    study = pacs_studies["fusion"]
    client = client_for(orthanc, transport)
    before = orthanc.study_series_uids(study.study_uid)
    with pytest.raises(PacsError, match="not found"):
        fuse_study(client, generate_uid(), PLAN)
    missing = generate_uid()
    plan = FusionPlan(
        SeriesSelector.parse("modality=MR"),
        (SeriesSelector(series_uid=missing),),
        method="average",
        device="cpu",
    )
    with pytest.raises(PacsError, match=f"series {missing} not found"):
        fuse_study(client, study.study_uid, plan)
    plan = FusionPlan(
        SeriesSelector.parse("modality=MR"),
        (SeriesSelector.parse("modality=CT"),),
        method="average",
        device="cpu",
    )
    with pytest.raises(PacsError, match="no series .* matches modality=CT"):
        fuse_study(client, study.study_uid, plan)
    with pytest.raises(PacsError, match="not found"):
        client.retrieve_series(study.study_uid, missing, tmp_path / "missing")
    assert orthanc.study_series_uids(study.study_uid) == before


def test_move_to_an_unknown_destination_is_not_called_a_missing_series(
    orthanc, pacs_studies, tmp_path
):
    """Orthanc answers a C-MOVE to a destination it does not know with 0xC000; that was
    reported as "series ... not found" although the series is there."""
    import dataclasses

    study = pacs_studies["fusion"]
    node = parse_config(orthanc.node_config(retrieve="move")).node("orthanc")
    node = dataclasses.replace(
        node, dimse=dataclasses.replace(node.dimse, move_destination="NOTREGISTERED"))
    client = open_client(node, "dimse")
    with pytest.raises(PacsError) as caught:
        client.retrieve_series(study.study_uid, study.series["MR"], tmp_path / "mr")
    message = str(caught.value)
    assert "not found" not in message and f"holds series {study.series['MR']}" in message
    assert "move destination 'NOTREGISTERED'" in message and "\n" not in message
    assert not any((tmp_path / "mr").iterdir())


@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_incomplete_series_stores_nothing(orthanc, pacs_studies, transport):
    study = pacs_studies["incomplete"]
    client = client_for(orthanc, transport)
    before = orthanc.study_series_uids(study.study_uid)
    with pytest.raises(PacsError, match="is incomplete: instance number"):
        fuse_study(client, study.study_uid, PLAN)
    assert orthanc.study_series_uids(study.study_uid) == before


def test_wrong_password_is_a_clear_error(orthanc, monkeypatch):
    monkeypatch.setenv("MEDFUSION_TEST_PACS_PASSWORD", "wrong")
    client = client_for(orthanc, "dicomweb")
    with pytest.raises(PacsError, match="refused our credentials"):
        client.find_studies(StudyQuery())
