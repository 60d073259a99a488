"""``medfusion pacs echo|find|fuse|batch``: query a PACS, fuse studies from it, store results.

Nodes come from a TOML/YAML file (``--config``, see docs/pacs.md). ``find`` prints patient IDs on
stdout because that is what it is asked for; log lines (stderr) never carry patient data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``pacs`` and its four sub-commands."""
    parser = subparsers.add_parser(
        "pacs",
        help="query a PACS, fuse studies from it and store the fused series (DIMSE or DICOMweb)",
        description="Query a PACS (C-FIND/QIDO-RS), retrieve series (C-GET, C-MOVE, WADO-RS), "
        "fuse them, and store a derived DICOM series (C-STORE/STOW-RS).",
    )
    actions = parser.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)

    node = argparse.ArgumentParser(add_help=False)
    node.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="PACS node configuration (.toml, .yaml, .yml)",
    )
    node.add_argument("--node", metavar="NAME", help="node name (default: the only/default one)")
    node.add_argument(
        "--transport",
        choices=("auto", "dimse", "dicomweb"),
        default="auto",
        help="protocol to use (auto: DIMSE when configured, else DICOMweb)",
    )

    query = argparse.ArgumentParser(add_help=False)
    query.add_argument("--patient-id", default="", help="Patient ID (wildcards * and ?)")
    query.add_argument("--patient-name", default="", help="Patient name (wildcards * and ?)")
    query.add_argument("--date", default="", help="study date YYYYMMDD or YYYYMMDD-YYYYMMDD")
    query.add_argument("--modality", default="", help="a modality in the study (e.g. MR)")
    query.add_argument("--accession", default="", help="accession number")
    query.add_argument("--description", default="", help="study description (wildcards)")

    fusion = argparse.ArgumentParser(add_help=False)
    fusion.add_argument(
        "--reference",
        required=True,
        metavar="SELECTOR",
        help="reference series (its grid is kept): a SeriesInstanceUID or rules "
        "such as modality=MR,description=t1",
    )
    fusion.add_argument(
        "--other",
        action="append",
        required=True,
        metavar="SELECTOR",
        help="a series to fuse with the reference (repeat for more)",
    )
    fusion.add_argument("--method", default="cnn", help="fusion method (default: cnn)")
    fusion.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    fusion.add_argument("--batch-size", type=int, default=16, help="slices per batch")
    fusion.add_argument(
        "--normalise",
        dest="normalisation",
        default="percentile",
        help="intensity normalisation policy (see medfusion fuse --help)",
    )
    fusion.add_argument("--block-exponent", type=int, choices=range(0, 7), metavar="I",
                        help="cnn and sesf: block size exponent i (2^i x 2^i pixel "
                        "blocks, 0..6)")
    from medfusion.cli.register import add_alignment_options

    add_alignment_options(fusion)
    fusion.add_argument(
        "--no-store",
        action="store_true",
        help="do not store the fused series on the PACS (write it to a folder)",
    )

    echo = actions.add_parser("echo", parents=[node], help="check that the node answers")
    echo.set_defaults(func=run_echo)

    find = actions.add_parser("find", parents=[node, query], help="list studies or series")
    find.add_argument("--study", metavar="UID", help="list the series of this study")
    find.add_argument("--series", action="store_true", help="also list each study's series")
    find.add_argument("--json", action="store_true", help="print JSON instead of a table")
    find.set_defaults(func=run_find)

    fuse = actions.add_parser("fuse", parents=[node, fusion], help="fuse series of one study")
    fuse.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    fuse.add_argument(
        "--output-dir", metavar="DIR", help="also write the fused series into this new folder"
    )
    fuse.set_defaults(func=run_fuse)

    batch = actions.add_parser(
        "batch", parents=[node, query, fusion], help="fuse every study matching a query"
    )
    batch.add_argument(
        "--output-root", metavar="DIR", help="write each fused series to DIR/<StudyInstanceUID>"
    )
    batch.add_argument(
        "--summary",
        metavar="FILE",
        help="write the summary table (.csv or .json), updated after each study",
    )
    batch.add_argument(
        "--force",
        action="store_true",
        help="fuse studies that already have a MedFusion series again",
    )
    batch.set_defaults(func=run_batch)


def _client(args: argparse.Namespace):
    from medfusion.pacs.config import load_config
    from medfusion.pacs.workflow import open_client

    return open_client(load_config(args.config).node(args.node), args.transport)


def _query(args: argparse.Namespace, study_uid: str = ""):
    from medfusion.pacs.records import StudyQuery

    return StudyQuery(
        patient_id=args.patient_id,
        patient_name=args.patient_name,
        study_date=args.date,
        modality=args.modality.upper(),
        accession=args.accession,
        study_uid=study_uid,
        description=args.description,
    )


def _plan(args: argparse.Namespace):
    from medfusion.pacs.selection import SeriesSelector
    from medfusion.pacs.workflow import FusionPlan

    options = {"block_exponent": args.block_exponent}
    return FusionPlan(
        reference=SeriesSelector.parse(args.reference),
        others=tuple(SeriesSelector.parse(text) for text in args.other),
        method=args.method,
        device=args.device,
        batch_size=args.batch_size,
        normalisation=args.normalisation,
        method_options={key: value for key, value in options.items() if value is not None},
        register=args.register,
        check_alignment=not args.no_alignment_check,
    )


def run_echo(args: argparse.Namespace) -> int:
    client = _client(args)
    client.echo()
    print(f"node {client.node_name}: OK")
    return 0


def run_find(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    client = _client(args)
    if args.study:
        studies = []
        series = {args.study: client.find_series(args.study)}
    else:
        studies = client.find_studies(_query(args))
        series = (
            {s.study_uid: client.find_series(s.study_uid) for s in studies} if args.series else {}
        )
    if args.json:
        payload = {
            "studies": [asdict(study) for study in studies],
            "series": {uid: [asdict(item) for item in items] for uid, items in series.items()},
        }
        print(json.dumps(payload, indent=2))
        return 0
    if not args.study:
        _print_table(
            [
                "StudyInstanceUID",
                "PatientID",
                "Date",
                "Modalities",
                "Series",
                "Instances",
                "Description",
            ],
            [
                [
                    s.study_uid,
                    s.patient_id,
                    s.study_date,
                    "/".join(s.modalities),
                    _num(s.n_series),
                    _num(s.n_instances),
                    s.description,
                ]
                for s in studies
            ],
        )
    for study_uid, items in series.items():
        print(f"\nstudy {study_uid}:" if not args.study else f"study {study_uid}:")
        _print_table(
            ["SeriesInstanceUID", "Modality", "Number", "Instances", "Description"],
            [
                [
                    s.series_uid,
                    s.modality,
                    _num(s.series_number),
                    _num(s.n_instances),
                    s.description,
                ]
                for s in items
            ],
        )
    return 0


def run_fuse(args: argparse.Namespace) -> int:
    from medfusion.pacs.workflow import fuse_study

    if args.no_store and not args.output_dir:
        from medfusion.errors import InputError

        raise InputError("--no-store needs --output-dir (otherwise the result goes nowhere)")
    client = _client(args)
    with _progress_bar("fusing slices") as progress:
        result = fuse_study(
            client,
            args.study,
            _plan(args),
            store=not args.no_store,
            output_dir=args.output_dir,
            progress=progress,
        )
    where = [f"stored on node {client.node_name}"] if result.stored else []
    if result.output_dir is not None:
        where.append(f"written to {result.output_dir}")
    print(
        f"fused series {result.series_uid} ({result.n_instances} instances) {' and '.join(where)}"
    )
    for warning in result.warnings:
        print(warning)
    return 0


def run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medfusion.errors import InputError
    from medfusion.pacs.workflow import batch_fuse

    if args.no_store and not args.output_root:
        raise InputError("--no-store needs --output-root (otherwise the results go nowhere)")
    if args.summary:
        from medfusion.io.atomic import check_not_an_input

        check_not_an_input(args.summary, [args.config])  # the node file is an input
    client = _client(args)
    bar = tqdm(total=0, unit="study", file=sys.stderr, disable=None, desc="studies")

    def on_study(done: int, total: int, row: Any) -> None:
        bar.total = total
        bar.set_postfix_str(row.status)
        bar.update(1)

    try:
        rows = batch_fuse(
            client,
            _query(args),
            _plan(args),
            store=not args.no_store,
            output_root=args.output_root,
            force=args.force,
            summary_path=args.summary,
            on_study=on_study,
        )
    finally:
        bar.close()
    if not rows:  # a query that matches nothing is most often a mistyped one: not a success
        raise InputError(f"no study on node {client.node_name} matches the query: nothing fused")
    _print_table(
        ["StudyInstanceUID", "Status", "FusedSeriesUID", "Instances", "Seconds", "Message"],
        [
            [r.study_uid, r.status, r.series_uid, str(r.n_instances), f"{r.seconds:.1f}", r.message]
            for r in rows
        ],
    )
    counts = {
        status: sum(r.status == status for r in rows) for status in ("fused", "skipped", "failed")
    }
    print(
        f"{len(rows)} studies: {counts['fused']} fused, {counts['skipped']} skipped, "
        f"{counts['failed']} failed"
    )
    return 1 if counts["failed"] else 0


class _progress_bar:
    """A tqdm bar on stderr fed by the engine's ``progress(done, total)`` callback."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __enter__(self):
        return self.update

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total, unit="slice", file=sys.stderr, disable=None, desc=self.label
            )
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _num(value: int | None) -> str:
    return "" if value is None else str(value)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)))
