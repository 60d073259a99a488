"""Query filters and results shared by the DIMSE and DICOMweb clients.

The two transports answer the same questions (which studies, which series, how many instances),
so they return the same small records; the workflow never needs to know which one it talks to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from medfusion.errors import InputError

_DATE_RANGE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class StudyQuery:
    """Study-level filters; empty fields match everything. Wildcards ``*`` / ``?`` allowed
    in ``patient_id``, ``patient_name`` and ``description``; ``study_date`` is ``YYYYMMDD`` or a
    range ``YYYYMMDD-YYYYMMDD`` (either end may be open)."""

    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    modality: str = ""
    accession: str = ""
    study_uid: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.study_date and not (
            _DATE_RANGE.match(self.study_date) and self.study_date.strip("-")
        ):
            raise InputError(
                f"study date must be YYYYMMDD or YYYYMMDD-YYYYMMDD, not {self.study_date!r}"
            )
        if self.study_uid:
            check_uid(self.study_uid, "study UID")


@dataclass(frozen=True)
class StudyInfo:
    """One study as a query returns it. ``patient_*`` fields are for display, never for logs."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    description: str = ""
    accession: str = ""
    modalities: tuple[str, ...] = ()
    n_series: int | None = None
    n_instances: int | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as a query returns it."""

    study_uid: str
    series_uid: str
    modality: str = ""
    series_number: int | None = None
    description: str = ""
    n_instances: int | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StoreResult:
    """What a store did: instances sent, how many the PACS accepted, warnings it gave."""

    sent: int
    stored: int
    warnings: tuple[str, ...] = ()


class PacsClient(Protocol):
    """What the workflow needs from a transport (DIMSE or DICOMweb)."""

    node_name: str

    def echo(self) -> None:
        """Check that the node answers; raise PacsError when not."""

    def find_studies(self, query: StudyQuery) -> list[StudyInfo]:
        """Studies matching ``query``."""

    def find_series(self, study_uid: str) -> list[SeriesInfo]:
        """All series of one study (empty when the study is unknown)."""

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Download every instance of a series into ``folder``; return the files written."""

    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """Send instances to the node; raise PacsError unless all were accepted."""

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOPInstanceUIDs the node holds for one series (empty when it holds none)."""


def check_uid(uid: str, what: str = "UID") -> str:
    """Return ``uid`` if it is a syntactically valid DICOM UID, else raise InputError."""
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InputError(f"{what} {uid!r} is not a valid DICOM UID (digits and dots, <= 64)")
    return uid


TextOf = Callable[[str], str]
"""How a transport reads one attribute of a query answer by keyword, as text ('' when absent)."""


def study_from_answer(text: TextOf, modalities: tuple[str, ...]) -> StudyInfo:
    """One study from a C-FIND or QIDO-RS answer: the one tag-to-field mapping both use."""
    return StudyInfo(
        study_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        study_date=text("StudyDate"),
        description=text("StudyDescription"),
        accession=text("AccessionNumber"),
        modalities=modalities,
        n_series=parse_int(text("NumberOfStudyRelatedSeries")),
        n_instances=parse_int(text("NumberOfStudyRelatedInstances")),
    )


def series_from_answer(study_uid: str, text: TextOf) -> SeriesInfo:
    """One series of ``study_uid`` from a C-FIND or QIDO-RS answer."""
    return SeriesInfo(
        study_uid=study_uid,
        series_uid=text("SeriesInstanceUID"),
        modality=text("Modality"),
        series_number=parse_int(text("SeriesNumber")),
        description=text("SeriesDescription"),
        n_instances=parse_int(text("NumberOfSeriesRelatedInstances")),
    )


def parse_int(value: object) -> int | None:
    """An IS/US value from a query answer as int, or None when absent or malformed."""
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def store_status_text(code: int) -> str:
    """The Storage Service Class meaning of a C-STORE status (PS3.4 B.2.3)."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    if meaning is None:
        if 0xC000 <= code <= 0xCFFF:
            return "cannot understand"
        return "unknown status"
    return meaning[1].rstrip(".").lower()
