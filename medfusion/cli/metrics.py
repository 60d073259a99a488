"""``medfusion metrics FUSED SOURCE [SOURCE ...]``: fusion quality metrics of a result.

2D images (PNG, JPEG, TIFF, BMP) are read with :func:`medfusion.io.images.read_image`, scaled
to [0, 1] by their storage range, colour inputs reduced to their luminance (Y of YCbCr), and
measured with ``data_range=1`` (every metric works on the equivalent 8-bit grey scale).
The image scored is the fused file as stored (8-bit; for colour, the luminance of its RGB), the
same as ``medfusion fuse --metrics`` scores. Volumes (NIfTI, NRRD, MHA, DICOM folders) are read
with :func:`medfusion.io.volumes.read_volume`; their grids are compared in physical space (size,
spacing, origin, direction) with the fused volume's: a source on another grid is an error, or
resampled onto the fused grid with ``--resample``. Sources and target are normalised to [0, 1] like
the fusion does (``--normalisation``, default percentile); the fused volume is taken as it is
when it already lies in [0, 1] (MedFusion's output) and min-max scaled otherwise. Volumes give
per-slice values and their mean over slices (``--mask foreground`` skips empty slices).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import GeometryError, InputError, OutputError

FORMATS = ("csv", "json", "markdown")
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


def register(subparsers) -> None:
    """Add the ``metrics`` sub-command."""
    parser = subparsers.add_parser(
        "metrics",
        help="compute fusion quality metrics of a fused image or volume",
        description="Compute fusion quality metrics (EN, SD, SF, AG, MI, QAB/F, SSIM, VIF, ...) "
                    "of FUSED against its SOURCES, and against --target when given. "
                    "See docs/metrics.md for every metric's definition and conventions.",
    )
    parser.add_argument("fused", help="fused image or volume")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="the co-registered source images or volumes")
    parser.add_argument("--target", help="target (reference) fused image: adds <NAME>_target")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="metrics to compute (default: all); aliases such as ENT, STD, "
                             "GRAD, QAB/F are accepted")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: from -o's extension: .csv, .json, or "
                             "markdown for .md, .txt or none; markdown on stdout)")
    parser.add_argument("-o", "--output", help="write to this file (atomically) instead of stdout")
    parser.add_argument("--axis", default=None,
                        help="volumes: slice axis, axial|coronal|sagittal or 0|1|2 of the "
                             "(z, y, x) array (default: axial)")
    parser.add_argument("--mask", choices=("foreground", "none"), default=None,
                        help="volumes: 'foreground' skips empty slices (default), 'none' keeps all")
    parser.add_argument("--normalisation", default=None,
                        help="volumes: normalisation of sources/target to [0, 1] "
                             "(percentile|minmax|none; default: percentile)")
    parser.add_argument("--resample", action="store_true",
                        help="volumes: resample sources/target on another voxel grid onto the "
                             "fused volume's grid in physical space (linear); without it such a "
                             "volume is an error")
    parser.add_argument("--per-slice", action="store_true",
                        help="volumes: list every slice's values, then the mean")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the metrics and print or write them; returns the exit code."""
    from medfusion.io import input_kind

    paths = [args.fused, *args.sources] + ([args.target] if args.target else [])
    kinds = {input_kind(p) for p in paths}
    if len(kinds) > 1:
        from medfusion.io.formats import check_contents_match_names

        check_contents_match_names(paths)
        raise InputError("give either 2D images or volumes, not a mix of both")
    if args.output:
        from medfusion.io.atomic import check_not_an_input

        check_not_an_input(args.output, paths)  # before any work
    fmt = _output_format(args.format, args.output)
    names = _names(args.names)
    _volume_options(args, kinds == {"image"})
    if kinds == {"image"}:
        summary = _image_metrics(args, names)
        rows: list[dict[str, float]] = []
    else:
        rows, summary = _volume_metrics(args, names)
        if not args.per_slice:
            rows = []
    text = format_table(summary, rows, fmt, scored=_scored(kinds == {"image"}))
    if args.output:
        from medfusion.io.atomic import atomic_output

        with atomic_output(args.output) as temporary:
            Path(temporary).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


# the volume options and their defaults (None in the parser: given or not is known)
_VOLUME_DEFAULTS = {"axis": "axial", "mask": "foreground", "normalisation": "percentile"}


def _volume_options(args: argparse.Namespace, images: bool) -> None:
    """Fill in the volume options' defaults; for 2D images warn about each one given (an
    option that changes nothing is a mistake the user should hear of, as in ``fuse``)."""
    from medfusion.cli.fuse import warn_ignored_for_images

    given = [(f"--{name}", getattr(args, name) is not None) for name in _VOLUME_DEFAULTS]
    given += [("--resample", args.resample), ("--per-slice", args.per_slice)]
    if images:
        warn_ignored_for_images(given)
    for name, default in _VOLUME_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _names(names: list[str] | None) -> list[str] | None:
    if names is None:
        return None
    from medfusion.metrics import resolve_name

    split = [part.strip() for name in names for part in name.split(",") if part.strip()]
    if not split:
        raise InputError("--names names no metric (give e.g. --names QABF VIF)")
    for name in split:
        resolve_name(name)  # unknown names fail before reading any file
    return split


# -o's extensions that name a format; a file with none, or .txt, gets markdown
_SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".md": "markdown", ".markdown": "markdown",
                   ".txt": "markdown", "": "markdown"}


def _output_format(fmt: str | None, output: str | None) -> str:
    """The table's format: ``--format``, else from ``-o``'s extension (markdown without -o).
    Another extension (an image's, say) is an error: a table would be written under a name
    that promises something else."""
    if fmt:
        return fmt
    if not output:
        return "markdown"
    suffix = Path(output).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise OutputError(f"cannot tell the table's format from {Path(output).name}: name it "
                          f".csv, .json or .md, or give --format")
    return _SUFFIX_FORMATS[suffix]


def _luminance01(path: str | Path) -> np.ndarray:
    """A 2D image file as float [0, 1] luminance (Y of YCbCr for colour images)."""
    from medfusion.engine import luminance_for_scoring
    from medfusion.io.images import min_max_bounds, read_image

    samples = read_image(path)
    bounds = min_max_bounds(samples)
    if bounds is not None:
        low, high = (bound + 0.0 for bound in bounds)  # + 0.0: -0 is printed as 0
        logging.getLogger("medfusion").warning(
            "%s holds %s values from %g to %g, not 8- or 16-bit ones: scored min-max scaled to "
            "[0, 1]", Path(path).name, samples.dtype, low, high)
    return luminance_for_scoring(samples)


def image_file_metrics(fused_path: str | Path, source_paths: list, target_path=None,
                       names: list[str] | None = None) -> dict[str, float]:
    """Metrics of a fused 2D image file against its source files (and a target), as stored:
    the luminance of each, on [0, 1] (``medfusion.engine.SCORED_IMAGE``). ``medfusion fuse
    --metrics`` calls this on the file it wrote, so both commands give the same numbers."""
    from medfusion.metrics import compute_metrics

    fused = _luminance01(fused_path)
    sources = [_luminance01(p) for p in source_paths]
    target = _luminance01(target_path) if target_path else None
    for path, image in zip([*source_paths, *([target_path] if target_path else [])],
                           [*sources, *([target] if target is not None else [])], strict=True):
        if image.shape != fused.shape:
            raise GeometryError(f"{Path(path).name} is {image.shape[1]}x{image.shape[0]} pixels, "
                                f"the fused image {fused.shape[1]}x{fused.shape[0]}")
    return compute_metrics(fused, sources, target=target, names=names, data_range=1.0)


def _image_metrics(args: argparse.Namespace, names: list[str] | None) -> dict[str, float]:
    from medfusion.engine import SCORED_IMAGE

    logging.getLogger("medfusion").info("scoring %s", SCORED_IMAGE)
    return image_file_metrics(args.fused, args.sources, args.target, names)


def _volume_array(path: str) -> tuple[np.ndarray, Any]:
    import SimpleITK as sitk

    from medfusion.intensity import check_finite
    from medfusion.io.volumes import read_volume

    image = read_volume(path)
    array = sitk.GetArrayFromImage(image).astype(np.float64, copy=False)
    check_finite(array, Path(path).name)
    return array, image


def _on_fused_grid(fused_image, path: str, resample: bool) -> np.ndarray:
    """A source/target volume as a (z, y, x) array on the fused volume's voxel grid.

    Grids are compared in physical space (size, spacing, origin, direction; as ``fuse`` does):
    a volume on another grid (e.g. the SPM12 SPECT with its flipped x axis) would be scored
    mirrored or shifted, so it is an error, unless ``resample`` resamples it onto the fused
    grid (:func:`medfusion.geometry.align_to_reference`, which refuses non-overlapping ones).
    """
    import SimpleITK as sitk

    from medfusion import geometry
    from medfusion.intensity import check_finite
    from medfusion.io.volumes import read_volume

    image = read_volume(path)
    label = Path(path).name
    if not geometry.same_grid(fused_image, image):
        if not resample:
            differences = ", ".join(geometry.grid_differences(fused_image, image)) or "grid"
            raise GeometryError(
                f"{label} is not on the fused volume's voxel grid (different {differences}); "
                "add --resample to resample it onto the fused grid, or fuse first"
            )
        image = geometry.align_to_reference(fused_image, image, label)
    array = sitk.GetArrayFromImage(image).astype(np.float64, copy=False)
    check_finite(array, label)
    return array


def _volume_metrics(args: argparse.Namespace, names: list[str] | None):
    from medfusion.intensity import fit_normaliser
    from medfusion.metrics import volume_metrics

    axis = AXES.get(str(args.axis).lower())
    if axis is None:
        if str(args.axis) not in ("0", "1", "2"):
            raise InputError(f"unknown axis {args.axis!r}: use axial, coronal, sagittal or 0-2")
        axis = int(args.axis)
    fused, reference = _volume_array(args.fused)
    others = [*args.sources, *([args.target] if args.target else [])]
    volumes = []
    for path in others:
        array = _on_fused_grid(reference, path, args.resample)
        normaliser = fit_normaliser(array, args.normalisation, label=Path(path).name)
        volumes.append(np.asarray(normaliser(array), dtype=np.float64))
    low, high = float(fused.min()), float(fused.max())
    if low < 0 or high > 1:
        if high <= low:
            raise InputError(f"{Path(args.fused).name} is constant: nothing to measure")
        fused = (fused - low) / (high - low)
    sources = volumes[: len(args.sources)]
    target = volumes[len(args.sources)] if args.target else None
    return volume_metrics(fused, sources, axis=axis,
                          mask=None if args.mask == "none" else "foreground",
                          names=names, data_range=1.0, target=target)


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.6g}"


def _scored(images: bool) -> str:
    from medfusion.engine import SCORED_IMAGE

    return SCORED_IMAGE if images else SCORED_VOLUME


SCORED_VOLUME = ("the fused volume as stored, against the sources normalised to [0, 1] "
                 "(--normalisation), on the fused voxel grid")


def format_table(summary: dict[str, float], rows: list[dict[str, float]], fmt: str,
                 scored: str | None = None) -> str:
    """Render metrics as CSV, JSON or a Markdown table (rows: per-slice values, optional).

    ``scored`` (JSON only): which image was scored, in words."""
    if fmt == "json":
        def clean(values: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if not math.isfinite(v) else v) for k, v in values.items()}

        payload: dict[str, Any] = {"metrics": clean(summary)}
        if scored:
            payload["scored"] = scored
        if rows:
            payload["slices"] = [clean(row) for row in rows]
        return json.dumps(payload, indent=2) + "\n"
    if rows:
        columns = list(rows[0])
        table = [[_number(row[c]) for c in columns] for row in rows]
        table.append(["mean" if c == "slice" else _number(summary.get(c, float("nan")))
                      for c in columns])
    else:
        columns = ["metric", "value"]
        table = [[name, _number(value)] for name, value in summary.items()]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(table)
        return buffer.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines) + "\n"
