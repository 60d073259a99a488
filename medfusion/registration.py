"""Notice misaligned volumes, and align them (rigid or affine) before they are fused.

MedFusion compares volumes in physical space, so two series of one session that are on
different voxel grids are resampled correctly. But the patient may move between series (the
TCGA case in the shared data: T2/FLAIR are off T1 by about 18-23 mm and 5-15 degrees), and then
scanner coordinates alone fuse doubled outlines. This module does two jobs:

- :func:`check_alignment`: a quick rigid registration at low resolution (about 4 mm voxels,
  Mattes mutual information), started from the scanner-space (identity) alignment. It estimates
  how far ``moving`` is off the reference: the mean displacement of the reference's content in
  mm and the rotation in degrees. Above :data:`OFFSET_THRESHOLD_MM` or
  :data:`ROTATION_THRESHOLD_DEG` the report is ``misaligned``.
- :func:`register`: a multi-resolution rigid (then optionally affine) registration with Mattes
  mutual information; returns ``moving`` resampled onto the reference grid and the transform
  (ITK convention: it maps reference points to moving points, which is what ITK's ``.tfm``
  files hold and what Slicer applies to the moving volume).

:func:`align_for_fusion` is the one hook the engine calls for every non-reference input, so
``fuse``, ``batch``, ``pacs fuse`` and the Slicer module all share it. Inputs are never
modified. No overlap, non-convergence and too little content raise one-line
:class:`~medfusion.errors.MedFusionError`\\ s.

The initial alignment is the identity in physical space, with the centre of rotation at the
reference's centre of intensity mass: the inputs of one session share scanner coordinates, so
the identity is the best start, while a MOMENTS start shifts volumes whose fields of view
differ (neck in one, not the other) and a GEOMETRY start aligns box centres, which says
nothing about anatomy. ``initialiser="moments"`` is available for inputs from other sessions.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfusion import geometry
from medfusion.errors import GeometryError, InputError, MedFusionError

logger = logging.getLogger(__name__)

KINDS = ("none", "rigid", "affine")
INITIALISERS = ("identity", "moments", "geometry")
# Thresholds of the check, set from measurement (docs/registration.md, bench_registration.py
# --only false-alarms): on aligned SPM12 template pairs of different contrasts the mutual-
# information optimum lies up to 6.4 mm (EPI <- T2; PET <- T2 5.1 mm) and 2.9 deg (EPI <- T1)
# off the true alignment, so 7 mm is the lowest round offset without a false alarm on the 78
# aligned cases measured, and 4 deg leaves a margin over their largest 2.9 deg because the check
# underestimates rotations (6 deg reads as 4.7); at 3 mm / 3 deg 11 of the 30 template pairs
# would fire (none of those with T1 as the reference).
OFFSET_THRESHOLD_MM = 7.0
ROTATION_THRESHOLD_DEG = 4.0
RELIABLE_OVERLAP = 0.5  # below this overlap the check's estimate is a lower guess (see message)
CHECK_SPACING_MM = 4.0  # voxel size of the quick check
REGISTER_MAX_VOXELS = 2_000_000  # working grid of a full registration (bigger volumes binned)
CHECK_SAMPLES = 20_000  # metric samples per level of the quick check
REGISTER_SAMPLES = 60_000  # metric samples per level of a full registration
MIN_CONTENT_VOXELS = 500  # content voxels needed, at the working resolution
MASK_MARGIN_MM = 16.0  # metric mask: moving foreground dilated this far (see _metric_mask)
MAX_ROTATION_DEG = 60.0  # a result beyond this is a wrong optimum, not a head movement
_SEED = 20240521  # fixed metric sampling: the same inputs give the same answer


@dataclass(frozen=True)
class AlignmentReport:
    """How far ``moving`` is off the reference, as estimated by :func:`check_alignment`.

    ``offset_mm``: mean displacement of the reference's content voxels under the estimated
    transform; ``rotation_deg``: its rotation angle; ``translation_mm``: its translation vector
    (LPS); ``misaligned``: beyond either threshold.
    """

    label: str
    offset_mm: float
    rotation_deg: float
    translation_mm: tuple[float, float, float]
    misaligned: bool
    seconds: float
    information_gain: float = 0.0
    threshold_mm: float = OFFSET_THRESHOLD_MM
    threshold_deg: float = ROTATION_THRESHOLD_DEG
    overlap: float = 1.0  # fraction of the reference's extent that the input's covers

    def message(self, fix: str = "--register rigid") -> str:
        """One line for users; names the option (``fix``) that aligns the input."""
        if not self.misaligned:
            return (f"{self.label} is aligned with the reference (estimated offset "
                    f"{self.offset_mm:.1f} mm, {self.rotation_deg:.1f} deg)")
        # the check is a local fit from the volumes as placed: far apart, it stops short
        estimate = ("estimated" if self.overlap >= RELIABLE_OVERLAP else
                    f"estimated where they overlap, {100 * self.overlap:.0f}% of the "
                    "reference: it may be far larger")
        return (f"warning: {self.label} looks misaligned with the reference by about "
                f"{self.offset_mm:.1f} mm and {self.rotation_deg:.1f} deg ({estimate}; "
                f"threshold {self.threshold_mm:g} mm / {self.threshold_deg:g} deg): fusing it "
                f"as it is doubles outlines; use {fix} to align it first")


@dataclass
class AlignmentOutcome:
    """What :func:`align_for_fusion` did for one input (passed to ``on_alignment``)."""

    label: str
    kind: str
    before: AlignmentReport | None = None  # the check on the input as given
    transform: Any = None  # SimpleITK transform when registered
    after: AlignmentReport | None = None  # the check after registration
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- preparation
def _as_float(image):
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise InputError(f"registration needs 3D volumes, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("registration needs scalar volumes, not colour/vector ones")
    return sitk.Cast(image, sitk.sitkFloat32)


def _binned(image, spacing_mm: float):
    """``image`` as float32 averaged into bins of about ``spacing_mm`` (no change if finer)."""
    import SimpleITK as sitk

    factors = [min(size, max(1, int(round(spacing_mm / s))))  # never wider than the axis
               for s, size in zip(image.GetSpacing(), image.GetSize(), strict=True)]
    image = _as_float(image)
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _working_spacing(image, max_voxels: int) -> float:
    """Isotropic voxel size (mm) at which ``image`` holds at most ``max_voxels`` voxels."""
    extent = np.asarray(image.GetSize(), float) * np.asarray(image.GetSpacing(), float)
    return max(min(image.GetSpacing()), float(np.prod(extent) / max_voxels) ** (1.0 / 3.0))


def foreground(image):
    """Content voxels of ``image`` (a SimpleITK mask, 1 above the Otsu threshold of 128 bins):
    the one rule for what counts as content in the check, the registration and its metric."""
    import SimpleITK as sitk

    return sitk.OtsuThreshold(image, 0, 1, 128)


def _content(image, label: str) -> np.ndarray:
    """(N, 3) physical points of the content voxels (above the Otsu threshold) of ``image``.

    Raises InputError when the volume is constant or holds too little content to register.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise InputError(f"{label} has NaN or infinite voxels; cannot register it")
    low, high = float(array.min()), float(array.max())
    if high - low <= 1e-6 * max(1.0, abs(high)):
        raise InputError(f"{label} is constant ({low:g}); too little content to register")
    mask = sitk.GetArrayFromImage(foreground(image)).astype(bool)
    count = int(mask.sum())
    small_axis = min(image.GetSize())
    if count < MIN_CONTENT_VOXELS or small_axis < 4:
        raise InputError(
            f"{label} has too little content to register ({count} content voxels, "
            f"{small_axis} voxels on its thinnest axis at {max(image.GetSpacing()):.1f} mm)"
        )
    return voxel_points(image, mask)


def voxel_points(image, mask: np.ndarray) -> np.ndarray:
    """(N, 3) physical points (LPS, mm) of the voxels of ``image`` where ``mask`` is true.

    ``mask`` is a boolean array shaped like ``GetArrayFromImage(image)`` (z, y, x); the points
    are where TRE and displacements are averaged, so grids that are flipped or oblique count.
    """
    indices = np.argwhere(mask)[:, ::-1].astype(float)  # (x, y, z) voxel indices
    spacing = np.asarray(image.GetSpacing(), float)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), float)
    return origin + (indices * spacing) @ direction.T


def _subsample(points: np.ndarray, count: int = 20000) -> np.ndarray:
    if len(points) <= count:
        return points
    return points[np.random.default_rng(_SEED).choice(len(points), count, replace=False)]


# --------------------------------------------------------------------------- transforms
def transform_matrix(transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``transform(p) = A @ p + b`` for an Euler, similarity or affine transform."""
    matrix = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), float)
    translation = np.asarray(transform.GetTranslation(), float)
    return matrix, translation + centre - matrix @ centre


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Rotation angle of the rotation nearest to ``matrix`` (polar decomposition), degrees."""
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    cosine = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return math.degrees(math.acos(cosine))


def mean_displacement_mm(transform, points: np.ndarray) -> float:
    """Mean distance that ``transform`` moves ``points`` ((N, 3), mm)."""
    matrix, offset = transform_matrix(transform)
    moved = points @ matrix.T + offset
    return float(np.linalg.norm(moved - points, axis=1).mean())


def target_registration_error_mm(estimated, truth, points: np.ndarray) -> float:
    """Mean distance (mm) between where ``estimated`` and ``truth`` send ``points`` ((N, 3))."""
    a, b = transform_matrix(estimated)
    c, d = transform_matrix(truth)
    return float(np.linalg.norm(points @ a.T + b - (points @ c.T + d), axis=1).mean())


def moved_header(image, transform):
    """A copy of ``image`` whose content sits at ``transform(p)`` for each original point p:
    its origin and direction moved, its voxels untouched (a known misalignment, no resampling)."""
    import SimpleITK as sitk

    moved = sitk.Image(image)
    matrix, offset = transform_matrix(transform)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    moved.SetOrigin(tuple(matrix @ np.asarray(image.GetOrigin(), float) + offset))
    moved.SetDirection(tuple((matrix @ direction).ravel()))
    return moved


def _start_transform(fixed, moving, centre: np.ndarray, initialiser: str):
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(centre))
    if initialiser == "identity":
        return transform
    mode = {"moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
            "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY}[initialiser]
    return sitk.CenteredTransformInitializer(fixed, moving, transform, mode)


# --------------------------------------------------------------------------- optimisation
@dataclass
class _Run:
    stop: str = ""
    last_level_iterations: int = 0
    metric: float = float("nan")


def _metric_mask(image):
    """Otsu foreground of ``image`` dilated by :data:`MASK_MARGIN_MM`: where metric samples of
    the moving volume count.

    Why a mask, and why a wide one (measured, docs/registration.md): without a mask a volume
    with a cropped field of view (upper 60 % of the SPM12 EPI) registers 18 mm off; with the
    old margin of 2 voxels the optimum of the unmoved SPM12 T1/T2/PD pairs (same 152
    subjects) lies 0.94-1.05 mm off identity, with 16 mm 0.73-0.88 mm; 30 mm or more fails on
    the cropped EPI again, and 20 mm on a noisy T1 against itself (the mask then reaches the
    edge of the volume, and mutual information grows as noise samples leave the overlap).
    The margin keeps the head's outline against the air in the metric.
    """
    import SimpleITK as sitk

    radius = [max(1, int(math.ceil(MASK_MARGIN_MM / s))) for s in image.GetSpacing()]
    return sitk.BinaryDilate(foreground(image), radius)


def _optimise(fixed, moving, transform, label: str, shrink: list[int], sigmas: list[float],
              iterations: int, samples: int, step_mm: float, min_step_mm: float = 0.01,
              bins: int = 32, require_convergence: bool = True, hint: str = "") -> _Run:
    """Run one ImageRegistrationMethod in place on ``transform``; map ITK failures to errors.

    About ``samples`` random metric samples per level (whatever the level's voxel count), so
    the time per iteration does not grow with the volume. ``hint`` ends the message of a run
    that did not converge (the option that avoids this registration, where there is one: the
    alignment check's own run is advice only and names none).
    """
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = float(np.prod(fixed.GetSize()))
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, samples * f ** 3 / voxels) for f in shrink], _SEED)
    method.SetMetricMovingMask(_metric_mask(moving))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step_mm, minStep=min_step_mm, numberOfIterations=iterations,
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    run = _Run()
    counter = {"level": -1, "iterations": 0}

    def on_level() -> None:
        counter["level"] += 1
        counter["iterations"] = 0

    def on_iteration() -> None:
        counter["iterations"] += 1

    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)
    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        with _signals_stop(method):
            method.Execute(fixed, moving)
    except RuntimeError as error:
        text = str(error)
        if "outside" in text or "samples" in text.lower():
            raise GeometryError(
                f"{label} and the reference do not overlap enough to register them "
                "(too few shared samples); are they the same anatomy?"
            ) from None
        raise GeometryError(f"registration of {label} failed: {text.strip().splitlines()[-1]}"
                            ) from None
    run.stop = method.GetOptimizerStopConditionDescription()
    run.last_level_iterations = counter["iterations"]
    run.metric = method.GetMetricValue()
    if require_convergence and run.last_level_iterations >= iterations:
        raise GeometryError(
            f"registration of {label} did not converge in {iterations} iterations; the inputs "
            f"may be too far apart or too different{hint}"
        )
    return run


@contextmanager
def _signals_stop(method: Any) -> Iterator[None]:
    """While ``method`` (an ITK registration) runs, Ctrl-C and SIGTERM stop it instead of
    raising inside its Python callbacks, and are delivered again once it has returned.

    Why: SimpleITK calls the iteration callbacks from C++; an exception raised there (Python's
    KeyboardInterrupt lands in the first Python code that runs) becomes an ordinary ITK error,
    which the alignment check would report as a failed registration and carry on: a cancelled
    run that succeeds. Only the main thread can set signal handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: object) -> None:  # noqa: ARG001
        if previous.get(signum) is signal.SIG_IGN:  # (.get: a signal while handlers are set)
            return
        caught.append(signum)
        method.StopRegistration()

    def stop_if_signalled() -> None:  # (a stop ends one resolution level only)
        if caught:
            method.StopRegistration()

    import SimpleITK as sitk

    method.AddCommand(sitk.sitkIterationEvent, stop_if_signalled)
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        signal.raise_signal(caught[0])  # the restored handler raises (KeyboardInterrupt, ...)
        raise KeyboardInterrupt  # (a handler that returned: still no result to use)


def mutual_information(fixed, moving, transform, bins: int = 32) -> float:
    """Mattes mutual information (nats, higher is better) of ``moving`` through ``transform``
    on every voxel of ``fixed`` that maps inside the metric mask of ``moving``."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetMetricMovingMask(_metric_mask(moving))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return -float(method.MetricEvaluate(fixed, moving))


def _check_plausible(transform, label: str) -> None:
    matrix, _ = transform_matrix(transform)
    angle = rotation_angle_deg(matrix)
    scales = np.linalg.svd(matrix, compute_uv=False)
    if angle > MAX_ROTATION_DEG or scales.max() > 2.0 or scales.min() < 0.5:
        raise GeometryError(
            f"registration of {label} did not converge to a plausible alignment "
            f"(rotation {angle:.0f} deg, scales {scales.min():.2f}..{scales.max():.2f})"
        )


def _check_overlap(reference, moving, label: str) -> None:
    if geometry.overlap_fraction(reference, moving) <= 1e-3:
        raise GeometryError(
            f"{label} does not overlap the reference in physical space; nothing to register "
            "(are they the same patient and session?)"
        )


# --------------------------------------------------------------------------- public API
def check_alignment(reference, moving, label: str = "input") -> AlignmentReport:
    """Estimate how far ``moving`` is off ``reference`` (quick low-resolution rigid fit).

    Both are ``SimpleITK.Image``\\ s on any grids; they are compared in physical space, never
    modified. Takes well under a second for brain volumes on one CPU core.
    """
    started = time.perf_counter()
    _check_overlap(reference, moving, label)
    fixed = _binned(reference, CHECK_SPACING_MM)
    mobile = _binned(moving, CHECK_SPACING_MM)
    points = _subsample(_content(fixed, "the reference"))
    _content(mobile, label)
    transform = _start_transform(fixed, mobile, points.mean(axis=0), "identity")
    at_start = mutual_information(fixed, mobile, transform)
    _optimise(fixed, mobile, transform, label, shrink=[2, 1], sigmas=[1.0, 0.0],
              iterations=200, samples=CHECK_SAMPLES, step_mm=4.0, min_step_mm=0.1)
    _check_plausible(transform, label)
    gain = mutual_information(fixed, mobile, transform) / max(at_start, 1e-9) - 1.0
    offset = mean_displacement_mm(transform, points)
    matrix, translation = transform_matrix(transform)
    angle = rotation_angle_deg(matrix)
    return AlignmentReport(
        label=label, offset_mm=offset, rotation_deg=angle,
        translation_mm=tuple(float(v) for v in transform.GetTranslation()),
        misaligned=offset > OFFSET_THRESHOLD_MM or angle > ROTATION_THRESHOLD_DEG,
        seconds=time.perf_counter() - started, information_gain=gain,
        overlap=geometry.overlap_fraction(reference, moving),
    )


def estimate_transform(reference, moving, kind: str = "rigid", label: str = "input",
                       initialiser: str = "identity", iterations: int = 300):
    """The transform (reference points -> moving points) that aligns ``moving`` to ``reference``.

    ``kind``: ``rigid`` (Euler3D) or ``affine`` (rigid first, then a 12-parameter affine).
    Each volume is first binned to a working grid of about :data:`REGISTER_MAX_VOXELS` (see
    :func:`_working_spacing`; axes already coarser are kept), so big volumes stay fast.
    """
    import SimpleITK as sitk

    if kind not in ("rigid", "affine"):
        raise InputError(f"registration kind must be rigid or affine, not {kind!r}")
    if initialiser not in INITIALISERS:
        raise InputError(f"initialiser must be one of {', '.join(INITIALISERS)}")
    _check_overlap(reference, moving, label)
    fixed = _binned(reference, _working_spacing(reference, REGISTER_MAX_VOXELS))
    mobile = _binned(moving, _working_spacing(moving, REGISTER_MAX_VOXELS))
    points = _content(fixed, "the reference")
    _content(mobile, label)
    centre = points.mean(axis=0)
    transform = _start_transform(fixed, mobile, centre, initialiser)
    _pyramid(fixed, mobile, transform, label, iterations, step_mm=4.0, levels=3)
    _check_plausible(transform, label)
    if kind == "rigid":
        return transform
    affine = sitk.AffineTransform(3)
    affine.SetCenter(transform.GetCenter())
    affine.SetMatrix(transform.GetMatrix())
    affine.SetTranslation(transform.GetTranslation())
    _pyramid(fixed, mobile, affine, label, iterations, step_mm=1.0, levels=2)
    _check_plausible(affine, label)
    return affine


def _pyramid(fixed, moving, transform, label: str, iterations: int, step_mm: float,
             levels: int) -> None:
    """Multi-resolution optimisation with per-axis binning: levels at about 8 mm, 4 mm and the
    working grid's own voxels, each axis binned only where it is finer than the level (a
    5.5 mm slice axis is never shrunk to 22 mm, as isotropic shrink factors would do)."""
    finest = min(fixed.GetSpacing())
    spacings = [s for s in (8.0, 4.0) if s > 1.5 * finest] + [finest]
    spacings = spacings[-levels:]
    for number, spacing in enumerate(spacings):
        last = number == len(spacings) - 1
        _optimise(_binned(fixed, spacing), _binned(moving, spacing), transform, label, [1],
                  [0.0], iterations, samples=REGISTER_SAMPLES,
                  step_mm=step_mm / (2 ** number), require_convergence=last,
                  hint=" (fuse with --register none, the default, to skip it)")


def resample_onto(reference, moving, transform):
    """``moving`` resampled onto the reference grid through ``transform`` (float32, linear;
    outside the moving volume: its minimum, i.e. its background). Keeps the reference's
    metadata dictionary out: the result is the moving series' content."""
    import SimpleITK as sitk

    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(moving)
    return sitk.Resample(moving, reference, transform, sitk.sitkLinear,
                         statistics.GetMinimum(), sitk.sitkFloat32)


def register(reference, moving, kind: str = "rigid", label: str = "input",
             initialiser: str = "identity", iterations: int = 300):
    """Align ``moving`` to ``reference``: return ``(resampled, transform)``.

    ``resampled`` is float32 on the reference grid; ``transform`` maps reference points to
    moving points (ITK convention, write it with :func:`write_transform`). Inputs are unchanged.
    """
    transform = estimate_transform(reference, moving, kind, label, initialiser, iterations)
    return resample_onto(reference, moving, transform), transform


def write_transform(path, transform) -> None:
    """Write an ITK transform file (``.tfm``, ``.txt`` or ``.h5``) atomically."""
    from pathlib import Path

    import SimpleITK as sitk

    from medfusion.errors import OutputError
    from medfusion.io.atomic import atomic_output
    from medfusion.io.formats import short_write_cause

    if Path(path).suffix.lower() not in (".tfm", ".txt", ".h5", ".hdf5"):
        raise OutputError(f"transform file must end in .tfm, .txt or .h5, not {Path(path).name}")

    def verify(written: Path) -> None:
        """Read the file back: ITK's writer says nothing when the disk fills mid-file, and a
        cut transform file was kept as if whole."""
        try:
            back = sitk.ReadTransform(str(written))
            whole = (np.allclose(back.GetParameters(), transform.GetParameters())
                     and np.allclose(back.GetFixedParameters(), transform.GetFixedParameters()))
        except RuntimeError:
            whole = False
        if not whole:
            cause = short_write_cause(written) or "it reads back cut short or different"
            raise OutputError(f"cannot write {Path(path).name}: {cause}; nothing saved")

    with atomic_output(path, verify=verify) as temporary:
        sitk.WriteTransform(transform, str(temporary))


def align_for_fusion(reference, moving, label: str = "input", kind: str = "none",
                     check: bool = True,
                     on_alignment: Callable[[AlignmentOutcome], None] | None = None,
                     fix_hint: str = "--register rigid"):
    """The engine's hook for each non-reference input: check, register if asked, resample.

    ``kind`` ``none``: the input stays in scanner space (resampled onto the reference grid when
    needed); with ``check`` a misalignment is logged as a warning naming ``fix_hint``.
    ``rigid``/``affine``: registered and resampled onto the reference grid; the check then runs
    on the result to confirm it. ``on_alignment`` receives an :class:`AlignmentOutcome`.
    """
    if kind not in KINDS:
        raise InputError(f"--register must be one of {', '.join(KINDS)}, not {kind!r}")
    outcome = AlignmentOutcome(label=label, kind=kind)
    if kind == "none":
        if check:
            try:
                outcome.before = check_alignment(reference, moving, label)
            except (MedFusionError, RuntimeError) as error:  # advice only: never fails a fusion
                logger.info("alignment check of %s skipped: %s", label, str(error).strip()
                            .splitlines()[-1] if str(error).strip() else error)
            if outcome.before is not None and outcome.before.misaligned:
                outcome.warnings.append(outcome.before.message(fix_hint))
                logger.warning("%s", outcome.warnings[-1])
        aligned = geometry.align_to_reference(reference, moving, label)
    else:
        started = time.perf_counter()
        aligned, outcome.transform = register(reference, moving, kind, label)
        matrix, _ = transform_matrix(outcome.transform)
        logger.info("registered %s (%s) in %.1f s: rotation %.1f deg, translation %s mm",
                    label, kind, time.perf_counter() - started, rotation_angle_deg(matrix),
                    ", ".join(f"{v:.1f}" for v in outcome.transform.GetTranslation()[:3]))
        if check:
            try:
                outcome.after = check_alignment(reference, aligned, label)
            except (MedFusionError, RuntimeError) as error:
                logger.info("alignment check of registered %s skipped: %s", label, error)
            if outcome.after is not None and outcome.after.misaligned:
                outcome.warnings.append(outcome.after.message("--register affine"))
                logger.warning("%s (after %s registration)", outcome.warnings[-1], kind)
    if on_alignment is not None:
        on_alignment(outcome)
    return aligned
