"""``medfusion register FIXED MOVING -o OUT [--transform TFM]``, and the alignment options.

``register`` aligns one volume to another (rigid or affine, Mattes mutual information, see
:mod:`medfusion.registration`), writes the moving volume resampled onto the fixed grid and,
with ``--transform``, the ITK transform (``.tfm``/``.h5``, which 3D Slicer loads as a transform
node). :func:`add_alignment_options` gives ``fuse``, ``batch`` and ``pacs fuse`` their
``--register`` and ``--no-alignment-check`` options; :class:`TransformSaver` writes the
transforms of ``fuse --register ... --save-transforms DIR``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medfusion.errors import InputError, OutputError

logger = logging.getLogger("medfusion")


def add_alignment_options(parser: argparse.ArgumentParser) -> None:
    """``--register none|rigid|affine`` and ``--no-alignment-check`` (fuse, batch, pacs fuse)."""
    from medfusion.registration import KINDS, OFFSET_THRESHOLD_MM, ROTATION_THRESHOLD_DEG

    parser.add_argument(
        "--register", default="none", choices=KINDS,
        help="volumes: align each input to the reference before fusing (rigid or affine, "
        "Mattes mutual information); default none (inputs are taken as co-registered)")
    parser.add_argument(
        "--no-alignment-check", action="store_true",
        help="volumes: skip the quick check that warns when an input looks misaligned with "
        f"the reference (more than {OFFSET_THRESHOLD_MM:g} mm or {ROTATION_THRESHOLD_DEG:g} "
        "deg)")


class TransformSaver:
    """``on_alignment`` hook that keeps each registered input's transform and writes them to
    ``DIR/<input>.tfm`` once the fusion succeeded (nothing is written when it fails)."""

    def __init__(self, folder: Path | None, json_events: bool = False) -> None:
        self.folder = folder
        self.json_events = json_events
        self.transforms: list[tuple[str, Any]] = []

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> TransformSaver:
        """The saver for ``fuse``'s parsed options; checks ``--save-transforms`` before work."""
        folder = getattr(args, "save_transforms", None)
        if folder is not None:
            if args.register == "none":
                raise InputError("--save-transforms needs --register rigid or --register affine")
            if Path(folder).exists() and not Path(folder).is_dir():
                raise OutputError(f"--save-transforms names a folder; {folder} is a file")
            if not Path(folder).is_dir():
                raise OutputError(f"transform folder does not exist: {folder} (create it first)")
        return cls(None if folder is None else Path(folder), args.progress == "json")

    def __call__(self, outcome: Any) -> None:
        if outcome.transform is not None:
            self.transforms.append((outcome.label, outcome.transform))

    def path_for(self, label: str) -> Path:
        """Where the transform of the input ``label`` goes: ``DIR/<its name>.tfm``, with the
        folders of a label that has them (two inputs of one name, ``B/3.nii`` and ``C/3.nii``,
        go to ``B_3.tfm`` and ``C_3.tfm``: they shared ``3.tfm``)."""
        from medfusion.io import stem

        assert self.folder is not None
        *folders, _ = Path(label).parts
        return self.folder / f"{'_'.join([*folders, stem(label)])}.tfm"

    def write_all(self) -> list[Path]:
        """Write every kept transform; return the paths (none without a folder)."""
        from medfusion.registration import write_transform

        if self.folder is None:
            return []
        paths = []
        for label, transform in self.transforms:
            path = self.path_for(label)
            write_transform(path, transform)
            paths.append(path)
            if self.json_events:
                from medfusion.cli.fuse import emit_json

                emit_json({"event": "transform", "input": label, "path": str(path)})
            else:
                logger.info("wrote transform of %s to %s", label, path)
        return paths


def register(subparsers: Any) -> None:
    """Add the ``register`` sub-command."""
    parser = subparsers.add_parser(
        "register",
        help="align a volume to another (rigid or affine) and write it and its transform",
        description="Register MOVING to FIXED (Mattes mutual information, multi-resolution), "
        "write MOVING resampled onto FIXED's grid to OUT and, with --transform, the ITK "
        "transform (fixed -> moving points, as ITK and 3D Slicer expect). Inputs are never "
        "modified; on failure nothing is written.",
    )
    parser.add_argument("fixed", help="fixed (reference) volume: file or DICOM series folder")
    parser.add_argument("moving", help="volume to align to the fixed one")
    parser.add_argument("-o", "--output", required=True,
                        help="aligned volume (.nii/.nii.gz/.nrrd/.mha), on the fixed grid")
    parser.add_argument("--transform", metavar="TFM",
                        help="also write the transform (.tfm, .txt or .h5)")
    parser.add_argument("--kind", default="rigid", choices=("rigid", "affine"),
                        help="transform kind (default: rigid)")
    parser.add_argument("--initialiser", default="identity",
                        choices=("identity", "moments", "geometry"),
                        help="starting alignment: identity in scanner space (default; same "
                        "session), centres of intensity mass, or centres of the volumes")
    parser.add_argument("--iterations", type=int, default=300,
                        help="optimiser iterations per resolution level (default: 300)")
    parser.set_defaults(func=run_register)


def _check_paths(args: argparse.Namespace) -> None:
    from medfusion.io import input_kind
    from medfusion.io.atomic import check_not_an_input
    from medfusion.io.volumes import check_volume_output

    for path in (args.fixed, args.moving):
        if not Path(path).exists():
            raise InputError(f"input not found: {path}")
        if input_kind(path) == "image":
            raise InputError(f"register aligns 3D volumes; {Path(path).name} is a 2D image")
    for output in [args.output] + ([args.transform] if args.transform else []):
        check_not_an_input(output, (args.fixed, args.moving))
    check_volume_output(args.output)
    if args.transform and Path(args.transform).suffix.lower() not in (".tfm", ".txt", ".h5",
                                                                       ".hdf5"):
        raise OutputError(f"transform file must end in .tfm, .txt or .h5, not "
                          f"{Path(args.transform).name}")
    if args.iterations < 1:
        raise InputError(f"--iterations must be at least 1, got {args.iterations}")


REGISTERED_DESCRIPTION = "MedFusion registration (derived image; research use only)"


def run_register(args: argparse.Namespace) -> int:
    """Register, then write the aligned volume and the transform; report the residual check."""
    from medfusion import registration
    from medfusion.engine import load_volumes
    from medfusion.io.volumes import copy_metadata, write_volume

    _check_paths(args)
    (fixed, moving), (_, label) = load_volumes([args.fixed, args.moving])
    aligned, transform = registration.register(
        fixed, moving, args.kind, label, initialiser=args.initialiser,
        iterations=args.iterations)
    # (on the fixed grid, so in the fixed volume's space: an MNI template's codes stay)
    copy_metadata(fixed, aligned, description=REGISTERED_DESCRIPTION)
    matrix, _ = registration.transform_matrix(transform)
    logger.info("registered %s (%s): rotation %.1f deg, translation %s mm", label, args.kind,
                registration.rotation_angle_deg(matrix),
                ", ".join(f"{v:.1f}" for v in transform.GetTranslation()[:3]))
    if args.transform:
        registration.write_transform(args.transform, transform)
    try:
        write_volume(args.output, aligned)
    except BaseException:
        if args.transform:
            Path(args.transform).unlink(missing_ok=True)
        raise
    try:
        after = registration.check_alignment(fixed, aligned, label)
        logger.info("after registration: %s", after.message("--kind affine"))
    except registration.MedFusionError as error:  # the check is advice, not a result
        logger.info("alignment check after registration skipped: %s", error)
    logger.info("wrote %s%s", args.output, f" and {args.transform}" if args.transform else "")
    return 0
