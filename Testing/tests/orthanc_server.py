"""A real Orthanc PACS for the PACS tests, plus the DICOM studies uploaded to it.

``orthanc`` (session fixture) starts ``/usr/sbin/Orthanc`` on loopback with a temporary
configuration: free HTTP and DICOM ports, storage in a temporary folder, DICOMweb plugin,
HTTP basic authentication, ``DicomCheckCalledAet`` on (so a wrong called AE title is rejected)
and MedFusion's storage SCP registered as a C-MOVE destination. Without the binary the tests
skip, unless ``MEDFUSION_REQUIRE_ORTHANC=1`` (CI) makes that a failure.

``pacs_studies`` (session fixture) uploads:

- ``fusion``: one study (TEST^PATIENT) with an MR series built from SPM12 ``T1.nii`` and a PT
  series from ``PET.nii``: valid made-up headers, one FrameOfReferenceUID;
- ``ct``: the real GE head CT (28 slices, gantry tilt, uneven spacing), a study of its own;
- ``batch``: a small MR + PT study (a slab of the same volumes) for the batch tests;
- ``incomplete``: the same small study whose PT series lost a middle instance on the PACS.

Test modules import both fixtures; the server is shared (reference-counted) and stopped when
the last user finishes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

ORTHANC_BINARY = os.environ.get("MEDFUSION_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_AET = "ORTHANCTEST"
OUR_AET = "MEDFUSION"
USERNAME = "medfusion"
PASSWORD_ENV = "MEDFUSION_TEST_PACS_PASSWORD"
PASSWORD = "orthanc-test-secret"
# Identifiers that must never reach a log line.
PATIENT_NAMES = ("TEST^PATIENT", "TEST^BATCH")
PATIENT_IDS = ("MFTEST0001", "MFBATCH0001", "MFBATCH0002")
BIRTH_DATE = "19700101"


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    """A running Orthanc: ports, REST helpers and the node configuration for MedFusion."""

    workdir: Path
    http_port: int
    dicom_port: int
    storage_port: int
    process: subprocess.Popen | None = None
    studies: dict[str, UploadedStudy] = field(default_factory=dict)
    # Settings merged into the configuration, and a Lua script Orthanc runs (fault tests).
    extra_config: dict = field(default_factory=dict)
    lua: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "MedFusionTest",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"medfusion": [OUR_AET, "127.0.0.1", self.storage_port]},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USERNAME: PASSWORD},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            # an idle association is aborted after this; at 10 s a fresh-clone CI run saw an
            # A-ABORT 10.2 s after a study's C-GET, 5 of 16 instances into its C-STORE (most
            # likely a stalled machine; no test relies on this timeout)
            "DicomScpTimeout": 60,
            "HttpTimeout": 30,
            "OverwriteInstances": False,
            **self.extra_config,
        }
        if self.lua is not None:
            script = self.workdir / "filters.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - lives with the process
        # DCMTK (inside Orthanc) keeps Nagle's algorithm on unless TCP_NODELAY is set: every
        # DIMSE message would then wait ~40 ms for a delayed ACK (5 s per 91-slice C-GET).
        environment = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen(
            [ORTHANC_BINARY, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start-up:\n{self.log_tail()}")
            try:
                if self.rest("GET", "/system", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "orthanc.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.url + path, auth=(USERNAME, PASSWORD), **kwargs)

    def upload(self, files: list[Path]) -> None:
        with requests.Session() as session:
            session.auth = (USERNAME, PASSWORD)
            for path in files:
                answer = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
                answer.raise_for_status()

    def series_instances(self, series_uid: str) -> list[dict]:
        """Orthanc's instance records of a series (empty when the series is unknown)."""
        ids = self.rest("POST", "/tools/lookup", data=series_uid).json()
        series = [item for item in ids if item["Type"] == "Series"]
        if not series:
            return []
        return self.rest("GET", f"/series/{series[0]['ID']}/instances").json()

    def study_series_uids(self, study_uid: str) -> set[str]:
        ids = self.rest("POST", "/tools/lookup", data=study_uid).json()
        studies = [item for item in ids if item["Type"] == "Study"]
        if not studies:
            return set()
        series = self.rest("GET", f"/studies/{studies[0]['ID']}/series").json()
        return {item["MainDicomTags"]["SeriesInstanceUID"] for item in series}

    def series_digest(self, series_uid: str) -> dict[str, str]:
        """SOPInstanceUID -> SHA-256 of the stored file, to prove originals are untouched."""
        digests = {}
        for instance in self.series_instances(series_uid):
            data = self.rest("GET", f"/instances/{instance['ID']}/file").content
            digests[instance["MainDicomTags"]["SOPInstanceUID"]] = hashlib.sha256(data).hexdigest()
        return digests

    def delete_series(self, series_uid: str) -> None:
        ids = self.rest("POST", "/tools/lookup", data=series_uid).json()
        for item in ids:
            if item["Type"] == "Series":
                self.rest("DELETE", f"/series/{item['ID']}")

    def node_config(
        self,
        *,
        retrieve: str = "get",
        called_aet: str = ORTHANC_AET,
        calling_aet: str = OUR_AET,
        username: str = USERNAME,
        dicom_port: int | None = None,
        http_port: int | None = None,
        timeout: float = 20.0,
    ) -> dict:
        """The MedFusion node configuration (same layout as the TOML/YAML file)."""
        return {
            "nodes": {
                "orthanc": {
                    "dimse": {
                        "host": "127.0.0.1",
                        "port": dicom_port or self.dicom_port,
                        "called_aet": called_aet,
                        "calling_aet": calling_aet,
                        "retrieve": retrieve,
                        "move_destination": OUR_AET,
                        "storage_host": "127.0.0.1",
                        "storage_port": self.storage_port,
                        "timeout": timeout,
                    },
                    "dicomweb": {
                        "url": f"http://127.0.0.1:{http_port or self.http_port}/dicom-web",
                        "username": username,
                        "password_env": PASSWORD_ENV,
                        "timeout": timeout,
                    },
                }
            }
        }


@dataclass
class UploadedStudy:
    """UIDs of one uploaded study and its series, by modality."""

    study_uid: str
    series: dict[str, str]
    files: dict[str, list[Path]]


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).is_file() and Path(DICOMWEB_PLUGIN).is_file()


def _require_orthanc() -> None:
    """Skip (or, with ``MEDFUSION_REQUIRE_ORTHANC=1`` as in CI, fail) without an Orthanc with its
    DICOMweb plugin; otherwise set the password the test servers are configured with."""
    if not orthanc_available():
        message = f"Orthanc or its DICOMweb plugin not installed ({ORTHANC_BINARY})"
        if os.environ.get("MEDFUSION_REQUIRE_ORTHANC") == "1":
            pytest.fail(message)
        pytest.skip(message)
    os.environ[PASSWORD_ENV] = PASSWORD


_shared: dict[str, object] = {"server": None, "users": 0}
_lock = threading.Lock()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A running Orthanc shared by all PACS test modules; stopped after the last one."""
    _require_orthanc()
    with _lock:
        if _shared["server"] is None:
            server = OrthancServer(
                workdir=tmp_path_factory.mktemp("orthanc"),
                http_port=free_port(),
                dicom_port=free_port(),
                storage_port=free_port(),
            )
            server.start()
            _shared["server"] = server
        _shared["users"] = int(_shared["users"]) + 1
        server = _shared["server"]
    assert isinstance(server, OrthancServer)
    yield server
    with _lock:
        _shared["users"] = int(_shared["users"]) - 1
        if _shared["users"] == 0:
            server.stop()
            _shared["server"] = None


@pytest.fixture(scope="session")
def pacs_studies(
    orthanc: OrthancServer, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, UploadedStudy]:
    """Upload the test studies once per server (see the module docstring)."""
    with _lock:
        if orthanc.studies:
            return orthanc.studies
        folder = tmp_path_factory.mktemp("pacs-studies")
        spm12 = data_root / "volumes" / "spm12"
        ct_dir = data_root / "dicom" / "ct-head-ge"

        fusion = build_mr_pet_study(spm12, folder / "fusion", "TEST^PATIENT", "MFTEST0001")
        batch = build_mr_pet_study(
            spm12, folder / "batch", "TEST^BATCH", "MFBATCH0001", slab=(38, 54)
        )
        incomplete = build_mr_pet_study(
            spm12, folder / "incomplete", "TEST^BATCH", "MFBATCH0002", slab=(38, 54)
        )
        ct_files = sorted(ct_dir.glob("*.dcm"))
        first = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
        ct = UploadedStudy(
            study_uid=str(first.StudyInstanceUID),
            series={"CT": str(first.SeriesInstanceUID)},
            files={"CT": ct_files},
        )
        for study in (fusion, batch, incomplete, ct):
            orthanc.upload([path for files in study.files.values() for path in files])
        # Lose one middle PT instance on the PACS: the series is now incomplete there.
        pt_instances = orthanc.series_instances(incomplete.series["PT"])
        middle = sorted(pt_instances, key=lambda item: int(item["MainDicomTags"]["InstanceNumber"]))
        orthanc.rest("DELETE", f"/instances/{middle[len(middle) // 2]['ID']}").raise_for_status()
        orthanc.studies.update(fusion=fusion, batch=batch, incomplete=incomplete, ct=ct)
        return orthanc.studies


# A second Orthanc that misbehaves on purpose when MedFusion stores a fused series:
# - it silently drops every MedFusion series (Lua ReceivedInstanceFilter returns false, while
#   C-STORE and STOW-RS still answer success), except for patient REFUSE_PATIENT_ID, where the
#   filter fails and Orthanc refuses the instances with a real failure status;
# - AE title NO_STORE_AET may query and retrieve but not store (DicomModalities AllowStore);
# - HTTP user NO_STORE_USER may not POST (Lua IncomingHttpRequestFilter: HTTP 403).
DROP_PATIENT_ID = "MFDROP0001"
REFUSE_PATIENT_ID = "MFREFUSE01"
NO_STORE_AET = "MFNOSTORE"
NO_STORE_USER = "nostore"
LONG_VALUES = {
    "SoftwareVersions": ["scanner software " + "9.1." * 20, "recon 2"],  # LO, 97 > 64
    "StationName": "STATION-NAME-TOO-LONG",  # SH, 21 > 16
}
FAULT_LUA = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if string.find(dicom.SeriesDescription or '', 'MedFusion', 1, true) == 1 then
    if dicom.PatientID == '{REFUSE_PATIENT_ID}' then error('refused by site policy') end
    return false
  end
  return true
end

function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return not (method == 'POST' and username == '{NO_STORE_USER}')
end
"""


@pytest.fixture(scope="module")
def faulty_orthanc(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OrthancServer]:
    """The misbehaving Orthanc (above) with small MR + PT studies: ``drop``, ``refuse`` and
    ``long-values`` (source headers with values too long for their VR, as some scanners write)."""
    _require_orthanc()
    workdir = tmp_path_factory.mktemp("orthanc-faulty")
    server = OrthancServer(
        workdir=workdir,
        http_port=free_port(),
        dicom_port=free_port(),
        storage_port=free_port(),
        extra_config={
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {
                "medfusion": [OUR_AET, "127.0.0.1", 104],
                "nostore": {"AET": NO_STORE_AET, "Host": "127.0.0.1", "Port": 104,
                            "AllowStore": False},
            },
            "RegisteredUsers": {USERNAME: PASSWORD, NO_STORE_USER: PASSWORD},
        },
        lua=FAULT_LUA,
    )  # fmt: skip
    server.start()
    try:
        spm12 = data_root / "volumes" / "spm12"
        for key, patient_id, extra in (
            ("drop", DROP_PATIENT_ID, None),
            ("refuse", REFUSE_PATIENT_ID, None),
            ("long-values", "MFLONG0001", LONG_VALUES),
        ):
            study = build_mr_pet_study(
                spm12, workdir / key, "TEST^FAULT", patient_id, slab=(40, 48), extra=extra
            )
            server.upload([path for files in study.files.values() for path in files])
            server.studies[key] = study
        yield server
    finally:
        server.stop()


def build_mr_pet_study(
    spm12: Path,
    folder: Path,
    patient_name: str,
    patient_id: str,
    slab: tuple[int, int] | None = None,
    extra: dict | None = None,
) -> UploadedStudy:
    """MR (T1) and PT (PET) series of one made-up study, written as DICOM files."""
    import SimpleITK as sitk

    study = {
        "PatientName": patient_name,
        "PatientID": patient_id,
        "PatientBirthDate": BIRTH_DATE,
        "PatientSex": "O",
        "StudyInstanceUID": generate_uid(),
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "StudyID": "1",
        "AccessionNumber": f"ACC{patient_id[-4:]}",
        "ReferringPhysicianName": "",
        "StudyDescription": "BRAIN MR PET",
        "FrameOfReferenceUID": generate_uid(),
    }
    series, files = {}, {}
    for modality, name, number in (("MR", "T1.nii", 3), ("PT", "PET.nii", 4)):
        image = sitk.ReadImage(str(spm12 / name), sitk.sitkFloat32)
        if slab is not None:
            image = image[:, :, slab[0] : slab[1]]
        series_uid = generate_uid()
        out = folder / modality
        out.mkdir(parents=True)
        files[modality] = write_volume_series(
            image,
            out,
            modality=modality,
            study=study,
            series_uid=series_uid,
            series_number=number,
            description=f"TEST {name[:-4]}",
            extra=extra,
        )
        series[modality] = series_uid
    return UploadedStudy(study_uid=study["StudyInstanceUID"], series=series, files=files)


def write_volume_series(
    image,
    folder: Path,
    *,
    modality: str,
    study: dict,
    series_uid: str,
    series_number: int,
    description: str,
    extra: dict | None = None,
) -> list[Path]:
    """One single-frame MR or PT instance per slice, 16-bit with rescale slope."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float64)
    peak = float(array.max()) or 1.0
    slope = peak / 30000.0
    stored = np.clip(np.rint(array / slope), 0, 65535).astype(np.uint16)
    d = image.GetDirection()
    orientation = [d[0], d[3], d[6], d[1], d[4], d[7]]
    spacing = image.GetSpacing()
    now = dt.datetime(2024, 1, 2, 10, 30)
    paths = []
    for k in range(image.GetSize()[2]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        for key, value in study.items():
            setattr(ds, key, value)
        sop_class = MRImageStorage if modality == "MR" else PositronEmissionTomographyImageStorage
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.Manufacturer = "MedFusion test data"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [
            f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
        ]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = f"{slope:.8g}"
        ds.BurnedInAnnotation = "NO"
        if modality == "MR":
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = "8.1"
            ds.EchoTime = "3.7"
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "3"
            ds.RescaleType = "US"
        else:
            ds.Units = "BQML"
            ds.CountsSource = "EMISSION"
            ds.SeriesType = ["STATIC", "IMAGE"]
            ds.CorrectedImage = ["ATTN", "DECY"]
            ds.DecayCorrection = "START"
            ds.RandomsCorrectionMethod = "NONE"
            ds.NumberOfSlices = image.GetSize()[2]
            ds.ImageIndex = k + 1
            ds.FrameReferenceTime = "0"
            ds.ActualFrameDuration = 600000
            ds.NumberOfTimeSlices = 1
            radiopharmaceutical = Dataset()
            radiopharmaceutical.Radiopharmaceutical = "Fluorodeoxyglucose"
            radiopharmaceutical.RadionuclideTotalDose = "370000000"
            radiopharmaceutical.RadionuclideHalfLife = "6586.2"
            radiopharmaceutical.RadiopharmaceuticalStartTime = "093000"
            ds.RadiopharmaceuticalInformationSequence = [radiopharmaceutical]
        for key, value in (extra or {}).items():  # may break VR rules on purpose
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(ds, key, value)
        ds.PixelData = stored[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{k + 1:04d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_node_file(server: OrthancServer, path: Path, **overrides) -> Path:
    """Write the node configuration as TOML (``.toml``) or YAML (other suffixes)."""
    config = server.node_config(**overrides)
    node = config["nodes"]["orthanc"]
    if path.suffix == ".toml":
        lines = []
        for section in ("dimse", "dicomweb"):
            lines.append(f"[nodes.orthanc.{section}]")
            for key, value in node[section].items():
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        path.write_text("\n".join(lines))
    else:
        import yaml

        path.write_text(yaml.safe_dump(config))
    return path


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
