"""Registration benchmark: accuracy on known transforms, speed, the real TCGA case, false alarms.

    python Testing/benchmarks/bench_registration.py [--data ../shared/data] [--repeats 3]
        [--panel docs/images/registration_tcga.png] [--skip-large]

Prints markdown tables:

0. **Are the templates aligned?** Each template's mid-sagittal plane (the image registered to
   its own mirror image: same contrast, no cross-contrast bias) against T1's, next to the MI
   optimum of the unmoved pair: independent evidence of a template's own shift along x.
1. **Known rigid transforms.** SPM12 T1 is fixed; T2, PD, PET and SPECT (and EPI) are moved by
   random rigid transforms (translation up to 20 mm, rotation up to 15 deg, seeded). The move
   is applied to the moving volume's header (origin and direction), so no interpolation blurs
   it, after cropping 8 mm off each face of the moving volume (see :func:`cropped`). Two more
   rows, PET-like and SPECT-like, are synthesised from T1 itself (:func:`synthesised`), so
   their truth is exactly the identity, and are moved by the real PET/SPECT rows' transforms.
   TRE: mean distance between the estimated and the true transform over the brain voxels
   (:func:`brain_mask`) and over the head (T1's Otsu foreground). "TRE vs own optimum" (brain):
   against the registration of the unmoved pair, i.e. how well the start position is undone,
   apart from where mutual information puts the optimum for that pair of volumes. Also: what
   the misalignment check estimated, and whether it fired.
2. **Speed.** A 256x256x26 pair (0.9x0.9x5.5 mm, like the TCGA series) and a 512x512x300 pair,
   both built from SPM12 T1/T2 with a known move; ``register`` end to end (estimate + resample).
3. **TCGA-FG-6692.** t2, flair, t1c against t1: the check before, the registration, the check
   after; ``--panel`` draws before/after overlays.
4. **False alarms.** The check on aligned data: every ordered pair of SPM12 templates, and
   synthetic aligned cases (other grids, noise, intensity curves, cropped field of view), with
   the count that fires at the shipped threshold and at candidate ones.
5. **Sensitivity.** Small random moves (<= 3, 5, 8 mm) against T1: how often the check fires.
6. **Metric mask margin.** The unmoved T2/PD optima, a cropped field of view and a noisy T1
   against the margin of the moving volume's metric mask.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medfusion import registration

MODALITIES = ("T2", "PD", "PET", "SPECT", "EPI")


def random_rigid(rng: np.random.Generator, centre: np.ndarray, max_mm: float = 20.0,
                 max_deg: float = 15.0) -> sitk.Euler3DTransform:
    """A rigid transform with a random axis and direction, angle <= max_deg, shift <= max_mm."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.3, 1.0) * max_deg)
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.3, 1.0) * max_mm / np.linalg.norm(shift)
    versor = sitk.VersorRigid3DTransform()
    versor.SetCenter(tuple(centre))
    versor.SetRotation(tuple(axis), angle)
    versor.SetTranslation(tuple(shift))
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(centre))
    euler.SetMatrix(versor.GetMatrix())
    euler.SetTranslation(versor.GetTranslation())
    return euler


def cropped(image: sitk.Image, voxels: int = 4) -> sitk.Image:
    """``image`` (float32) without ``voxels`` slices on each face (8 mm for the templates).

    Moving the header of a template that shares the reference's box moves its field of view
    with its content, so the box faces line up exactly at the true transform and reward it
    (no real pair of series has that). Cropped, the moving field of view ends 8 mm inside the
    reference's at the truth, as series of other extents do; the cut neck stays a cut, as in a
    scan (zero padding instead would add an edge no scanner makes).
    """
    size = np.asarray(image.GetSize())
    return sitk.Cast(image, sitk.sitkFloat32)[voxels:int(size[0]) - voxels,
                                              voxels:int(size[1]) - voxels,
                                              voxels:int(size[2]) - voxels]


def compose(outer, inner):
    """The transform p -> outer(inner(p)) as an affine transform."""
    a, b = registration.transform_matrix(outer)
    c, d = registration.transform_matrix(inner)
    result = sitk.AffineTransform(3)
    result.SetMatrix(tuple((a @ c).ravel()))
    result.SetTranslation(tuple(a @ d + b))
    return result


def content_points(image) -> np.ndarray:
    return registration._content(sitk.Cast(image, sitk.sitkFloat32), "fixed")


BRAIN_UPTAKE_FRACTION = 0.4  # of the PET template's maximum: brain above, scalp and face below


def brain_mask(spm: Path) -> np.ndarray:
    """Brain voxels of SPM12 T1 space (z, y, x boolean array on T1's grid): where the PET
    template's uptake is at least :data:`BRAIN_UPTAKE_FRACTION` of its maximum, the largest
    connected component, holes (the ventricles) filled.

    Why PET and not T1: the T1 template averages 152 heads and is so smooth that its skull is a
    shallow dip (about 0.32 between scalp 0.40 and grey matter 0.5-0.6), so no T1 threshold or
    erosion parts brain from scalp (Otsu, eroded 2-6 mm, largest component, dilated back:
    3.2-3.5 l, the whole head). The PET template (15O-water, i.e. perfusion) is high in grey
    matter, about half that in white matter and at most 0.25 in scalp and muscle, so 40 % puts
    the edge at T1's skull minimum; face and neck uptake are separate components. The mask is
    2.1 l and reaches down the brainstem. PET sits about 1.5 mm off T1 along x; that moves the
    mask's edge, and a rigid residual's error field changes across 1.5 mm by at most 1.5 mm
    times its angle (< 0.03 mm below 1 deg), so the brain TRE does not depend on it.
    """
    pet = sitk.ReadImage(str(spm / "PET.nii"))
    maximum = float(sitk.GetArrayViewFromImage(pet).max())
    mask = sitk.BinaryThreshold(pet, BRAIN_UPTAKE_FRACTION * maximum, math.inf, 1, 0)
    mask = sitk.BinaryFillhole(sitk.RelabelComponent(sitk.ConnectedComponent(mask)) == 1)
    return sitk.GetArrayFromImage(mask).astype(bool)


BACKGROUND, OTHER_TISSUE, CSF, GREY, WHITE = range(5)


def tissue_classes(fixed: sitk.Image, brain: np.ndarray) -> np.ndarray:
    """T1 voxels as background, other tissue (head outside the brain), CSF, grey, white matter.

    Head: T1's Otsu foreground with holes filled (the registration's own content threshold);
    inside the brain mask two Otsu thresholds of the brain's T1 values (128 bins) split CSF,
    grey and white matter (23 %, 38 % and 39 % of the brain on the SPM12 T1).
    """
    head = sitk.GetArrayFromImage(sitk.BinaryFillhole(registration.foreground(
        sitk.Cast(fixed, sitk.sitkFloat32)))).astype(bool)
    values = sitk.GetArrayViewFromImage(fixed)
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.SetNumberOfHistogramBins(128)
    otsu.Execute(sitk.GetImageFromArray(values[brain].astype(np.float32).reshape(1, -1)))
    low, high = otsu.GetThresholds()
    classes = np.where(head, OTHER_TISSUE, BACKGROUND).astype(np.uint8)
    classes[brain] = np.select([values[brain] < low, values[brain] < high], [CSF, GREY], WHITE)
    return classes


@dataclass(frozen=True)
class Uptake:
    """A tracer model for a volume synthesised from T1 (so its truth is exactly the identity).

    ``ratios``: uptake of background, other tissue, CSF, grey and white matter; ``fwhm_mm``: the
    scanner's resolution; ``noise``: Gaussian noise per voxel, as a fraction of grey matter's
    uptake; ``voxel_mm``: the isotropic grid it is written on; ``flip_x``: that grid's x axis
    reversed (as the SPM12 SPECT template's is).
    """

    ratios: tuple[float, float, float, float, float]
    fwhm_mm: float
    noise: float
    voxel_mm: float
    flip_x: bool = False


# FDG-like PET: white matter about a third of grey, 7 mm FWHM, 3 mm voxels; HMPAO-like SPECT:
# white matter about 0.6 of grey, 14 mm FWHM, 4 mm voxels on an x-flipped grid. Each is moved
# by the transforms of the real row named first.
SYNTHETIC = {
    "PET-like": ("PET", Uptake((0.0, 0.15, 0.05, 1.0, 0.35), 7.0, 0.03, 3.0)),
    "SPECT-like": ("SPECT", Uptake((0.0, 0.2, 0.1, 1.0, 0.6), 14.0, 0.05, 4.0, flip_x=True)),
}


def synthesised(fixed: sitk.Image, classes: np.ndarray, model: Uptake,
                rng: np.random.Generator) -> sitk.Image:
    """A PET- or SPECT-like volume of ``fixed``'s anatomy: uptake by tissue class, blurred to
    the model's FWHM, resampled (identity, linear) onto an isotropic grid whose box is 8 mm
    inside ``fixed``'s on every face (box faces that coincide would reward the truth, see
    :func:`cropped`), plus noise. Aligned with ``fixed`` exactly, by construction."""
    uptake = _from_array(np.asarray(model.ratios, np.float32)[classes], fixed)
    blurred = sitk.SmoothingRecursiveGaussian(uptake, model.fwhm_mm / math.sqrt(8 * math.log(2)))
    low, high = registration.geometry.physical_bounds(fixed)
    low, high = low + 8.0, high - 8.0  # the new box's faces
    size = [int((h - lo) // model.voxel_mm) for lo, h in zip(low, high, strict=True)]
    first = low + model.voxel_mm / 2  # centre of the first voxel
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((model.voxel_mm,) * 3)
    grid.SetOrigin(tuple(first))
    if model.flip_x:
        grid.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        grid.SetOrigin((float(first[0] + (size[0] - 1) * model.voxel_mm), *first[1:]))
    resampled = sitk.Resample(blurred, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)
    array += rng.normal(0.0, model.noise * model.ratios[GREY], array.shape).astype(np.float32)
    return _from_array(array, resampled)


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    sys.stdout.flush()


TRUTHS = {
    "T2": "identity (same 152 subjects as T1)",
    "PD": "identity (same 152 subjects as T1)",
    "PET": "unknown: other subjects (PET midline 1.56 mm off T1's)",
    "SPECT": "unknown: other subjects",
    "EPI": "unknown: other subjects",
    "PET-like": "identity (synthesised from T1)",
    "SPECT-like": "identity (synthesised from T1)",
}


def _mean_max(values: list[float]) -> str:
    return f"{np.mean(values):.2f} (max {np.max(values):.2f})"


def known_transforms(spm: Path, repeats: int, seed: int) -> None:
    """Random known moves of each template, and of PET-/SPECT-like volumes synthesised from T1
    (moved by the same transforms as the real PET/SPECT rows), registered to T1."""
    fixed = sitk.ReadImage(str(spm / "T1.nii"))
    points = content_points(fixed)  # head: T1's Otsu foreground
    brain = brain_mask(spm)
    brain_points = registration.voxel_points(fixed, brain)
    centre = points.mean(axis=0)
    rng = np.random.default_rng(seed)
    truths = {name: [random_rigid(rng, centre) for _ in range(repeats)] for name in MODALITIES}
    classes = tissue_classes(fixed, brain)
    noise = np.random.default_rng(seed + 4)
    movings = {name: (name, cropped(sitk.ReadImage(str(spm / f"{name}.nii"))))
               for name in MODALITIES}
    movings.update({name: (real, synthesised(fixed, classes, model, noise))
                    for name, (real, model) in SYNTHETIC.items()})
    rows = []
    for name, (moves_of, moving) in movings.items():
        own = registration.estimate_transform(fixed, moving, "rigid", name)
        tres, tres_brain, tres_own, seconds, checks = [], [], [], [], []
        for truth in truths[moves_of]:
            moved = registration.moved_header(moving, truth)
            started, cpu = time.perf_counter(), time.process_time()
            _, estimated = registration.register(fixed, moved, "rigid", name)
            seconds.append((time.perf_counter() - started, time.process_time() - cpu))
            tres.append(registration.target_registration_error_mm(estimated, truth, points))
            tres_brain.append(registration.target_registration_error_mm(
                estimated, truth, brain_points))
            tres_own.append(registration.target_registration_error_mm(
                estimated, compose(truth, own), brain_points))
            report = registration.check_alignment(fixed, moved, name)
            true_offset = registration.mean_displacement_mm(truth, points)
            checks.append((true_offset, report.offset_mm, report.misaligned))
        rows.append([
            name, TRUTHS[name], str(len(tres)), _mean_max(tres_brain), _mean_max(tres),
            _mean_max(tres_own), f"{registration.mean_displacement_mm(own, brain_points):.2f}",
            f"{np.mean([w for w, _ in seconds]):.1f} / {np.mean([c for _, c in seconds]):.1f}",
            ", ".join(f"{t:.1f}->{e:.1f}" for t, e, _ in checks),
            f"{sum(fired for *_, fired in checks)}/{len(checks)}",
        ])
    print("## Known rigid transforms (SPM12 T1 fixed; <= 20 mm, <= 15 deg)\n")
    voxel_ml = float(np.prod(fixed.GetSpacing())) / 1000.0
    print(f"Brain mask: {brain.sum()} voxels ({brain.sum() * voxel_ml:.0f} ml); head (T1 Otsu): "
          f"{len(points)} voxels. *-like rows move by the same transforms as the real row.\n")
    table(["moving", "truth", "cases", "TRE brain mm, mean (max)", "TRE head mm, mean (max)",
           "brain TRE vs own optimum mm", "own optimum off identity (brain) mm",
           "s / registration (wall / CPU)", "check: true -> estimated offset mm",
           "check fired"], rows)


def _resampled_pair(spm: Path, size: tuple[int, int, int], spacing: tuple[float, float, float],
                    rng: np.random.Generator):
    """T1 and T2 resampled onto a ``size`` grid centred on the templates; T2 then moved."""
    fixed_src = sitk.ReadImage(str(spm / "T1.nii"))
    moving_src = sitk.ReadImage(str(spm / "T2.nii"))
    low, high = registration.geometry.physical_bounds(fixed_src)
    centre = (low + high) / 2
    grid = sitk.Image(list(size), sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(tuple(centre - (np.asarray(size) - 1) * np.asarray(spacing) / 2))
    fixed = sitk.Resample(fixed_src, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    moving = sitk.Resample(moving_src, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    points = registration._subsample(content_points(fixed))  # the fixed volume's own content
    truth = random_rigid(rng, points.mean(axis=0))
    return fixed, registration.moved_header(moving, truth), truth, points


def speed(spm: Path, skip_large: bool, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    cases = [("256x256x26 (0.9x0.9x5.5 mm)", (256, 256, 26), (0.9, 0.9, 5.5))]
    if not skip_large:
        cases.append(("512x512x300 (0.36x0.43x0.61 mm)", (512, 512, 300), (0.36, 0.43, 0.61)))
    rows = []
    for label, size, spacing in cases:
        fixed, moving, truth, points = _resampled_pair(spm, size, spacing, rng)
        started, cpu = time.perf_counter(), time.process_time()
        report = registration.check_alignment(fixed, moving, "T2")
        check_seconds = (time.perf_counter() - started, time.process_time() - cpu)
        started, cpu = time.perf_counter(), time.process_time()
        _, estimated = registration.register(fixed, moving, "rigid", "T2")
        seconds = (time.perf_counter() - started, time.process_time() - cpu)
        rows.append([label, f"{seconds[0]:.1f} / {seconds[1]:.1f}",
                     f"{registration.target_registration_error_mm(estimated, truth, points):.2f}",
                     f"{check_seconds[0]:.1f} / {check_seconds[1]:.1f}",
                     f"{registration.mean_displacement_mm(truth, points):.1f}->"
                     f"{report.offset_mm:.1f}"])
        del fixed, moving
    print("## Speed (SPM12 T1 fixed, T2 moved, resampled onto the grid; rigid)\n")
    table(["pair", "register s, wall / CPU (estimate + resample)", "TRE mm",
           "check s, wall / CPU",
           "check: true -> estimated offset mm"], rows)


def tcga(folder: Path, panel: Path | None) -> None:
    fixed = sitk.ReadImage(str(folder / "t1.nii.gz"))
    rows, pictures = [], []
    for name in ("t2", "flair", "t1c"):
        moving = sitk.ReadImage(str(folder / f"{name}.nii.gz"))
        before = registration.check_alignment(fixed, moving, name)
        started = time.process_time()
        aligned, transform = registration.register(fixed, moving, "rigid", name)
        seconds = time.process_time() - started
        after = registration.check_alignment(fixed, aligned, name)
        matrix, _ = registration.transform_matrix(transform)
        rows.append([name, f"{before.offset_mm:.1f} mm, {before.rotation_deg:.1f} deg",
                     "yes" if before.misaligned else "no",
                     f"{registration.rotation_angle_deg(matrix):.1f} deg, "
                     f"{np.linalg.norm(transform.GetTranslation()):.1f} mm", f"{seconds:.1f}",
                     f"{after.offset_mm:.1f} mm, {after.rotation_deg:.1f} deg",
                     "yes" if after.misaligned else "no"])
        if name in ("t2", "flair"):
            pictures.append((name, registration.resample_onto(fixed, moving, sitk.Transform()),
                             aligned))
    print("## TCGA-FG-6692 (t1 fixed)\n")
    table(["moving", "check before", "fired", "registration (rotation, translation)",
           "CPU s",
           "check after", "fired"], rows)
    if panel is not None:
        draw_panel(fixed, pictures, panel)


def draw_panel(fixed, pictures, path: Path) -> None:
    """Overlays of t1 (magenta) and each moving series (green), before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def unit(image, index):
        array = sitk.GetArrayFromImage(image)[index].astype(float)
        low, high = np.percentile(array, [1, 99.5])
        return np.clip((array - low) / max(high - low, 1e-9), 0, 1)

    index = fixed.GetSize()[2] // 2
    reference = unit(fixed, index)
    figure, axes = plt.subplots(len(pictures), 2, figsize=(8, 4.2 * len(pictures)))
    for row, (name, before, after) in enumerate(pictures):
        for column, (image, title) in enumerate(((before, "before (scanner space)"),
                                                 (after, "after --register rigid"))):
            other = unit(image, index)
            overlay = np.stack([reference, other, reference], axis=-1)
            axis = axes[row, column]
            axis.imshow(overlay, origin="upper")
            axis.set_title(f"t1 (magenta) + {name} (green): {title}", fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)  # ~4x smaller
    print(f"panel written to {path}\n")


CANDIDATES = ((2.0, 2.0), (3.0, 3.0), (4.0, 3.0), (5.0, 3.0), (6.0, 4.0), (7.0, 4.0))


def _fires(estimate: tuple[float, float], mm: float, deg: float) -> bool:
    return estimate[0] > mm or estimate[1] > deg


def false_alarms(spm: Path, seed: int) -> None:
    """The check on aligned data; false-alarm counts at the shipped and candidate thresholds."""
    names = ("T1", "T2", "PD", "PET", "SPECT", "EPI")
    images = {name: sitk.ReadImage(str(spm / f"{name}.nii")) for name in names}
    groups: dict[str, list[tuple[str, tuple[float, float]]]] = {
        "T1 reference, T2/PD/PET/SPECT moving (4)": [],
        "T1 reference, all five (5)": [],
        "all ordered pairs of T1, T2, PD, PET, SPECT (20)": [],
        "all ordered pairs of the six templates (30)": [],
    }
    required = ("T1", "T2", "PD", "PET", "SPECT")
    for reference, moving in itertools.permutations(names, 2):
        report = registration.check_alignment(images[reference], images[moving], moving)
        entry = (f"{reference} <- {moving}", (report.offset_mm, report.rotation_deg))
        groups["all ordered pairs of the six templates (30)"].append(entry)
        if reference in required and moving in required:
            groups["all ordered pairs of T1, T2, PD, PET, SPECT (20)"].append(entry)
        if reference == "T1":
            groups["T1 reference, all five (5)"].append(entry)
            if moving != "EPI":
                groups["T1 reference, T2/PD/PET/SPECT moving (4)"].append(entry)
    rng = np.random.default_rng(seed + 2)
    synthetic = groups.setdefault("synthetic aligned cases (48)", [])
    anisotropic = sitk.Image([256, 256, 26], sitk.sitkFloat32)
    anisotropic.SetSpacing((0.9, 0.9, 5.5))
    low, high = registration.geometry.physical_bounds(images["T1"])
    centre = (low + high) / 2
    anisotropic.SetOrigin(tuple(centre - np.array([255, 255, 25]) * (0.9, 0.9, 5.5) / 2))
    for name in names:
        source = sitk.Cast(images[name], sitk.sitkFloat32)
        array = sitk.GetArrayFromImage(source)
        scale = float(np.percentile(array, 99))
        variants = {
            "other grid (0.9x0.9x5.5 mm)": sitk.Resample(source, anisotropic),
            "noise 5%": _from_array(array + rng.normal(0, 0.05 * scale, array.shape), source),
            "intensity curve": _from_array(np.sqrt(np.clip(array, 0, None)), source),
            "field of view cropped (upper 60%)": source[:, :, int(0.4 * source.GetSize()[2]):],
        }
        for variant, image in variants.items():
            for reference in ("T1", name):
                report = registration.check_alignment(images[reference], image, name)
                synthetic.append((f"{reference} <- {name}, {variant}",
                                  (report.offset_mm, report.rotation_deg)))
    shipped = (registration.OFFSET_THRESHOLD_MM, registration.ROTATION_THRESHOLD_DEG)
    thresholds = [shipped] + [c for c in CANDIDATES if c != shipped]
    rows = []
    for group, entries in groups.items():
        worst_mm = max(entries, key=lambda e: e[1][0])
        worst_deg = max(entries, key=lambda e: e[1][1])
        rows.append([group, f"{worst_mm[1][0]:.2f} ({worst_mm[0]})",
                     f"{worst_deg[1][1]:.2f} ({worst_deg[0]})"]
                    + [f"{sum(_fires(e[1], *t) for e in entries)}/{len(entries)}"
                       for t in thresholds])
    print(f"## False alarms (shipped threshold {shipped[0]:g} mm / {shipped[1]:g} deg)\n")
    table(["aligned data", "largest offset mm (pair)", "largest rotation deg (pair)"]
          + [f"fired at {mm:g} mm / {deg:g} deg" for mm, deg in thresholds], rows)
    alarms = [[name, f"{e[0]:.2f}", f"{e[1]:.2f}"] for group, entries in groups.items()
              if group.startswith(("all ordered pairs of the six", "synthetic"))
              for name, e in entries if _fires(e, *shipped)]
    total = len(groups["all ordered pairs of the six templates (30)"]) + len(synthetic)
    print(f"- false-alarm rate at the shipped threshold: {len(alarms)}/{total} "
          "(30 template pairs + 48 synthetic cases)\n")
    if alarms:
        table(["false alarm", "offset mm", "rotation deg"], alarms)


def sensitivity(spm: Path, seed: int, repeats: int) -> None:
    """Small known moves of T2/PD/PET/SPECT against T1: how often the check fires."""
    fixed = sitk.ReadImage(str(spm / "T1.nii"))
    points = content_points(fixed)
    rng = np.random.default_rng(seed + 3)
    rows = []
    for size_mm, size_deg in ((3.0, 2.0), (5.0, 3.0), (8.0, 5.0)):
        fired = cases = 0
        estimates = []
        for name in ("T2", "PD", "PET", "SPECT"):
            # cropped like the known-move benchmark: an uncropped box moved with its content
            # would line its faces up with the fixed box at the truth and reward it
            moving = cropped(sitk.ReadImage(str(spm / f"{name}.nii")))
            for _ in range(repeats):
                truth = random_rigid(rng, points.mean(axis=0), size_mm, size_deg)
                moved = registration.moved_header(moving, truth)
                report = registration.check_alignment(fixed, moved, name)
                fired += report.misaligned
                cases += 1
                estimates.append(f"{registration.mean_displacement_mm(truth, points):.1f}->"
                                 f"{report.offset_mm:.1f}")
        rows.append([f"<= {size_mm:g} mm, <= {size_deg:g} deg", f"{fired}/{cases}",
                     ", ".join(estimates)])
    print("## Sensitivity of the check (SPM12 T1 fixed; T2, PD, PET, SPECT moved)\n")
    table(["random move", "fired", "true -> estimated offset mm"], rows)


def _mirrored(image: sitk.Image) -> sitk.Image:
    """``image`` mirrored about the plane x = 0 (header only: no resampling)."""
    flip = np.diag([-1.0, 1.0, 1.0])
    mirrored = sitk.Image(image)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    mirrored.SetDirection(tuple((flip @ direction).ravel()))
    mirrored.SetOrigin(tuple(flip @ np.asarray(image.GetOrigin(), float)))
    return mirrored


def midline(image: sitk.Image) -> float:
    """x (mm) of the mid-sagittal plane: where ``image`` matches its own mirror image.

    The same contrast on both sides, so mean squares is the right metric and no cross-contrast
    bias enters: independent evidence of how far a template is shifted along x.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    centre = content_points(image).mean(axis=0)
    transform = sitk.Euler3DTransform()
    transform.SetCenter((0.0, float(centre[1]), float(centre[2])))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 0.002, 400, relaxationFactor=0.5,
                                                    gradientMagnitudeTolerance=1e-12)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(image, _mirrored(image))
    return -transform.GetTranslation()[0] / 2  # symmetric about x = c: shift of -2c


def template_offsets(spm: Path) -> None:
    """Are the templates themselves aligned? Mid-sagittal planes against the MI optima."""
    fixed = sitk.ReadImage(str(spm / "T1.nii"))
    points = content_points(fixed)
    reference = midline(fixed)
    rows = []
    for name in MODALITIES:
        moving = sitk.ReadImage(str(spm / f"{name}.nii"))
        own = registration.estimate_transform(fixed, moving, "rigid", name)
        matrix, offset = registration.transform_matrix(own)
        at_centre = matrix @ points.mean(axis=0) + offset - points.mean(axis=0)
        rows.append([name, f"{midline(moving) - reference:+.2f}", f"{at_centre[0]:+.2f}",
                     f"{at_centre[1]:+.2f}", f"{at_centre[2]:+.2f}",
                     f"{registration.rotation_angle_deg(matrix):.2f}",
                     f"{registration.mean_displacement_mm(own, points):.2f}"])
    print("## Are the templates aligned? (SPM12 T1 fixed, unmoved pairs)\n")
    print(f"T1 mid-sagittal plane at x = {reference:+.2f} mm.\n")
    table(["template", "mid-sagittal plane x minus T1's, mm (mirror, same contrast)",
           "MI optimum x at the centroid mm", "y mm", "z mm", "rotation deg",
           "MI optimum off identity mm"], rows)


def margins(spm: Path, seed: int) -> None:
    """Why the metric mask's margin is what it is: the margin against three measurements."""
    fixed = sitk.ReadImage(str(spm / "T1.nii"))
    points = content_points(fixed)
    t1 = sitk.GetArrayFromImage(fixed).astype(np.float32)
    noisy = [_from_array(t1 + np.random.default_rng(seed + k).normal(
        0, 0.05 * np.percentile(t1, 99), t1.shape), fixed) for k in range(3)]
    epi = sitk.Cast(sitk.ReadImage(str(spm / "EPI.nii")), sitk.sitkFloat32)
    top = epi[:, :, int(0.4 * epi.GetSize()[2]):]
    shipped = registration.MASK_MARGIN_MM
    rows = []
    try:
        for margin in (4.0, 8.0, 16.0, 20.0, 30.0):
            registration.MASK_MARGIN_MM = margin
            own = [registration.mean_displacement_mm(registration.estimate_transform(
                fixed, sitk.ReadImage(str(spm / f"{name}.nii")), "rigid", name), points)
                for name in ("T2", "PD")]
            full = registration.estimate_transform(fixed, epi, "rigid", "EPI")
            part = registration.estimate_transform(fixed, top, "rigid", "EPI top")
            noise_offsets = [registration.check_alignment(fixed, image, "noisy T1").offset_mm
                             for image in noisy]
            rows.append([f"{margin:g}" + (" (shipped)" if margin == shipped else ""),
                         f"{own[0]:.2f} / {own[1]:.2f}",
                         f"{registration.target_registration_error_mm(part, full, points):.2f}",
                         f"{registration.check_alignment(fixed, top, 'EPI top').offset_mm:.2f}",
                         f"{max(noise_offsets):.2f}"])
    finally:
        registration.MASK_MARGIN_MM = shipped
    print("## Metric mask margin (SPM12, T1 fixed)\n")
    table(["margin mm", "T2 / PD optimum off identity mm (truth: identity)",
           "EPI upper 60 % vs whole EPI, registered, mm", "check on EPI upper 60 % mm",
           "check on T1 + 5 % noise, worst of 3 seeds, mm"], rows)


def _from_array(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(like)
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared"
                                              / "data"))
    parser.add_argument("--repeats", type=int, default=3, help="random moves per modality")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--panel", type=Path, help="write the TCGA before/after panel here")
    parser.add_argument("--skip-large", action="store_true", help="skip the 512x512x300 pair")
    parser.add_argument("--only", choices=("templates", "known", "speed", "tcga",
                                           "false-alarms", "sensitivity", "margins"),
                        action="append", help="run only these parts")
    args = parser.parse_args()
    data = Path(args.data)
    spm = data / "volumes" / "spm12"
    parts = args.only or ["templates", "known", "speed", "tcga", "false-alarms", "sensitivity",
                          "margins"]
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    print(f"SimpleITK {sitk.Version.VersionString()}, {threads} ITK threads\n")
    if "templates" in parts:
        template_offsets(spm)
    if "known" in parts:
        known_transforms(spm, args.repeats, args.seed)
    if "speed" in parts:
        speed(spm, args.skip_large, args.seed)
    if "tcga" in parts:
        tcga(data / "volumes" / "tcga-fg-6692", args.panel)
    if "false-alarms" in parts:
        false_alarms(spm, args.seed)
    if "sensitivity" in parts:
        sensitivity(spm, args.seed, args.repeats)
    if "margins" in parts:
        margins(spm, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
