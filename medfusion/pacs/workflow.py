"""Find, retrieve, fuse, build and store: one study, or every study matching a query.

Order matters for safety: everything is retrieved into a temporary folder and checked complete,
fused, and the whole derived series is built in memory before anything leaves the process; the
store comes last. The originals on the PACS are only read. Batch runs skip studies that already
hold a MedFusion series, write their summary after every study (so a crash loses nothing), and
can simply be run again to resume.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from medfusion.errors import CancelledError, InputError, MedFusionError, PacsError
from medfusion.pacs.config import PacsNode
from medfusion.pacs.derived import (
    Provenance,
    build_derived_series,
    is_medfusion_series,
    write_series,
)
from medfusion.pacs.records import PacsClient, SeriesInfo, StudyQuery, check_uid
from medfusion.pacs.selection import SeriesSelector, select_sources

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "dimse", "dicomweb")


@dataclass(frozen=True)
class FusionPlan:
    """Which series to fuse and how (the engine's options)."""

    reference: SeriesSelector
    others: tuple[SeriesSelector, ...]
    method: str = "cnn"
    device: str = "auto"
    batch_size: int = 16
    normalisation: str = "percentile"
    method_options: dict[str, Any] = field(default_factory=dict)
    register: str = "none"  # none | rigid | affine (medfusion.registration)
    check_alignment: bool = True


@dataclass(frozen=True)
class FuseResult:
    """One fused study."""

    study_uid: str
    series_uid: str
    n_instances: int
    source_series: tuple[str, ...]
    stored: bool
    output_dir: Path | None = None
    warnings: tuple[str, ...] = ()  # e.g. "misaligned" inputs (medfusion.registration)


@dataclass
class BatchRow:
    """One line of a batch summary."""

    study_uid: str
    status: str  # fused | skipped | failed
    series_uid: str = ""
    n_instances: int = 0
    seconds: float = 0.0
    message: str = ""


def open_client(node: PacsNode, transport: str = "auto") -> PacsClient:
    """A DIMSE or DICOMweb client for ``node`` (``auto``: DIMSE when configured)."""
    if transport not in TRANSPORTS:
        raise InputError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    if transport == "auto":
        transport = "dimse" if node.dimse is not None else "dicomweb"
    if transport == "dimse":
        if node.dimse is None:
            raise InputError(f"PACS node {node.name!r} has no [dimse] settings")
        from medfusion.pacs.dimse import DimseClient

        return DimseClient(node)
    if node.dicomweb is None:
        raise InputError(f"PACS node {node.name!r} has no [dicomweb] settings")
    from medfusion.pacs.dicomweb import DicomWebClient

    return DicomWebClient(node)


def fuse_study(
    client: PacsClient,
    study_uid: str,
    plan: FusionPlan,
    *,
    store: bool = True,
    output_dir: str | Path | None = None,
    series: Sequence[SeriesInfo] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
) -> FuseResult:
    """Fuse the selected series of one study; store the derived series and/or write it."""
    check_uid(study_uid, "study UID")
    if not store and output_dir is None:
        raise InputError("nothing to do: neither storing to the PACS nor writing to a folder")
    if output_dir is not None and Path(output_dir).exists():
        raise InputError(f"output folder already exists: {output_dir} (choose a new one)")
    if output_dir is not None:  # written after the store: its parent checked before any work
        from medfusion.io.atomic import check_output_path

        check_output_path(output_dir)
    if series is None:
        series = client.find_series(study_uid)
    if not series:
        raise PacsError(f"study {study_uid} not found on node {client.node_name!r} (no series)")
    reference, others = select_sources(series, plan.reference, plan.others)
    sources = [reference, *others]
    log.info(
        "study %s: fusing %s with method %s",
        study_uid, " + ".join(f"{s.modality} series {s.series_uid}" for s in sources), plan.method,
    )  # fmt: skip

    from medfusion.engine import fuse_volumes
    from medfusion.io.volumes import read_volume

    method, provenance = _build_method(plan)
    with tempfile.TemporaryDirectory(prefix="medfusion-pacs-") as workdir:
        headers, volumes = [], []
        for index, info in enumerate(sources):
            _check_cancel(cancel)
            folder = Path(workdir) / f"series-{index}"
            files = client.retrieve_series(study_uid, info.series_uid, folder)
            headers.append(check_complete(info, files))
            volumes.append(read_volume(folder))
        _check_cancel(cancel)
        warnings: list[str] = []
        fused = fuse_volumes(
            volumes[0],
            volumes[1:],
            method=method,
            device=plan.device,
            batch_size=plan.batch_size,
            normalisation=plan.normalisation,
            progress=progress,
            cancel=cancel,
            register=plan.register,
            check_alignment=plan.check_alignment,
            on_alignment=lambda outcome: warnings.extend(outcome.warnings),
        )
        datasets = build_derived_series(
            headers[0], fused, others=headers[1:], provenance=provenance
        )
    _check_cancel(cancel)
    result = _deliver(client, study_uid, datasets, sources, store=store, output_dir=output_dir)
    return dataclasses.replace(result, warnings=tuple(warnings))


def check_complete(info: SeriesInfo, files: Sequence[Path]) -> list[Dataset]:
    """Headers of the retrieved instances; PacsError when the series is empty or incomplete."""
    if not files:
        raise PacsError(f"series {info.series_uid}: no instances were retrieved")
    if info.n_instances is not None and len(files) != info.n_instances:
        raise PacsError(
            f"series {info.series_uid} is incomplete: {len(files)} of {info.n_instances} "
            "instances retrieved"
        )
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception:
            raise PacsError(
                f"series {info.series_uid}: a retrieved instance is unreadable"
            ) from None
    wrong = [h for h in headers if str(h.get("SeriesInstanceUID", "")) != info.series_uid]
    if wrong:
        raise PacsError(f"series {info.series_uid}: the PACS sent instances of another series")
    numbers = [h.get("InstanceNumber") for h in headers]
    if all(n not in (None, "") for n in numbers):
        values = sorted(int(n) for n in numbers)
        if len(set(values)) == len(values):
            missing = sorted(set(range(values[0], values[-1] + 1)) - set(values))
            if missing:
                shown = ", ".join(str(n) for n in missing[:5]) + (
                    " ..." if len(missing) > 5 else ""
                )
                raise PacsError(
                    f"series {info.series_uid} is incomplete: instance number(s) {shown} "
                    f"missing ({len(values)} instances present)"
                )
    expected = headers[0].get("ImagesInAcquisition")
    acquisitions = {str(h.get("AcquisitionNumber", "")) for h in headers}
    if expected not in (None, "") and len(acquisitions) == 1 and len(headers) < int(expected):
        raise PacsError(
            f"series {info.series_uid} is incomplete: {len(headers)} of {int(expected)} images "
            "of the acquisition present"
        )
    return headers


def batch_fuse(
    client: PacsClient,
    query: StudyQuery,
    plan: FusionPlan,
    *,
    store: bool = True,
    output_root: str | Path | None = None,
    force: bool = False,
    summary_path: str | Path | None = None,
    on_study: Callable[[int, int, BatchRow], None] | None = None,
    cancel: Any = None,
) -> list[BatchRow]:
    """Fuse every study matching ``query``; one row per study. Failures do not stop the run.

    A study is skipped when it already holds a MedFusion series (when storing) or its output
    folder ``output_root/<StudyInstanceUID>`` exists (when only writing), unless ``force``.
    """
    if not store and output_root is None:
        raise InputError("nothing to do: neither storing to the PACS nor writing to a folder")
    if output_root is not None and not Path(output_root).is_dir():
        raise InputError(f"output folder does not exist: {output_root}")
    if summary_path is not None:  # before any study is fused (and stored)
        from medfusion.io.atomic import check_output_path

        check_output_path(summary_path)
    studies = client.find_studies(query)
    log.info("batch: %d studies match the query on node %s", len(studies), client.node_name)
    rows: list[BatchRow] = []
    for index, study in enumerate(studies):
        _check_cancel(cancel)
        started = time.monotonic()
        row = _batch_one(client, study.study_uid, plan, store, output_root, force, cancel)
        row.seconds = round(time.monotonic() - started, 2)
        rows.append(row)
        log.info("study %s: %s %s", row.study_uid, row.status, row.message)
        if summary_path is not None:
            write_summary(rows, summary_path)
        if on_study is not None:
            on_study(index + 1, len(studies), row)
    return rows


def _batch_one(client: PacsClient, study_uid: str, plan: FusionPlan, store: bool,
               output_root: str | Path | None, force: bool, cancel: Any) -> BatchRow:  # fmt: skip
    output_dir = None if output_root is None else Path(output_root) / study_uid
    try:
        series = client.find_series(study_uid)
        if not force:
            done = [s for s in series if is_medfusion_series(s.description)]
            if store and done:
                return BatchRow(study_uid, "skipped", done[0].series_uid,
                                done[0].n_instances or 0, message="already fused")  # fmt: skip
            if not store and output_dir is not None and output_dir.exists():
                return BatchRow(study_uid, "skipped", message=f"{output_dir} exists")
        result = fuse_study(client, study_uid, plan, store=store, output_dir=output_dir,
                            series=series, cancel=cancel)  # fmt: skip
        return BatchRow(study_uid, "fused", result.series_uid, result.n_instances,
                        message="; ".join(result.warnings))
    except CancelledError:
        raise
    except MedFusionError as error:
        return BatchRow(study_uid, "failed", message=str(error))


def write_summary(rows: Sequence[BatchRow], path: str | Path) -> None:
    """Write the summary atomically: ``.csv`` as a table, anything else as JSON."""
    from medfusion.io.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as temporary:
        if path.suffix.lower() == ".csv":
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(BatchRow.__dataclass_fields__))
                writer.writeheader()
                writer.writerows(asdict(row) for row in rows)
        else:
            temporary.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")


def _deliver(client: PacsClient, study_uid: str, datasets: list[Dataset],
             sources: Sequence[SeriesInfo], *, store: bool,
             output_dir: str | Path | None) -> FuseResult:  # fmt: skip
    series_uid = str(datasets[0].SeriesInstanceUID)
    written = None
    if store:  # first: a failed store leaves no folder that looks like a result
        client.store(datasets)
        verify_stored(client, study_uid, datasets)
        log.info(
            "study %s: stored series %s (%d instances) on node %s",
            study_uid, series_uid, len(datasets), client.node_name,
        )  # fmt: skip
    if output_dir is not None:
        write_series(datasets, output_dir)
        written = Path(output_dir)
        log.info("study %s: wrote %d instances to %s", study_uid, len(datasets), written)
    return FuseResult(
        study_uid=study_uid,
        series_uid=series_uid,
        n_instances=len(datasets),
        source_series=tuple(s.series_uid for s in sources),
        stored=store,
        output_dir=written,
    )


def verify_stored(client: PacsClient, study_uid: str, datasets: Sequence[Dataset],
                  attempts: int = 3, pause_s: float = 0.5) -> None:  # fmt: skip
    """Ask the PACS for the series just stored; PacsError unless it holds every instance.

    A PACS may acknowledge every C-STORE / STOW-RS and still discard the instances (an incoming
    filter, a routing rule, a full archive); only a query afterwards shows it. A PACS that
    indexes with a delay gets a few tries.
    """
    series_uid = str(datasets[0].SeriesInstanceUID)
    sent = {str(ds.SOPInstanceUID) for ds in datasets}
    held: set[str] = set()
    held = 0
    for attempt in range(attempts):
        held = _count_held(client, study_uid, series_uid, sent)
        if held == len(sent):
            return
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    raise PacsError(
        f"node {client.node_name!r} acknowledged all {len(sent)} instances of the fused series "
        f"{series_uid} but holds {held} of them when queried: the PACS discarded them "
        "(an incoming filter or storage rule there?); the fused series is not stored"
    )


def _count_held(client: PacsClient, study_uid: str, series_uid: str, sent: set[str]) -> int:
    """How many of the ``sent`` instances the PACS holds: by SOPInstanceUID (IMAGE-level query),
    or, where the PACS refuses instance queries, the series' NumberOfSeriesRelatedInstances."""
    try:
        return len(set(client.find_instances(study_uid, series_uid)) & sent)
    except PacsError as error:
        log.debug("instance query refused (%s); counting by the series query", error)
    info = next((s for s in client.find_series(study_uid) if s.series_uid == series_uid), None)
    if info is None:
        return 0
    if info.n_instances is None:
        raise PacsError(
            f"node {client.node_name!r} accepted the fused series {series_uid} but answers no "
            "instance count for it, so the store cannot be verified"
        )
    return info.n_instances


def _build_method(plan: FusionPlan) -> tuple[Any, Provenance]:
    """The fusion method object and what to record about it (bundle name and version)."""
    from medfusion.methods import get_method

    method = get_method(plan.method, device=plan.device, **plan.method_options)
    name = version = None
    bundle_dir = getattr(method, "bundle_dir", None)
    if bundle_dir is not None:
        try:
            metadata = json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text())
            name, version = metadata.get("name"), metadata.get("version")
        except (OSError, ValueError):
            name = Path(bundle_dir).name
    return method, Provenance(method=plan.method, model_name=name, model_version=version)


def _check_cancel(cancel: Any) -> None:
    if cancel is None:
        return
    is_set = cancel.is_set() if hasattr(cancel, "is_set") else bool(cancel())
    if is_set:
        raise CancelledError("cancelled")
