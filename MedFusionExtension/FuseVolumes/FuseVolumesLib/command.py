"""The ``medfusion fuse`` command line for one fusion request.

The module never fuses in Slicer's own process: it runs the core's command line in a background
Python process, so the GUI stays responsive and a cancel is a process signal. This file only
turns the panel's choices into that command's arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

METHODS: tuple[str, ...] = ("cnn", "sesf", "gff", "laplacian", "average", "max")
AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
# methods that run a MONAI bundle: they take a block exponent
LEARNED_METHODS: tuple[str, ...] = ("cnn", "sesf")
# the block size exponent i of cnn and sesf (blocks of 2^i x 2^i pixels); "default": the bundle's
BLOCK_EXPONENTS: tuple[str, ...] = ("default", "0", "1", "2", "3", "4", "5", "6")
REGISTER_KINDS: tuple[str, ...] = ("none", "rigid", "affine")
MIN_INPUTS = 2
MAX_INPUTS = 4


@dataclass(frozen=True)
class FuseRequest:
    """What to fuse and how: the panel's parameters as file paths and plain values.

    ``block_exponent`` of None and ``batch_size`` of 0 mean "the core's default"; ``bundle_dir``
    of None means the shipped bundle. ``block_exponent`` matters for the learned methods
    (:data:`LEARNED_METHODS`: ``cnn`` and ``sesf``), ``bundle_dir`` (a cnn bundle) for ``cnn``.
    """

    reference: Path
    others: Sequence[Path]
    output: Path
    metrics: Path | None = None
    method: str = "cnn"
    bundle_dir: Path | None = None
    block_exponent: int | None = None
    axis: str = "axial"
    device: str = "auto"
    batch_size: int = 0
    decision_map: Path | None = None  # sesf: where the CLI writes its label volume
    extra_args: Sequence[str] = field(default_factory=tuple)
    register: str = "none"  # none | rigid | affine: align the others to the reference first
    transforms_dir: Path | None = None  # where the registration transforms are written

    def validate(self) -> None:
        """Raise ``ValueError`` with a user-facing message when the request cannot run."""
        count = 1 + len(self.others)
        if not self.others:
            raise ValueError("Select a reference volume and at least one other volume to fuse.")
        if count > MAX_INPUTS:
            raise ValueError(f"At most {MAX_INPUTS} volumes can be fused at once ({count} given).")
        if self.method not in METHODS:
            raise ValueError(f"Unknown fusion method {self.method!r}; choose one of {METHODS}.")
        if self.axis not in AXES:
            raise ValueError(f"Unknown slice axis {self.axis!r}; choose one of {AXES}.")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ValueError(f"Unknown device {self.device!r}; choose auto, cpu or cuda.")
        if self.block_exponent is not None and str(self.block_exponent) not in BLOCK_EXPONENTS:
            raise ValueError(f"Block exponent must be one of 0..6, got {self.block_exponent!r}.")
        if self.register not in REGISTER_KINDS:
            raise ValueError(f"Unknown registration {self.register!r}; choose {REGISTER_KINDS}.")
        if self.batch_size < 0:
            raise ValueError("Batch size must be positive (0: default).")
        paths = [Path(self.reference), *map(Path, self.others)]
        inputs = {p.resolve() for p in paths}
        if len(inputs) != len(paths):
            raise ValueError("The same volume is selected twice; pick different volumes.")
        # The runner stages the output and metrics, so the core cannot see these clashes.
        outputs = [Path(p) for p in (self.output, self.metrics, self.decision_map) if p]
        for output in outputs:
            if output.resolve() in inputs:
                raise ValueError(f"The output {output.name} would overwrite an input volume; "
                                 "choose another name.")
        if len({p.resolve() for p in outputs}) != len(outputs):
            raise ValueError("Two outputs (fused volume, metrics, decision map) have one name; "
                             "choose different names.")


def build_fuse_command(request: FuseRequest, python: str | None = None) -> list[str]:
    """Return the argument list of ``python -m medfusion fuse ... --progress json``.

    ``python`` is the interpreter that has MedFusion installed (in Slicer: ``PythonSlicer``).
    """
    request.validate()
    command = [python or sys.executable, "-m", "medfusion", "fuse"]
    command += [str(request.reference), *(str(p) for p in request.others)]
    command += ["-o", str(request.output), "--method", request.method]
    if request.method == "cnn" and request.bundle_dir is not None:
        command += ["--bundle", str(request.bundle_dir)]
    if request.method in LEARNED_METHODS:
        if request.block_exponent is not None:
            command += ["--block-exponent", str(request.block_exponent)]
    command += ["--axis", request.axis, "--device", request.device]
    if request.batch_size:
        command += ["--batch-size", str(request.batch_size)]
    if request.metrics is not None:
        command += ["--metrics", str(request.metrics)]
    if request.register != "none":
        command += ["--register", request.register]
        if request.transforms_dir is not None:
            command += ["--save-transforms", str(request.transforms_dir)]
    if request.decision_map is not None:
        command += ["--save-decision-map", str(request.decision_map)]
    command += ["--progress", "json", *request.extra_args]
    return command
