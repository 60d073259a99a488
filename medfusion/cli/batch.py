"""``medfusion batch``: fuse many groups of co-registered files, one output per group.

Groups come from folders (``DIR_REF DIR_OTHER...``: every entry of DIR_REF with the entries of
the same name in the other folders; DICOM series sub-folders count as entries) or from a list
file (``--list``): CSV with a header, the first column(s) the inputs (reference first) and an
optional ``output`` column; or JSON, a list of ``{"inputs": [...], "output": "..."}`` objects or of
plain input lists. Relative input paths are relative to the list file; outputs go under
OUT_DIR. A failing item is reported and skipped; the exit code is 1 if any item failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion.errors import InputError, MedFusionError, OutputError
from medfusion.io import IMAGE_SUFFIXES, VOLUME_SUFFIXES, full_suffix, stem

logger = logging.getLogger("medfusion")


@dataclass
class Group:
    """One batch item: inputs (reference first) and where its output goes."""

    name: str
    inputs: list[Path]
    output: Path


def register(subparsers: Any) -> None:
    """Add the ``batch`` sub-command."""
    from medfusion.cli.fuse import add_fusion_options

    parser = subparsers.add_parser(
        "batch",
        help="fuse every group of same-named files across folders",
        description="Fuse each entry of DIR_REF with the entries of the same name in every "
        "DIR_OTHER (or the groups of --list) into OUT_DIR/<name>. Failed items are reported "
        "and skipped; the exit code is 1 if any failed.",
    )
    parser.add_argument("folders", nargs="*", metavar="DIR",
                        help="DIR_REF DIR_OTHER [DIR_OTHER ...]")
    parser.add_argument("--list", dest="group_list", metavar="FILE",
                        help="CSV or JSON list of groups, instead of folders")
    parser.add_argument("-o", "--output-dir", required=True, help="folder for the outputs")
    parser.add_argument("--metrics", metavar="FILE",
                        help="write one metrics row per fused item (.csv or .json)")
    add_fusion_options(parser)
    parser.set_defaults(func=run_batch)


def output_name(entry: Path) -> str:
    """Output file name for an input entry: same name for images and writable volume files;
    ``.mha`` for MHD; ``.nii.gz`` for DICOM files and series folders."""
    suffix = full_suffix(entry)
    if entry.is_dir() or suffix in ("", ".dcm", ".nhdr"):
        return f"{stem(entry)}.nii.gz"
    if suffix == ".mhd":
        return f"{stem(entry)}.mha"
    return entry.name


def groups_from_folders(folders: list[str], output_dir: Path) -> list[Group]:
    """Every entry of the first folder, grouped with the same names in the others."""
    if len(folders) < 2:
        raise InputError("give a reference folder and at least one other folder, or --list FILE")
    roots = [Path(folder) for folder in folders]
    for root in roots:
        if not root.is_dir():
            raise InputError(f"not a folder: {root}")
    known = IMAGE_SUFFIXES + VOLUME_SUFFIXES
    entries = sorted(
        entry for entry in roots[0].iterdir()
        if not entry.name.startswith(".") and (entry.is_dir() or full_suffix(entry) in known)
    )
    if not entries:
        raise InputError(f"no images, volumes or DICOM folders found in {roots[0]}")
    return [
        Group(entry.name, [root / entry.name for root in roots], output_dir / output_name(entry))
        for entry in entries
    ]


def groups_from_list(list_file: str, output_dir: Path) -> list[Group]:
    """Groups from a CSV or JSON list file (format in the module doc)."""
    path = Path(list_file)
    if not path.is_file():
        raise InputError(f"group list not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            records = _json_records(path)
        elif path.suffix.lower() == ".csv":
            records = _csv_records(path)
        else:
            raise InputError(f"group list must be .csv or .json, not {path.name}")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"cannot parse group list {path.name}: {error}") from error
    groups = []
    for number, (inputs, output) in enumerate(records, start=1):
        if len(inputs) < 2:
            raise InputError(f"group {number} of {path.name} has fewer than two inputs")
        resolved = [p if Path(p).is_absolute() else path.parent / p for p in map(Path, inputs)]
        name = output or output_name(resolved[0])
        groups.append(Group(Path(name).name, resolved, output_dir / name))
    if not groups:
        raise InputError(f"group list {path.name} is empty")
    return groups


def _json_records(path: Path) -> list[tuple[list[str], str | None]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise InputError(f"{path.name}: expected a JSON list of groups")
    records = []
    for item in data:
        if isinstance(item, dict) and isinstance(item.get("inputs"), list):
            records.append(([str(p) for p in item["inputs"]], item.get("output")))
        elif isinstance(item, list):
            records.append(([str(p) for p in item], None))
        else:
            raise InputError(f"{path.name}: each group must be a list or an object with inputs")
    return records


def _csv_records(path: Path) -> list[tuple[list[str], str | None]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    records = []
    for row in rows:
        output = (row.pop("output", None) or "").strip() or None
        inputs = [value.strip() for value in row.values() if value and value.strip()]
        records.append((inputs, output))
    return records


def collect_groups(folders: list[str], list_file: str | None, output_dir: str) -> list[Group]:
    """Groups from ``--list`` or from folders; creates OUT_DIR (its parent must exist)."""
    out = Path(output_dir)
    if not out.parent.is_dir():
        raise OutputError(f"output folder's parent does not exist: {out.parent}")
    if list_file and folders:
        raise InputError("give either folders or --list, not both")
    groups = groups_from_list(list_file, out) if list_file else groups_from_folders(folders, out)
    out.mkdir(exist_ok=True)
    return groups


def run_batch(args: argparse.Namespace) -> int:
    """Fuse every group; report failures; print a summary; exit 1 if any item failed."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from medfusion.cli.fuse import (
        Progress,
        SliceMetrics,
        build_method,
        check_metrics_path,
        emit_json,
        engine_options,
        image_metrics,
        write_metrics,
    )
    from medfusion.engine import FusedImage, fuse_files

    groups = collect_groups(args.folders, args.group_list, args.output_dir)
    check_metrics_path(args.metrics)
    method = build_method(args)
    progress = Progress(args.progress, description="batch", unit="item")
    failures: list[tuple[str, str]] = []
    metric_rows: list[dict[str, Any]] = []
    with logging_redirect_tqdm():
        progress(0, len(groups))
        for done, group in enumerate(groups, start=1):
            slice_metrics = SliceMetrics() if args.metrics else None
            try:
                result = fuse_files(
                    group.inputs, group.output, method=method, on_batch=slice_metrics,
                    **engine_options(args, len(group.inputs)),
                )
                if args.metrics:
                    values = (image_metrics(result) if isinstance(result, FusedImage)
                              else slice_metrics.summary())
                    metric_rows.append({"item": group.name, **values})
            except MedFusionError as error:
                failures.append((group.name, str(error)))
                logger.error("%s: failed: %s", group.name, error)
            except (OSError, RuntimeError, ValueError) as error:
                failures.append((group.name, f"{type(error).__name__}: {error}"))
                logger.error("%s: failed: %s: %s", group.name, type(error).__name__, error)
            progress(done, len(groups))
        progress.close()
    if args.metrics and metric_rows:
        write_metrics(args.metrics, _mean_rows(metric_rows), metric_rows,
                      {"method": method.name, "output_dir": str(args.output_dir)})
    fused = len(groups) - len(failures)
    summary = f"fused {fused} of {len(groups)} groups into {args.output_dir}"
    if failures:
        summary += f"; {len(failures)} failed: " + ", ".join(name for name, _ in failures)
    if args.progress == "json":
        emit_json({"event": "done", "output": str(args.output_dir), "fused": fused,
                   "failed": [{"item": name, "error": why} for name, why in failures]})
    logger.info(summary)
    return 1 if failures else 0


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
    import math

    names = [key for key in rows[0] if key != "item"]
    means = {}
    for name in names:
        values = [row[name] for row in rows if isinstance(row.get(name), float)
                  and math.isfinite(row[name])]
        means[name] = sum(values) / len(values) if values else float("nan")
    return means
