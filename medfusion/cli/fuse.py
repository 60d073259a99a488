"""``medfusion fuse``: fuse one group of co-registered inputs into one output file.

Also registers ``batch`` (:mod:`medfusion.cli.batch`) and ``demo`` (:mod:`medfusion.cli.demo`),
which share the fusion options, progress reporting and metrics output defined here. Progress
goes to stderr as a bar, or to stdout as JSON lines (``--progress json``) for the Slicer module
and other processes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import InputError, OutputError

logger = logging.getLogger("medfusion")

PROGRESS_MODES = ("bar", "json", "none")
AXES = ("axial", "coronal", "sagittal")
DEFAULT_BATCH_SIZE = 16


# --------------------------------------------------------------------------- parsers
def register(subparsers: Any) -> None:
    """Add the ``fuse``, ``batch`` and ``demo`` sub-commands."""
    from medfusion.cli import batch, demo

    parser = subparsers.add_parser(
        "fuse",
        help="fuse co-registered images or volumes into one",
        description="Fuse two or more co-registered 2D images (PNG, JPEG, TIFF, BMP) or 3D "
        "volumes (NIfTI, NRRD, MHA/MHD, DICOM series folder). The first input is the "
        "reference: it defines the output grid; others on another grid are resampled onto it.",
    )
    parser.add_argument("reference", help="reference image/volume (defines the output grid)")
    parser.add_argument("others", nargs="+", metavar="OTHER", help="images/volumes to fuse in")
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .png/.jpg/.tif/.bmp for images, "
                        ".nii/.nii.gz/.nrrd/.mha for volumes")
    add_fusion_options(parser)
    parser.add_argument("--metrics", metavar="FILE",
                        help="also write the result's quality metrics (.csv or .json)")
    parser.add_argument("--save-transforms", metavar="DIR",
                        help="with --register: write each input's ITK transform to "
                        "DIR/<input>.tfm (an existing folder)")
    parser.add_argument("--save-decision-map", metavar="PATH",
                        help="--method sesf: also write the decision map, a label image/volume "
                        "(1 = reference wins, 2 = the next input, ...), same kind as -o")
    parser.set_defaults(func=run_fuse)
    batch.register(subparsers)
    demo.register(subparsers)


def add_fusion_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``fuse`` and ``batch``."""
    from medfusion.methods import available_methods

    parser.add_argument("--method", default="cnn", choices=available_methods(),
                        help="fusion method (default: cnn, the MONAI bundle's network)")
    parser.add_argument("--bundle", metavar="DIR",
                        help="MONAI bundle folder for --method cnn or sesf (default: the shipped "
                        "one); its configs run Python code ($ expressions): use only trusted "
                        "folders")
    parser.add_argument("--block-exponent", type=int, choices=range(0, 7), metavar="I",
                        help="cnn and sesf: block size exponent i, decisions on 2^i x 2^i "
                             "pixel blocks, 0..6 (smaller: more precise, slower; default: the "
                             "bundle's, cnn 3, sesf 0)")
    parser.add_argument("--axis", default=None, choices=AXES,
                        help="volumes: slicing plane in patient space (default: axial)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"volumes: slices per batch (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument(
        "--normalise", metavar="POLICY[,POLICY...]",
        help="intensity normalisation, one for all inputs or one per input: percentile "
        "(volumes' default: 0.5-99.5th percentile), ct-window, minmax, none (images' default)",
    )
    parser.add_argument("--ct-window", metavar="LEVEL,WIDTH",
                        help="CT window in HU, e.g. 40,80 (brain); without --normalise it "
                        "applies to the reference and the others use percentile")
    parser.add_argument("--allow-slice-gaps", action="store_true",
                        help="DICOM series with missing slices: fuse them on a regular grid at "
                        "the slices' real positions, the gap linearly interpolated (default: "
                        "refuse such a series)")
    parser.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                        help="bar on stderr (default), JSON lines on stdout, or none")
    from medfusion.cli.register import add_alignment_options

    add_alignment_options(parser)


# --------------------------------------------------------------------------- progress
class Progress:
    """Report ``(done, total)`` as a tqdm bar on stderr, JSON lines on stdout, or not at all."""

    def __init__(self, mode: str, description: str = "fusing", unit: str = "slice") -> None:
        self.mode = mode
        self.description = description
        self.unit = unit
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.mode == "json":
            emit_json({"event": "progress", "done": done, "total": total})
        elif self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self.description, unit=self.unit,
                                 file=sys.stderr, leave=False, dynamic_ncols=True,
                                 disable=None)  # no bar when stderr is not a terminal
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def emit_json(event: dict) -> None:
    """One JSON object per line on stdout, flushed at once (a parent process reads it live)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- options
def engine_options(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """Keyword arguments of :func:`medfusion.engine.fuse_files` for ``count`` inputs."""
    from medfusion.intensity import parse_ct_window

    ct_window = parse_ct_window(args.ct_window) if args.ct_window else None
    normalisation = args.normalise
    if normalisation is None and ct_window is not None:
        normalisation = ["ct-window"] + ["percentile"] * (count - 1)
    return {
        "device": args.device, "axis": args.axis or AXES[0],
        "batch_size": DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        "normalisation": normalisation, "ct_window": ct_window,
        "allow_slice_gaps": bool(getattr(args, "allow_slice_gaps", False)),
        "register": args.register, "check_alignment": not args.no_alignment_check,
    }


def check_option_use(args: argparse.Namespace, kind: str | None = None) -> None:
    """Refuse options of the learned methods given with another method, and warn about the
    volume options given for 2D images (``kind`` ``"image"``): an option that changes nothing
    is a mistake the user should hear of, not a silent success."""
    from medfusion.methods import LEARNED_METHODS

    if args.method not in LEARNED_METHODS:
        learned = " and ".join(sorted(LEARNED_METHODS))
        for flag, value in (("--block-exponent", args.block_exponent), ("--bundle", args.bundle)):
            if value is not None:
                raise InputError(f"{flag} applies to --method {learned} only, not {args.method}")
    if kind == "image":
        warn_ignored_for_images([("--axis", args.axis is not None),
                                 ("--batch-size", args.batch_size is not None),
                                 ("--allow-slice-gaps", getattr(args, "allow_slice_gaps", False))])


def warn_ignored_for_images(flags: Iterable[tuple[str, bool]]) -> None:
    """Warn about each volume option of ``(flag, given)`` that was given for 2D images."""
    for flag, given in flags:
        if given:
            logger.warning("%s applies to volumes only; ignored for 2D images", flag)


def build_method(args: argparse.Namespace):
    """Build the fusion method once (the CNN loads its bundle once for a whole batch)."""
    from medfusion.methods import LEARNED_METHODS, get_method

    options: dict[str, Any] = {}
    if args.method in LEARNED_METHODS:
        options = {"bundle_dir": args.bundle, "block_exponent": args.block_exponent}
    return get_method(args.method, device=args.device, **options)


# --------------------------------------------------------------------------- metrics
def check_metrics_path(path: str | Path | None) -> None:
    """Fail before fusing when the metrics file could not be written."""
    if path is None:
        return
    from medfusion.io.atomic import check_output_path

    check_output_path(path)
    if Path(path).suffix.lower() not in (".csv", ".json"):
        raise OutputError(f"the metrics file must end in .csv or .json, not {Path(path).name}")


def _compute_metrics():
    from medfusion.metrics import compute_metrics

    return compute_metrics


def image_metrics(result, output: str | Path | None = None,
                  inputs: list | None = None) -> dict[str, float]:
    """Metrics of a fused 2D result: the image the user gets (``engine.SCORED_IMAGE``).

    With ``output`` and ``inputs`` (files): the written file against the input files, by the
    very function ``medfusion metrics`` uses, so both give the same numbers. Without them: the
    8-bit result in memory (what is written as PNG) against the luminance sources it was fused
    from (batch, demo).
    """
    if output is not None and inputs is not None:
        from medfusion.cli.metrics import image_file_metrics

        return dict(image_file_metrics(output, inputs))
    from medfusion.engine import luminance_for_scoring

    compute = _compute_metrics()
    fused = luminance_for_scoring(result.to_uint8())
    sources = [np.asarray(source, dtype=np.float64) for source in result.sources]
    return dict(compute(fused, sources, data_range=1.0))


class SliceMetrics:
    """``on_batch`` hook of :func:`medfusion.engine.fuse_volumes`: per-slice metrics of every
    slice with content (``volume_metrics`` with the foreground mask), computed batch by batch
    while streaming, so no extra copy of the volumes is kept."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def __call__(self, start: int, stop: int, sources: np.ndarray, fused: np.ndarray) -> None:
        from medfusion.metrics import volume_metrics

        rows, _ = volume_metrics(fused, [sources[:, k] for k in range(sources.shape[1])],
                                 axis=0, mask="foreground", data_range=1.0)
        for row in rows:
            self.rows.append({**row, "slice": float(start + int(row["slice"]))})

    def summary(self) -> dict[str, float]:
        """NaN-ignoring mean of each metric over the kept slices, plus ``slices`` (their count)."""
        names = [key for key in (self.rows[0] if self.rows else {}) if key != "slice"]
        summary: dict[str, float] = {}
        for name in names:
            values = np.array([row[name] for row in self.rows], dtype=float)
            finite = values[np.isfinite(values)]
            summary[name] = float(finite.mean()) if finite.size else float("nan")
        summary["slices"] = float(len(self.rows))
        return summary


def write_metrics(path: str | Path, summary: dict[str, float],
                  rows: list[dict[str, Any]] | None = None, info: dict | None = None) -> None:
    """Write metrics atomically: JSON (``metrics`` + optional per-slice/item ``rows``) or CSV
    (one row per slice/item with a final ``mean`` row, or ``metric,value`` rows)."""
    from medfusion.io.atomic import atomic_output

    target = Path(path)
    if target.suffix.lower() == ".json":
        payload = {**(info or {}), "metrics": _clean(summary)}
        if rows:
            payload["rows"] = [_clean(row) for row in rows]
        text = json.dumps(payload, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_cell(row.get(column)) for column in columns])
            writer.writerow(["mean" if i == 0 else _cell(summary.get(c))
                             for i, c in enumerate(columns)])
        else:
            writer.writerow(["metric", "value"])
            for name, value in summary.items():
                writer.writerow([name, _cell(value)])
        text = buffer.getvalue()
    with atomic_output(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------- fuse
def run_fuse(args: argparse.Namespace) -> int:
    """``medfusion fuse REF OTHER... -o OUT [--metrics FILE]``.

    All of the command's outputs (the fused image or volume, the decision map, the metrics
    file, the transforms) are written to temporary files first and committed together at the
    end (:class:`medfusion.io.atomic.OutputSet`): when any of them fails, none is left, and
    files that were there before keep their old content."""
    from medfusion.engine import FusedImage, check_files, fuse_files
    from medfusion.io.atomic import OutputSet

    inputs = [args.reference, *args.others]
    kind = check_files(inputs, args.output)
    if args.save_decision_map is not None:
        check_files(inputs, args.save_decision_map)  # (the engine sees only its staged name)
    check_option_use(args, kind)
    check_metrics_path(args.metrics)
    options = engine_options(args, len(inputs))
    from medfusion.cli.register import TransformSaver

    saver = options["on_alignment"] = TransformSaver.for_args(args)
    method = build_method(args)
    slice_metrics = SliceMetrics() if args.metrics else None
    progress = Progress(args.progress)
    with OutputSet() as outputs:
        output = outputs.stage(args.output)
        decision_map = (None if args.save_decision_map is None
                        else outputs.stage(args.save_decision_map))
        metrics = None if args.metrics is None else outputs.stage(args.metrics)
        try:
            result = fuse_files(inputs, output, method=method, progress=progress,
                                on_batch=slice_metrics, decision_map=decision_map, **options)
        finally:
            progress.close()
        if saver.folder is not None and saver.transforms:
            _write_transforms(saver, outputs)
        if metrics is not None:
            info = {"inputs": [str(p) for p in inputs], "output": str(args.output),
                    "method": method.name}
            if isinstance(result, FusedImage):
                from medfusion.engine import SCORED_IMAGE

                info["scored"] = SCORED_IMAGE
                write_metrics(metrics, image_metrics(result, output, inputs), info=info)
                logger.info("metrics of %s", SCORED_IMAGE)
            else:
                info["scored"] = ("the fused volume as written (float32), against the sources "
                                  "normalised as fused, per slice with content")
                write_metrics(metrics, slice_metrics.summary(), slice_metrics.rows, info)
    if args.progress == "json":
        emit_json({"event": "done", "output": str(args.output)})
    else:
        logger.info("wrote %s", args.output)
    return 0


def _write_transforms(saver, outputs) -> None:
    """Write the kept transforms in place (their paths are reported as they are written), each
    protected by ``outputs``: a later failure of the command removes them again, or puts back
    the transform files that were there before."""
    for label, _ in saver.transforms:
        outputs.protect(saver.path_for(label))
    saver.write_all()
