"""DIMSE client: C-ECHO, C-FIND, C-GET, C-MOVE (to our own storage SCP) and C-STORE.

Every network problem becomes a one-line :class:`~medfusion.errors.PacsError` that says which
node and what went wrong (not reachable, association rejected, no answer in time, sub-operations
failed), so the command line can show it as is.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from medfusion.errors import PacsError
from medfusion.pacs.config import DimseSettings, PacsNode
from medfusion.pacs.privacy import quiet_third_party_loggers
from medfusion.pacs.records import (
    SeriesInfo,
    StoreResult,
    StudyInfo,
    StudyQuery,
    check_uid,
    parse_int,
    series_from_answer,
    store_status_text,
    study_from_answer,
)

log = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_STORE_WARNINGS = (0xB000, 0xB006, 0xB007)
_SAFE_NAME = re.compile(r"^[0-9.]{1,64}$")
# One presentation context is the query/retrieve model; the other 127 may be storage classes.
_MAX_STORAGE_CONTEXTS = 127


def _no_delay(event: Any) -> None:
    """Disable Nagle's algorithm: pynetdicom sends PDUs in pieces, and Nagle plus the peer's
    delayed ACK would stall every small message by ~40 ms (seconds per retrieved series)."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # no socket yet / already closed: nothing to tune
        pass


class DimseClient:
    """Talk to one PACS node over DIMSE. Each call opens and releases its own association."""

    def __init__(self, node: PacsNode) -> None:
        if node.dimse is None:
            raise PacsError(f"PACS node {node.name!r} has no DIMSE settings")
        quiet_third_party_loggers()
        self.node_name = node.name
        self.settings: DimseSettings = node.dimse

    # -- verification and query ------------------------------------------------------------

    def echo(self) -> None:
        """C-ECHO: raise PacsError unless the node answers with Success."""
        with self._association([Verification]) as assoc:
            status = assoc.send_c_echo()
            self._check_final(status, "C-ECHO")
            if status.Status != 0x0000:
                raise PacsError(f"{self._who} answered C-ECHO with status 0x{status.Status:04X}")
        log.info("C-ECHO to node %s: success", self.node_name)

    def find_studies(self, query: StudyQuery) -> list[StudyInfo]:
        """C-FIND at STUDY level with the query's filters."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = query.study_uid
        identifier.PatientID = query.patient_id
        identifier.PatientName = query.patient_name
        identifier.StudyDate = query.study_date
        identifier.StudyTime = ""
        identifier.StudyDescription = query.description
        identifier.AccessionNumber = query.accession
        identifier.ModalitiesInStudy = query.modality
        identifier.NumberOfStudyRelatedSeries = None
        identifier.NumberOfStudyRelatedInstances = None
        studies = [
            study_from_answer(
                lambda name, answer=answer: str(answer.get(name, "")),
                _multi(answer.get("ModalitiesInStudy")),
            )
            for answer in self._find(identifier)
        ]
        log.info("C-FIND on node %s: %d studies", self.node_name, len(studies))
        return [study for study in studies if study.study_uid]

    def find_series(self, study_uid: str) -> list[SeriesInfo]:
        """C-FIND at SERIES level: all series of one study."""
        check_uid(study_uid, "study UID")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = ""
        identifier.Modality = ""
        identifier.SeriesNumber = None
        identifier.SeriesDescription = ""
        identifier.NumberOfSeriesRelatedInstances = None
        series = [
            series_from_answer(study_uid, lambda name, answer=answer: str(answer.get(name, "")))
            for answer in self._find(identifier)
        ]
        return [item for item in series if item.series_uid]

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """C-FIND at IMAGE level: the SOPInstanceUIDs of one series."""
        check_uid(study_uid, "study UID")
        check_uid(series_uid, "series UID")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = series_uid
        identifier.SOPInstanceUID = ""
        answers = self._find(identifier)
        return [str(a.SOPInstanceUID) for a in answers if a.get("SOPInstanceUID")]

    # -- retrieve -------------------------------------------------------------------------

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """C-GET or C-MOVE (as configured) one series into ``folder``."""
        check_uid(study_uid, "study UID")
        check_uid(series_uid, "series UID")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        writer = _InstanceWriter(folder, series_uid)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = series_uid
        try:
            if self.settings.retrieve == "move":
                self._move(identifier, writer)
            else:
                self._get(identifier, writer)
        except PacsError as error:
            if writer.files or "failed (status" not in str(error):
                raise
            if not self._holds(study_uid, series_uid):
                raise PacsError(f"series {series_uid} not found on {self._who} ({error})") from None
            hint = ""
            if self.settings.retrieve == "move":  # Orthanc: 0xC000 for an unknown destination
                hint = (f"; is our move destination {self.settings.move_destination!r} (port "
                        f"{self.settings.storage_port}) registered there?")
            raise PacsError(f"{error}, although the PACS holds series {series_uid}{hint}") from None
        if not writer.files:
            raise PacsError(f"series {series_uid} not found on {self._who} (nothing retrieved)")
        if writer.errors:
            raise PacsError(f"could not save retrieved instances: {writer.errors[0]}")
        log.info(
            "C-%s from node %s: %d instances of series %s",
            self.settings.retrieve.upper(), self.node_name, len(writer.files), series_uid,
        )  # fmt: skip
        return list(writer.files)

    def _holds(self, study_uid: str, series_uid: str) -> bool:
        """Whether the node answers a C-FIND for instances of the series (False if it refuses)."""
        try:
            return bool(self.find_instances(study_uid, series_uid))
        except PacsError:
            return False

    def _get(self, identifier: Dataset, writer: _InstanceWriter) -> None:
        contexts = [StudyRootQueryRetrieveInformationModelGet]
        storage = [cx.abstract_syntax for cx in StoragePresentationContexts]
        storage = storage[:_MAX_STORAGE_CONTEXTS]
        roles = [build_role(uid, scp_role=True) for uid in storage]
        handlers = [(evt.EVT_C_STORE, writer.handle)]
        with self._association(contexts + storage, roles, handlers) as assoc:
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
            self._check_retrieve(responses, "C-GET")

    def _move(self, identifier: Dataset, writer: _InstanceWriter) -> None:
        settings = self.settings
        assert settings.move_destination is not None and settings.storage_port is not None
        scp = AE(ae_title=settings.move_destination)
        scp.supported_contexts = StoragePresentationContexts
        scp.network_timeout = settings.timeout
        scp.dimse_timeout = settings.timeout
        scp.acse_timeout = settings.timeout
        try:
            server = scp.start_server(
                (settings.storage_host, settings.storage_port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, writer.handle), (evt.EVT_CONN_OPEN, _no_delay)],
            )
        except OSError as error:
            raise PacsError(
                f"cannot start the local storage SCP on port {settings.storage_port} for "
                f"C-MOVE: {error.strerror or error}"
            ) from None
        try:
            with self._association([StudyRootQueryRetrieveInformationModelMove]) as assoc:
                responses = assoc.send_c_move(
                    identifier,
                    settings.move_destination,
                    StudyRootQueryRetrieveInformationModelMove,
                )
                self._check_retrieve(responses, "C-MOVE")
        finally:
            server.shutdown()

    def _check_retrieve(self, responses: Iterator[tuple[Dataset, Any]], what: str) -> None:
        final: Dataset | None = None
        for status, _identifier in responses:
            self._check_final(status, what)
            if status.Status in _PENDING:
                continue
            final = status
        if final is None:
            raise PacsError(f"{self._who} ended the {what} without a final status")
        code = int(final.Status)
        failed = parse_int(final.get("NumberOfFailedSuboperations")) or 0
        if code == 0xA701 or code == 0xA702:
            raise PacsError(f"{self._who} refused the {what}: out of resources (0x{code:04X})")
        if code == 0xA801:
            raise PacsError(
                f"{self._who} does not know the move destination "
                f"{self.settings.move_destination!r}; register it on the PACS"
            )
        if code == 0xFE00:
            raise PacsError(f"the {what} was cancelled")
        if code not in (0x0000, 0xB000) or failed:
            raise PacsError(
                f"{self._who}: {what} failed (status 0x{code:04X}, {failed} sub-operations failed)"
            )

    # -- store ----------------------------------------------------------------------------

    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """C-STORE every dataset over one association; raise unless all were accepted."""
        if not datasets:
            return StoreResult(sent=0, stored=0)
        sop_classes = sorted({str(ds.SOPClassUID) for ds in datasets})
        transfer_syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts = [(uid, transfer_syntaxes) for uid in sop_classes]
        stored = 0
        warnings: list[str] = []
        aborts: list[str] = []
        handlers = [(evt.EVT_PDU_RECV, lambda event: _note_abort(event, aborts))]
        with self._association(contexts, handlers=handlers) as assoc:
            refused = [uid for uid in sop_classes if not _accepted(assoc, uid)]
            if refused:
                raise PacsError(
                    f"{self._who} does not accept {_sop_name(refused[0])} for storage "
                    f"(presentation context rejected); nothing was stored"
                )
            for index, dataset in enumerate(datasets):
                status = assoc.send_c_store(dataset)
                if not status or "Status" not in status:
                    raise PacsError(self._no_store_status(aborts, stored, len(datasets)))
                code = int(status.Status)
                if code in _STORE_WARNINGS:
                    warnings.append(f"instance {index + 1}: status 0x{code:04X}")
                elif code != 0x0000:
                    comment = str(status.get("ErrorComment", "") or "").strip()
                    raise PacsError(
                        f"{self._who} refused instance {index + 1} of {len(datasets)} "
                        f"(C-STORE status 0x{code:04X}: {store_status_text(code)}"
                        f"{'; ' + comment if comment else ''}); {stored} were stored"
                    )
                stored += 1
        log.info("C-STORE to node %s: %d instances", self.node_name, stored)
        return StoreResult(sent=len(datasets), stored=stored, warnings=tuple(warnings))

    def _no_store_status(self, aborts: list[str], stored: int, total: int) -> str:
        """Why a C-STORE got no status: the PACS aborted (say so, and what it said) or no
        answer came within the timeout."""
        done = f"{stored} of {total} instances were stored"
        if aborts:
            hint = (
                f"; it may not allow AE title {self.settings.calling_aet!r} to store"
                if stored == 0 else ""
            )
            return (
                f"{self._who} aborted the association during C-STORE ({aborts[0]}){hint}; "
                f"{done}"
            )
        return (
            f"{self._who} did not answer a C-STORE within {self.settings.timeout:g} s; {done}"
        )

    # -- plumbing -------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        s = self.settings
        return f"PACS node {self.node_name!r} ({s.called_aet}@{s.host}:{s.port})"

    def _find(self, identifier: Dataset) -> list[Dataset]:
        answers: list[Dataset] = []
        with self._association([StudyRootQueryRetrieveInformationModelFind]) as assoc:
            responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
            for status, answer in responses:
                self._check_final(status, "C-FIND")
                if status.Status in _PENDING:
                    if answer is not None:
                        answers.append(answer)
                elif status.Status != 0x0000:
                    raise PacsError(f"{self._who}: C-FIND failed (status 0x{status.Status:04X})")
        return answers

    def _check_final(self, status: Dataset, what: str) -> None:
        """An empty status means the association timed out or was aborted."""
        if not status or "Status" not in status:
            raise PacsError(
                f"{self._who} did not answer the {what} within {self.settings.timeout:g} s "
                "or aborted the association"
            )

    def _probe(self) -> None:
        """Open and close a TCP connection so 'down' and 'wrong host' get their own message."""
        s = self.settings
        try:
            with socket.create_connection((s.host, s.port), timeout=s.timeout):
                pass
        except ConnectionRefusedError:
            raise PacsError(
                f"cannot reach {self._who}: connection refused (is it running, is the port right?)"
            ) from None
        except socket.gaierror:
            raise PacsError(f"cannot reach {self._who}: unknown host {s.host!r}") from None
        except TimeoutError:
            raise PacsError(
                f"cannot reach {self._who}: no TCP connection within {s.timeout:g} s"
            ) from None
        except OSError as error:
            raise PacsError(f"cannot reach {self._who}: {error.strerror or error}") from None

    @contextmanager
    def _association(
        self,
        contexts: Sequence[Any],
        roles: Sequence[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> Iterator[Association]:
        """An established association with the node, released on exit."""
        s = self.settings
        self._probe()
        ae = AE(ae_title=s.calling_aet)
        ae.acse_timeout = s.timeout
        ae.dimse_timeout = s.timeout
        ae.network_timeout = s.timeout
        ae.connection_timeout = s.timeout
        for context in contexts:
            if isinstance(context, tuple):
                ae.add_requested_context(context[0], context[1])
            else:
                ae.add_requested_context(context)
        rejection: list[str] = []
        answered: list[str] = []

        def on_pdu(event: Any) -> None:
            # The A-ASSOCIATE-RJ PDU itself, not the primitive: when the peer closes the
            # connection right after rejecting, pynetdicom may process the close first and
            # report an abort, but the PDU was received and says why (load-dependent race).
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                rejection.append(event.pdu.reason_str.lower())
            elif isinstance(event.pdu, A_ASSOCIATE_AC):
                answered.append("accepted none of the requested presentation contexts")
            elif isinstance(event.pdu, A_ABORT_RQ):
                answered.append("aborted the association request")

        assoc = ae.associate(
            s.host,
            s.port,
            ae_title=s.called_aet,
            max_pdu=s.max_pdu,
            ext_neg=list(roles) if roles else None,
            evt_handlers=[
                (evt.EVT_PDU_RECV, on_pdu),
                (evt.EVT_CONN_OPEN, _no_delay),
                *(handlers or []),
            ],
        )
        if not assoc.is_established:
            # The A-ASSOCIATE-RJ PDU we saw counts even when pynetdicom reports an abort.
            if assoc.is_rejected or rejection:
                reason = rejection[0] if rejection else "no reason given"
                raise PacsError(
                    f"{self._who} rejected the association ({reason}); check called_aet "
                    f"{s.called_aet!r} and that our AE title {s.calling_aet!r} is known there"
                )
            if answered:
                raise PacsError(f"{self._who} {answered[0]}")
            raise PacsError(
                f"{self._who} did not accept the association within {s.timeout:g} s"
            )
        try:
            yield assoc
        except PacsError:
            if assoc.is_established:  # the PACS answered; end politely
                assoc.release()
            raise
        except BaseException:
            # An error, Ctrl-C or SIGTERM mid-operation: abort at once (a release would wait for
            # the PACS to finish sending) so the caller's cleanup runs without delay.
            if assoc.is_established:
                assoc.abort()
            raise
        if assoc.is_established:
            assoc.release()


class _InstanceWriter:
    """C-STORE handler (for C-GET and C-MOVE): writes each instance of one series to a file."""

    def __init__(self, folder: Path, series_uid: str) -> None:
        self.folder = folder
        self.series_uid = series_uid
        self.files: list[Path] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def handle(self, event: Any) -> int:
        try:
            dataset = event.dataset
            if str(dataset.get("SeriesInstanceUID", "")) != self.series_uid:
                return 0xA900  # not what we asked for: refuse (Dataset does not match SOP class)
            sop_uid = str(dataset.get("SOPInstanceUID", ""))
            with self._lock:
                name = sop_uid if _SAFE_NAME.match(sop_uid) else f"instance-{len(self.files):05d}"
                path = self.folder / f"{name}.dcm"
                path.write_bytes(event.encoded_dataset())
                self.files.append(path)
            return 0x0000
        except Exception as error:  # any failure is reported to the PACS and to the caller
            self.errors.append(f"{type(error).__name__}: {error}")
            return 0xA700


def _note_abort(event: Any, aborts: list[str]) -> None:
    """Record an A-ABORT the peer sent (who aborted and why, as pynetdicom words it)."""
    if isinstance(event.pdu, A_ABORT_RQ):
        pdu = event.pdu
        if pdu.source == 0x02:  # the peer's protocol layer: the reason is significant
            aborts.append(f"A-ABORT from its DICOM protocol layer: {pdu.reason_str.lower()}")
        else:  # the PACS application itself: PS3.8 gives no reason field
            aborts.append("A-ABORT")


def _accepted(assoc: Association, sop_class_uid: str) -> bool:
    return any(cx.abstract_syntax == sop_class_uid for cx in assoc.accepted_contexts)


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name or uid


def _multi(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part for part in value.split("\\") if part)
    return tuple(str(part) for part in value)
