"""DICOMweb client: QIDO-RS (query), WADO-RS (retrieve) and STOW-RS (store) over ``requests``.

Same answers as the DIMSE client (:mod:`medfusion.pacs.records`), same one-line
:class:`~medfusion.errors.PacsError` on failure. Error messages never contain request URLs:
a query string may carry a patient ID.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from medfusion.errors import PacsError
from medfusion.pacs.config import DicomWebSettings, PacsNode
from medfusion.pacs.privacy import quiet_third_party_loggers
from medfusion.pacs.records import (
    SeriesInfo,
    StoreResult,
    StudyInfo,
    StudyQuery,
    check_uid,
    series_from_answer,
    store_status_text,
    study_from_answer,
)

log = logging.getLogger(__name__)

_DICOM_JSON = "application/dicom+json"
_MULTIPART_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_SAFE_NAME = re.compile(r"^[0-9.]{1,64}$")

# Attribute tags (DICOM JSON keys) used in QIDO answers and STOW responses.
_TAG = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "PatientID": "00100020",
    "PatientName": "00100010",
    "StudyDate": "00080020",
    "StudyDescription": "00081030",
    "AccessionNumber": "00080050",
    "ModalitiesInStudy": "00080061",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "Modality": "00080060",
    "SeriesNumber": "00200011",
    "SeriesDescription": "0008103E",
    "NumberOfSeriesRelatedInstances": "00201209",
    "FailedSOPSequence": "00081198",
    "ReferencedSOPSequence": "00081199",
    "FailureReason": "00081197",
    "WarningReason": "00081196",
}


class DicomWebClient:
    """Talk to one PACS node over DICOMweb; one HTTP session per client."""

    def __init__(self, node: PacsNode) -> None:
        if node.dicomweb is None:
            raise PacsError(f"PACS node {node.name!r} has no DICOMweb settings")
        quiet_third_party_loggers()
        self.node_name = node.name
        self.settings: DicomWebSettings = node.dicomweb
        self.session = requests.Session()
        if self.settings.username is not None:
            self.session.auth = (self.settings.username, self.settings.password or "")
        if self.settings.token is not None:
            self.session.headers["Authorization"] = f"Bearer {self.settings.token}"
        self.session.verify = self.settings.ca_bundle or self.settings.verify_tls

    def close(self) -> None:
        self.session.close()

    # -- query ----------------------------------------------------------------------------

    def echo(self) -> None:
        """A minimal QIDO-RS query: raise PacsError unless the node answers."""
        self._qido("/studies", {"limit": "1"}, "QIDO-RS")
        log.info("DICOMweb node %s answers", self.node_name)

    def find_studies(self, query: StudyQuery) -> list[StudyInfo]:
        """QIDO-RS ``/studies`` with the query's filters."""
        params = {
            "PatientID": query.patient_id,
            "PatientName": query.patient_name,
            "StudyDate": query.study_date,
            "ModalitiesInStudy": query.modality,
            "AccessionNumber": query.accession,
            "StudyInstanceUID": query.study_uid,
            "StudyDescription": query.description,
        }
        params = {key: value for key, value in params.items() if value}
        params["includefield"] = ",".join(
            _TAG[name]
            for name in (
                "PatientID", "PatientName", "StudyDate", "StudyDescription", "AccessionNumber",
                "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
            )
        )  # fmt: skip
        answers = self._qido("/studies", params, "QIDO-RS")
        studies = [
            study_from_answer(
                lambda name, item=item: _value(item, name),
                tuple(_values(item, "ModalitiesInStudy")),
            )
            for item in answers
        ]
        log.info("QIDO-RS on node %s: %d studies", self.node_name, len(studies))
        return [study for study in studies if study.study_uid]

    def find_series(self, study_uid: str) -> list[SeriesInfo]:
        """QIDO-RS ``/studies/{uid}/series``: all series of one study."""
        check_uid(study_uid, "study UID")
        params = {
            "includefield": ",".join(
                _TAG[name]
                for name in (
                    "Modality",
                    "SeriesNumber",
                    "SeriesDescription",
                    "NumberOfSeriesRelatedInstances",
                )
            )  # fmt: skip
        }
        answers = self._qido(f"/studies/{study_uid}/series", params, "QIDO-RS", missing_ok=True)
        series = [
            series_from_answer(study_uid, lambda name, item=item: _value(item, name))
            for item in answers
        ]
        return [item for item in series if item.series_uid]

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """QIDO-RS ``/studies/{st}/series/{se}/instances``: the SOPInstanceUIDs of one series."""
        check_uid(study_uid, "study UID")
        check_uid(series_uid, "series UID")
        answers = self._qido(
            f"/studies/{study_uid}/series/{series_uid}/instances", {}, "QIDO-RS", missing_ok=True
        )
        return [uid for uid in (_value(item, "SOPInstanceUID") for item in answers) if uid]

    # -- retrieve -------------------------------------------------------------------------

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """WADO-RS ``/studies/{st}/series/{se}``: every instance, written as one file each."""
        check_uid(study_uid, "study UID")
        check_uid(series_uid, "series UID")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        response = self._request(
            "GET",
            f"/studies/{study_uid}/series/{series_uid}",
            "WADO-RS",
            headers={"Accept": _MULTIPART_DICOM},
        )
        if response.status_code == 404:
            raise PacsError(f"series {series_uid} not found on {self._who}")
        self._raise_for_status(response, "WADO-RS")
        parts = _multipart_parts(response)
        files = []
        for index, content in enumerate(parts):
            name = _sop_instance_uid(content) or f"instance-{index:05d}"
            if not _SAFE_NAME.match(name):
                name = f"instance-{index:05d}"
            path = folder / f"{name}.dcm"
            path.write_bytes(content)
            files.append(path)
        log.info(
            "WADO-RS from node %s: %d instances of series %s",
            self.node_name,
            len(files),
            series_uid,
        )
        return files

    # -- store ----------------------------------------------------------------------------

    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """STOW-RS: all instances in one multipart request; raise unless all were accepted."""
        if not datasets:
            return StoreResult(sent=0, stored=0)
        boundary = f"medfusion-{uuid.uuid4().hex}"
        body = BytesIO()
        for dataset in datasets:
            encoded = BytesIO()
            dcmwrite(encoded, dataset, enforce_file_format=True)
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(encoded.getvalue())
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        study_uid = str(datasets[0].StudyInstanceUID)
        response = self._request(
            "POST",
            f"/studies/{study_uid}",
            "STOW-RS",
            data=body.getvalue(),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": _DICOM_JSON,
            },
        )
        answer = _json_or_empty(response)
        failed = _sequence(answer, "FailedSOPSequence")
        stored = _sequence(answer, "ReferencedSOPSequence")
        log.debug(
            "STOW-RS answer: HTTP %d, %d referenced, %d failed",
            response.status_code, len(stored), len(failed),
        )  # fmt: skip
        if (
            response.status_code in (401, 403)
            or response.status_code >= 500
            or (response.status_code >= 400 and not failed)
        ):
            self._raise_for_status(response, "STOW-RS")
        if failed or response.status_code == 409:
            reasons = sorted(
                {
                    f"0x{code:04X} ({store_status_text(code)})"
                    for code in (int(_value(item, "FailureReason") or 0) for item in failed)
                }
            )
            raise PacsError(
                f"{self._who} refused {len(failed) or len(datasets)} of {len(datasets)} instances "
                f"(STOW-RS HTTP {response.status_code}"
                f"{', failure reason ' + ', '.join(reasons) if reasons else ''}); "
                f"{len(stored)} were stored"
            )
        warnings = tuple(
            f"instance {_value(item, 'SOPInstanceUID')}: warning "
            f"0x{int(_value(item, 'WarningReason') or 0):04X}"
            for item in stored
            if _value(item, "WarningReason")
        )
        count = len(stored) if stored else len(datasets)
        if count != len(datasets):
            raise PacsError(
                f"{self._who} acknowledged {count} of {len(datasets)} instances (STOW-RS)"
            )
        log.info("STOW-RS to node %s: %d instances", self.node_name, count)
        return StoreResult(sent=len(datasets), stored=count, warnings=warnings)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        return f"DICOMweb node {self.node_name!r} ({self.settings.url})"

    def _qido(
        self, path: str, params: Mapping[str, str], what: str, missing_ok: bool = False
    ) -> list[dict[str, Any]]:
        response = self._request(
            "GET", path, what, params=_query_string(params), headers={"Accept": _DICOM_JSON}
        )
        if response.status_code == 204 or (missing_ok and response.status_code == 404):
            return []
        self._raise_for_status(response, what)
        answer = _json_or_empty(response)
        if not isinstance(answer, list):
            raise PacsError(f"{self._who} answered {what} with something other than a JSON list")
        return answer

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        url = self.settings.url + path
        timeout = self.settings.timeout
        try:
            return self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.exceptions.ConnectTimeout:
            raise PacsError(
                f"cannot reach {self._who}: no connection within {timeout:g} s"
            ) from None
        except requests.exceptions.ReadTimeout:
            raise PacsError(f"{self._who} did not answer the {what} within {timeout:g} s") from None
        except requests.exceptions.SSLError:
            raise PacsError(f"cannot reach {self._who}: TLS certificate check failed") from None
        except requests.exceptions.ConnectionError as error:
            reason = (
                "connection refused" if "refused" in str(error).lower() else "connection failed"
            )
            raise PacsError(
                f"cannot reach {self._who}: {reason} (is it running, is the URL right?)"
            ) from None
        except requests.exceptions.RequestException as error:
            raise PacsError(f"{what} to {self._who} failed: {type(error).__name__}") from None

    def _raise_for_status(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        if code < 400:
            return
        if code == 401:
            raise PacsError(
                f"{self._who} refused our credentials (HTTP 401); check the username/"
                "password or token"
            )
        if code == 403:
            raise PacsError(f"{self._who} denied access (HTTP 403) to the {what}")
        raise PacsError(f"{self._who} answered the {what} with HTTP {code} {response.reason}")


def _query_string(params: Mapping[str, str]) -> str:
    """Encode a QIDO query, leaving ``*``, ``?`` and ``,`` as they are: all three are legal in a
    query string, and some servers (Orthanc 1.10) match wildcards only when not percent-encoded."""
    return "&".join(f"{quote(key)}={quote(value, safe='*?,')}" for key, value in params.items())


def _multipart_parts(response: requests.Response) -> list[bytes]:
    """Bodies of a ``multipart/related`` answer (RFC 2046), in order."""
    content_type = response.headers.get("Content-Type", "")
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/") or not match:
        raise PacsError(f"WADO-RS answer is not multipart (Content-Type {content_type!r})")
    delimiter = b"\r\n--" + match.group(1).encode()
    chunks = (b"\r\n" + response.content).split(delimiter)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        header_end = chunk.find(b"\r\n\r\n")
        if header_end < 0:
            raise PacsError("WADO-RS answer has a malformed multipart part")
        parts.append(chunk[header_end + 4 :])
    return parts


def _sop_instance_uid(content: bytes) -> str | None:
    from pydicom import dcmread

    try:
        dataset = dcmread(
            BytesIO(content), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
        return str(dataset.SOPInstanceUID)
    except Exception:  # an unreadable part keeps a generic name; read_volume reports it later
        return None


def _json_or_empty(response: requests.Response) -> Any:
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:
        return {}


def _values(item: dict[str, Any], name: str) -> list[str]:
    element = item.get(_TAG[name], {}) if isinstance(item, dict) else {}
    values = element.get("Value", []) if isinstance(element, dict) else []
    out = []
    for value in values:
        if isinstance(value, dict):  # person name
            value = value.get("Alphabetic", "")
        out.append(str(value))
    return out


def _value(item: dict[str, Any], name: str) -> str:
    values = _values(item, name)
    return values[0] if values else ""


def _sequence(answer: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(answer, dict):
        return []
    element = answer.get(_TAG[name], {})
    values = element.get("Value", []) if isinstance(element, dict) else []
    return [value for value in values if isinstance(value, dict)]
