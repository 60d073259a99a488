"""``medfusion batch``: fuse many groups of co-registered files, one output per group.

Groups come from folders (``DIR_REF DIR_OTHER...``: every entry of DIR_REF with the entries of
the same name in the other folders; DICOM series sub-folders count as entries) or from a list
file (``--list``, format in :data:`LIST_FORMAT_HELP`). A failing item is reported and skipped;
the exit code is 1 if any item failed.

Before any work the whole plan is checked: every output must lie inside OUT_DIR, no output may
be an input of the batch (or lie inside an input folder), and no two groups may write the same
file. Otherwise the batch is refused, naming the offending rows, and nothing is written.
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

LIST_FORMAT_HELP = """\
group list (--list FILE):
  CSV: a header line, then one group per line: the input columns first (reference first,
  any header names; a row may leave some empty, never add cells past the header), and an
  optional column named "output":
      reference,other,output
      mri/case1.nii.gz,pet/case1.nii.gz,case1.nii.gz
      mri/case2.nii.gz,pet/case2.nii.gz,
  JSON: a list of groups, each {"inputs": [REF, OTHER, ...], "output": NAME} ("output"
  optional) or a plain list of inputs:
      [{"inputs": ["mri/case1.nii.gz", "pet/case1.nii.gz"], "output": "case1.nii.gz"},
       ["mri/case2.nii.gz", "pet/case2.nii.gz"]]
  Relative inputs are relative to the list file. An output is a file name (or relative path)
  inside OUT_DIR; without one it is named after the reference (DICOM and MHD inputs get
  .nii.gz / .mha). Outputs must stay inside OUT_DIR (no absolute paths, no ..), must not be
  an input of the batch, and must differ from each other; otherwise the whole list is refused
  before any work, naming the rows.
"""


@dataclass
class Group:
    """One batch item: inputs (reference first) and where its output goes."""

    name: str
    inputs: list[Path]
    output: Path
    where: str = ""  # how the user finds it: "line 3 of groups.csv", "entry a.nii"


def register(subparsers: Any) -> None:
    """Add the ``batch`` sub-command."""
    from medfusion.cli.fuse import add_fusion_options

    parser = subparsers.add_parser(
        "batch",
        help="fuse every group of same-named files across folders",
        description="Fuse each entry of DIR_REF with the entries of the same name in every "
        "DIR_OTHER (or the groups of --list) into OUT_DIR/<name>. Failed items are reported "
        "and skipped; the exit code is 1 if any failed.",
        epilog=LIST_FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    names = {entry.name for entry in entries}
    for root in roots[1:]:
        unmatched = sorted(
            entry.name for entry in root.iterdir()
            if not entry.name.startswith(".") and entry.name not in names
            and (entry.is_dir() or full_suffix(entry) in known))
        if unmatched:
            more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
            logger.warning("%s of %s %s no namesake in the reference folder %s, so not "
                           "fused: %s%s", _count(len(unmatched), "entry", "entries"), root.name,
                           "has" if len(unmatched) == 1 else "have", roots[0].name,
                           ", ".join(unmatched[:5]), more)
    return [
        Group(entry.name, [root / entry.name for root in roots], output_dir / output_name(entry),
              where=f"entry {entry.name}")
        for entry in entries
    ]


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


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
    for where, inputs, output in records:
        if len(inputs) < 2:
            raise InputError(f"{where} of {path.name} has fewer than two inputs")
        resolved = [p if Path(p).is_absolute() else path.parent / p for p in map(Path, inputs)]
        name = output or output_name(resolved[0])
        groups.append(Group(Path(name).name, resolved, output_dir / name,
                            where=f"{where} of {path.name}"))
    if not groups:
        raise InputError(f"group list {path.name} is empty")
    return groups


Record = tuple[str, list[str], "str | None"]  # (where in the file, inputs, output or None)


def _json_records(path: Path) -> list[Record]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise InputError(f"{path.name}: expected a JSON list of groups")
    records: list[Record] = []
    for number, item in enumerate(data, start=1):
        where = f"group {number}"
        if isinstance(item, dict) and isinstance(item.get("inputs"), list):
            unknown = sorted(set(item) - {"inputs", "output"})
            if unknown:  # a misspelt "output" would silently name the result otherwise
                raise InputError(f"{where} of {path.name}: unknown key(s) {', '.join(unknown)}; "
                                 "a group has \"inputs\" and an optional \"output\"")
            output = item.get("output")
            if output is not None and not isinstance(output, str):
                raise InputError(f"{where} of {path.name}: output must be a file name")
            records.append((where, _json_inputs(item["inputs"], where, path), output or None))
        elif isinstance(item, list):
            records.append((where, _json_inputs(item, where, path), None))
        else:
            raise InputError(f"{path.name}: each group must be a list or an object with inputs")
    return records


def _json_inputs(values: list, where: str, path: Path) -> list[str]:
    """A JSON group's inputs: file names (strings), never ``null`` or numbers read as names."""
    if not all(isinstance(value, str) and value.strip() for value in values):
        raise InputError(f"{where} of {path.name}: inputs must be file names (strings)")
    return list(values)


def _csv_records(path: Path) -> list[Record]:
    records: list[Record] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        output_column = header.index("output") if "output" in header else None
        for cells in reader:
            where = f"line {reader.line_num}"
            if len(cells) > len(header):  # a cell without a column: an input or a typo?
                raise InputError(
                    f"{path.name}: {where} has {len(cells)} cells but the header {len(header)} "
                    "columns; give each input its own column (empty cells where a group has "
                    "fewer inputs)"
                )
            output = None
            if output_column is not None and output_column < len(cells):
                output = cells[output_column].strip() or None
            inputs = [value.strip() for column, value in enumerate(cells)
                      if column != output_column and value.strip()]
            if cells:  # (a blank line is no group)
                records.append((where, inputs, output))
    return records


def check_plan(groups: list[Group], output_dir: Path) -> None:
    """Refuse the batch (OutputError naming the rows) unless every output lies inside
    ``output_dir``, is no input of the batch (nor inside an input folder), is unique, and has
    an extension for its inputs' kind (2D images or 3D volumes)."""
    from medfusion.io import input_kind
    from medfusion.io.images import check_image_output
    from medfusion.io.volumes import check_volume_output

    root = output_dir.resolve()
    inputs = {group_input.resolve(): group for group in groups for group_input in group.inputs}
    input_folders = [path for path in inputs if path.is_dir()]
    problems: list[str] = []
    first_writer: dict[Path, Group] = {}
    for group in groups:
        target = group.output.resolve()
        shown = group.output.relative_to(output_dir) if group.output.is_relative_to(
            output_dir) else group.output  # fmt: skip
        if target == root:
            problems.append(f"{group.where}: output {str(shown)!r} is the output folder itself")
        elif not target.is_relative_to(root):
            problems.append(f"{group.where}: output {str(shown)!r} is outside {output_dir}")
        elif target in inputs:
            owner = inputs[target]
            problems.append(
                f"{group.where}: output {str(shown)!r} is an input of "
                f"{'the same group' if owner is group else owner.where}"
            )
        elif any(target.is_relative_to(folder) for folder in input_folders):
            problems.append(f"{group.where}: output {str(shown)!r} is inside an input folder")
        elif target in first_writer:
            problems.append(
                f"{group.where}: output {str(shown)!r} is also the output of "
                f"{first_writer[target].where}"
            )
        else:
            first_writer[target] = group
            check_output = (check_image_output if input_kind(group.inputs[0]) == "image"
                            else check_volume_output)
            try:
                check_output(group.output)
            except OutputError as error:
                problems.append(f"{group.where}: {error}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise OutputError(
            f"batch refused, nothing was fused: {'; '.join(problems[:5])}{more}"
        )


def collect_groups(folders: list[str], list_file: str | None, output_dir: str) -> list[Group]:
    """Groups from ``--list`` or from folders; creates OUT_DIR (its parent must exist)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"-o must be a folder, but {out} is a file")
    if not out.parent.is_dir():
        raise OutputError(f"output folder's parent does not exist: {out.parent}")
    if list_file and folders:
        raise InputError("give either folders or --list, not both")
    groups = groups_from_list(list_file, out) if list_file else groups_from_folders(folders, out)
    check_plan(groups, out)
    try:
        out.mkdir(exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the output folder {out}: {error.strerror}") from None
    return groups


def run_batch(args: argparse.Namespace) -> int:
    """Fuse every group; report failures; print a summary; exit 1 if any item failed."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from medfusion.cli.fuse import (
        Progress,
        SliceMetrics,
        build_method,
        check_metrics_path,
        check_option_use,
        emit_json,
        engine_options,
        image_metrics,
        write_metrics,
    )
    from medfusion.engine import FusedImage, fuse_files
    from medfusion.io.atomic import missing_folders, remove_empty_folders

    check_option_use(args)
    check_metrics_path(args.metrics)  # both before collect_groups creates the output folder
    groups = collect_groups(args.folders, args.group_list, args.output_dir)
    method = build_method(args)
    progress = Progress(args.progress, description="batch", unit="item")
    failures: list[tuple[str, str]] = []
    metric_rows: list[dict[str, Any]] = []
    with logging_redirect_tqdm():
        progress(0, len(groups))
        for done, group in enumerate(groups, start=1):
            slice_metrics = SliceMetrics() if args.metrics else None
            made = missing_folders(group.output.parent)
            try:
                group.output.parent.mkdir(parents=True, exist_ok=True)  # inside OUT_DIR
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
                remove_empty_folders(made)
            except (OSError, RuntimeError, ValueError) as error:
                failures.append((group.name, f"{type(error).__name__}: {error}"))
                logger.error("%s: failed: %s: %s", group.name, type(error).__name__, error)
                remove_empty_folders(made)
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
