"""Misalignment check and registration (medfusion.registration, medfusion register, --register).

Real data: SPM12 templates (aligned, SPECT on a flipped grid) and the TCGA-FG-6692 series (t2
and flair are off t1 by many mm and degrees). Volumes are binned where the assertion allows it,
so the file runs in well under a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion import registration
from medfusion.cli import main
from medfusion.errors import GeometryError, InputError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tcga_small(tcga: Path, tmp_path_factory) -> Path:
    """t1 and flair of TCGA-FG-6692 binned 2x2 in-plane (1.8x1.8x5.5 mm), as files."""
    folder = tmp_path_factory.mktemp("tcga-small")
    for name in ("t1", "flair"):
        image = sitk.ReadImage(str(tcga / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.BinShrink(image, [2, 2, 1]), str(folder / f"{name}.nii.gz"))
    return folder


def test_check_is_silent_on_aligned_templates_including_flipped_spect(spm12: Path) -> None:
    reference = sitk.ReadImage(str(spm12 / "T1.nii"))
    for name in ("T2", "PET", "SPECT"):
        moving = sitk.ReadImage(str(spm12 / f"{name}.nii"))
        report = registration.check_alignment(reference, moving, name)
        assert not report.misaligned, report.message()
        assert report.offset_mm < registration.OFFSET_THRESHOLD_MM / 2
    spect = sitk.ReadImage(str(spm12 / "SPECT.nii"))
    assert spect.GetDirection()[0] == -1.0  # the flipped grid really is flipped


def test_check_fires_on_real_tcga_misalignment_with_estimate(tcga_small: Path) -> None:
    reference = sitk.ReadImage(str(tcga_small / "t1.nii.gz"))
    moving = sitk.ReadImage(str(tcga_small / "flair.nii.gz"))
    report = registration.check_alignment(reference, moving, "flair.nii.gz")
    assert report.misaligned
    assert 12.0 < report.offset_mm < 24.0  # about 18 mm and 5 degrees
    assert 2.5 < report.rotation_deg < 8.0
    message = report.message()
    assert "misaligned" in message and "--register rigid" in message and "mm" in message


def test_check_detects_a_known_move_and_its_size(spm12: Path) -> None:
    reference = sitk.ReadImage(str(spm12 / "T1.nii"))
    shift = sitk.Euler3DTransform()
    shift.SetTranslation((12.0, -5.0, 4.0))
    moved = registration.moved_header(sitk.ReadImage(str(spm12 / "T2.nii")), shift)
    report = registration.check_alignment(reference, moved, "T2")
    assert report.misaligned
    assert abs(report.offset_mm - math.dist((0, 0, 0), (12, -5, 4))) < 2.0


def test_check_fires_just_above_its_thresholds_and_not_below(spm12: Path) -> None:
    """A real aligned pair and a move 3 mm under the offset threshold stay silent; moves just
    over either threshold fire."""
    reference = sitk.ReadImage(str(spm12 / "T1.nii"))
    moving = sitk.ReadImage(str(spm12 / "PD.nii"))
    aligned = registration.check_alignment(reference, moving, "PD")
    assert not aligned.misaligned and aligned.offset_mm < 1.5, aligned.message()
    centre = registration._content(sitk.Cast(reference, sitk.sitkFloat32), "T1").mean(axis=0)
    below = sitk.Euler3DTransform()
    small = (registration.OFFSET_THRESHOLD_MM - 3.0) / math.sqrt(3.0)
    below.SetTranslation((small, -small, small))
    report = registration.check_alignment(reference, registration.moved_header(moving, below), "PD")
    assert not report.misaligned, report.message()
    shift = sitk.Euler3DTransform()
    step = (registration.OFFSET_THRESHOLD_MM + 2.0) / math.sqrt(3.0)
    shift.SetTranslation((step, -step, step))
    report = registration.check_alignment(reference, registration.moved_header(moving, shift), "PD")
    assert report.misaligned and report.offset_mm > registration.OFFSET_THRESHOLD_MM
    turn = sitk.Euler3DTransform()
    turn.SetCenter(tuple(centre))
    turn.SetRotation(0.0, 0.0, math.radians(registration.ROTATION_THRESHOLD_DEG + 2.0))
    report = registration.check_alignment(reference, registration.moved_header(moving, turn), "PD")
    assert report.misaligned and report.rotation_deg > registration.ROTATION_THRESHOLD_DEG


def test_check_is_silent_on_noisy_and_cropped_aligned_volumes(spm12: Path) -> None:
    """Background noise and a cropped field of view are no misalignment (the metric mask's
    margin is chosen for both: docs/registration.md)."""
    reference = sitk.ReadImage(str(spm12 / "T1.nii"))
    array = sitk.GetArrayFromImage(reference).astype(np.float32)
    noise = np.random.default_rng(16).normal(0, 0.05 * np.percentile(array, 99), array.shape)
    noisy = sitk.GetImageFromArray((array + noise).astype(np.float32))
    noisy.CopyInformation(reference)
    report = registration.check_alignment(reference, noisy, "noisy T1")
    assert not report.misaligned and report.offset_mm < 1.0, report.message()
    epi = sitk.ReadImage(str(spm12 / "EPI.nii"))
    cropped = epi[:, :, int(0.4 * epi.GetSize()[2]):]
    report = registration.check_alignment(reference, cropped, "cropped EPI")
    assert not report.misaligned and report.offset_mm < 4.0, report.message()


def test_rigid_registration_recovers_a_known_transform(spm12: Path) -> None:
    fixed = sitk.ReadImage(str(spm12 / "T1.nii"))
    moving = sitk.ReadImage(str(spm12 / "T2.nii"))
    points = registration._content(sitk.Cast(fixed, sitk.sitkFloat32), "T1")
    truth = sitk.Euler3DTransform()
    truth.SetCenter(tuple(points.mean(axis=0)))
    truth.SetRotation(math.radians(6), math.radians(-4), math.radians(9))
    truth.SetTranslation((11.0, -8.0, 6.0))
    before = sitk.GetArrayFromImage(moving).copy()
    moved = registration.moved_header(moving, truth)
    aligned, estimated = registration.register(fixed, moved, "rigid")
    tre = registration.target_registration_error_mm(estimated, truth, points)
    assert tre < 1.0, tre  # T1/T2 come from the same subjects: the truth is known here
    assert aligned.GetSize() == fixed.GetSize() and aligned.GetOrigin() == fixed.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(moving), before)  # input untouched


def test_register_cli_writes_volume_and_slicer_readable_transform(
    tcga_small: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    fixed, moving = tcga_small / "t1.nii.gz", tcga_small / "flair.nii.gz"
    digests = [_digest(fixed), _digest(moving)]
    out, tfm = tmp_path / "flair_on_t1.nii.gz", tmp_path / "flair.tfm"
    assert main(["register", str(fixed), str(moving), "-o", str(out), "--transform",
                 str(tfm)]) == 0
    assert [_digest(fixed), _digest(moving)] == digests
    aligned = sitk.ReadImage(str(out))
    reference = sitk.ReadImage(str(fixed))
    assert aligned.GetSize() == reference.GetSize()
    assert np.allclose(aligned.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    transform = sitk.ReadTransform(str(tfm))
    assert "Euler3DTransform" in tfm.read_text()
    matrix, _ = registration.transform_matrix(
        sitk.Euler3DTransform(transform) if transform.GetName() != "Euler3DTransform"
        else transform)
    assert 2.5 < registration.rotation_angle_deg(matrix) < 8.0
    after = registration.check_alignment(reference, aligned, "flair")
    assert not after.misaligned and after.offset_mm < 2.0
    assert "aligned with the reference" in caplog.text


def test_fuse_warns_then_register_aligns_and_saves_transform(
    tcga_small: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    fixed, moving = str(tcga_small / "t1.nii.gz"), str(tcga_small / "flair.nii.gz")
    assert main(["fuse", fixed, moving, "-o", str(tmp_path / "a.nii.gz"), "--method",
                 "average"]) == 0
    warning = [r.getMessage() for r in caplog.records if "misaligned" in r.getMessage()]
    assert len(warning) == 1 and "--register rigid" in warning[0] and " mm " in warning[0]
    assert all(r.levelname == "WARNING" for r in caplog.records if "misaligned" in r.message)

    caplog.clear()
    assert main(["fuse", fixed, moving, "-o", str(tmp_path / "b.nii.gz"), "--method",
                 "average", "--register", "rigid", "--save-transforms", str(tmp_path)]) == 0
    assert "misaligned" not in caplog.text and "registered flair.nii.gz" in caplog.text
    assert (tmp_path / "flair.tfm").is_file()
    fused = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b.nii.gz")))
    assert fused.shape == sitk.GetArrayViewFromImage(sitk.ReadImage(fixed)).shape

    caplog.clear()
    assert main(["fuse", fixed, moving, "-o", str(tmp_path / "c.nii.gz"), "--method",
                 "average", "--no-alignment-check"]) == 0
    assert "misaligned" not in caplog.text


def test_same_named_inputs_get_a_transform_file_each(tcga_small: Path, tmp_path: Path) -> None:
    """Two registered inputs of one name (``B/flair.nii.gz``, ``C/flair.nii.gz``) write
    ``B_flair.tfm`` and ``C_flair.tfm``: both went to ``flair.tfm``, one overwriting the
    other. The only input of its name keeps ``flair.tfm``."""
    for folder in ("B", "C"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "flair.nii.gz").write_bytes((tcga_small / "flair.nii.gz").read_bytes())
    saved = tmp_path / "transforms"
    saved.mkdir()
    assert main(["fuse", str(tcga_small / "t1.nii.gz"), str(tmp_path / "B" / "flair.nii.gz"),
                 str(tmp_path / "C" / "flair.nii.gz"), "-o", str(tmp_path / "f.nii.gz"),
                 "--method", "average", "--register", "rigid", "--save-transforms",
                 str(saved), "--progress", "none"]) == 0
    assert sorted(p.name for p in saved.iterdir()) == ["B_flair.tfm", "C_flair.tfm"]


def test_batch_warns_then_registers(tcga_small: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    ref_dir, other_dir = tmp_path / "ref", tmp_path / "other"
    ref_dir.mkdir()
    other_dir.mkdir()
    (ref_dir / "case.nii.gz").write_bytes((tcga_small / "t1.nii.gz").read_bytes())
    (other_dir / "case.nii.gz").write_bytes((tcga_small / "flair.nii.gz").read_bytes())
    out = tmp_path / "out"
    assert main(["batch", str(ref_dir), str(other_dir), "-o", str(out), "--method",
                 "average", "--progress", "none"]) == 0
    assert "misaligned" in caplog.text
    caplog.clear()
    assert main(["batch", str(ref_dir), str(other_dir), "-o", str(out), "--method",
                 "average", "--progress", "none", "--register", "rigid"]) == 0
    # (both files are called case.nii.gz: messages name them by their folders)
    assert "looks misaligned" not in caplog.text and "registered other/case.nii.gz" in caplog.text


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_no_overlap_is_one_line_and_writes_nothing(tcga_small: Path, tmp_path: Path,
                                                   capsys) -> None:
    far = sitk.ReadImage(str(tcga_small / "flair.nii.gz"))
    far.SetOrigin(tuple(np.asarray(far.GetOrigin()) + (0.0, 0.0, 900.0)))
    sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
    out, tfm = tmp_path / "out.nii.gz", tmp_path / "out.tfm"
    assert main(["register", str(tcga_small / "t1.nii.gz"), str(tmp_path / "far.nii.gz"),
                 "-o", str(out), "--transform", str(tfm)]) == 1
    assert "does not overlap" in _one_error_line(capsys)
    assert not out.exists() and not tfm.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.nii.gz"]


def test_too_little_content_is_one_line_and_writes_nothing(tcga_small: Path, tmp_path: Path,
                                                           capsys) -> None:
    flat = sitk.ReadImage(str(tcga_small / "flair.nii.gz")) * 0 + 7
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    out = tmp_path / "out.nii.gz"
    assert main(["register", str(tcga_small / "t1.nii.gz"), str(tmp_path / "flat.nii.gz"),
                 "-o", str(out)]) == 1
    assert "too little content" in _one_error_line(capsys)
    assert not out.exists()
    dot = sitk.Image(sitk.ReadImage(str(tcga_small / "flair.nii.gz")))
    array = np.zeros(sitk.GetArrayViewFromImage(dot).shape, np.float32)
    array[13, 60:63, 60:63] = 100.0  # nine bright voxels: nothing to align on
    tiny = sitk.GetImageFromArray(array)
    tiny.CopyInformation(dot)
    with pytest.raises(InputError, match="too little content"):
        registration.register(sitk.ReadImage(str(tcga_small / "t1.nii.gz")), tiny)


def test_non_convergence_is_one_line_and_writes_nothing(tcga_small: Path, tmp_path: Path,
                                                        capsys) -> None:
    out, tfm = tmp_path / "out.nii.gz", tmp_path / "out.h5"
    assert main(["register", str(tcga_small / "t1.nii.gz"), str(tcga_small / "flair.nii.gz"),
                 "-o", str(out), "--transform", str(tfm), "--iterations", "2"]) == 1
    assert "did not converge" in _one_error_line(capsys)
    assert not out.exists() and not tfm.exists()


def test_only_a_registration_one_can_skip_names_the_option_that_skips_it(
        tcga_small: Path) -> None:
    """A registration asked for (``--register rigid``) that does not converge says how to do
    without it; the alignment check's own run (advice only: its failure is logged as
    "skipped") names no option. It told users to fuse with ``--register none``, the default
    that had just run it."""
    t1 = sitk.ReadImage(str(tcga_small / "t1.nii.gz"), sitk.sitkFloat32)
    flair = sitk.ReadImage(str(tcga_small / "flair.nii.gz"), sitk.sitkFloat32)
    with pytest.raises(GeometryError, match=r"\(fuse with --register none, the default, to"):
        registration.estimate_transform(t1, flair, iterations=2)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(t1.TransformContinuousIndexToPhysicalPoint(
        [(size - 1) / 2 for size in t1.GetSize()]))
    with pytest.raises(GeometryError, match="did not converge") as raised:
        registration._optimise(t1, flair, transform, "flair.nii.gz", [2, 1], [1.0, 0.0],
                               iterations=2, samples=2000, step_mm=4.0)  # (as check_alignment)
    assert "--register" not in str(raised.value) and str(raised.value).endswith("too different")


def test_register_refuses_2d_images_and_bad_transform_names(aanlib: Path, tcga_small: Path,
                                                            tmp_path: Path) -> None:
    pair = sorted((aanlib / "PET-MRI" / "MRI").glob("*.png"))[0].name
    with pytest.raises(InputError, match="3D volumes"):
        from medfusion.engine import fuse_files

        fuse_files([aanlib / "PET-MRI" / "MRI" / pair, aanlib / "PET-MRI" / "PET" / pair],
                   tmp_path / "f.png", method="average", register="rigid")
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(InputError, match=f"register aligns 3D volumes; {pair} is a 2D image"):
        from medfusion.cli.register import _check_paths

        _check_paths(argparse.Namespace(
            fixed=str(aanlib / "PET-MRI" / "MRI" / pair), moving=str(tcga_small / "t1.nii.gz"),
            output=str(tmp_path / "r.png"), transform=None, iterations=300))
    from medfusion.cli.register import TransformSaver
    from medfusion.errors import OutputError

    with pytest.raises(OutputError, match="names a folder; .* is a file"):
        TransformSaver.for_args(argparse.Namespace(save_transforms=str(tcga_small / "t1.nii.gz"),
                                                   register="rigid", progress="none"))
    assert main(["register", str(tcga_small / "t1.nii.gz"), str(tcga_small / "flair.nii.gz"),
                 "-o", str(tmp_path / "o.nii.gz"), "--transform", str(tmp_path / "o.mat")]) == 1
    assert not (tmp_path / "o.nii.gz").exists()


def test_affine_starts_from_rigid_and_stays_plausible(tcga_small: Path) -> None:
    fixed = sitk.ReadImage(str(tcga_small / "t1.nii.gz"))
    moving = sitk.ReadImage(str(tcga_small / "flair.nii.gz"))
    aligned, transform = registration.register(fixed, moving, "affine", "flair")
    assert transform.GetName() == "AffineTransform"
    scales = np.linalg.svd(registration.transform_matrix(transform)[0], compute_uv=False)
    assert np.all(np.abs(scales - 1.0) < 0.1)
    assert not registration.check_alignment(fixed, aligned, "flair").misaligned
    with pytest.raises(GeometryError, match="overlap"):
        far = sitk.Image(moving)
        far.SetOrigin((5000.0, 0.0, 0.0))
        registration.register(fixed, far, "rigid")


def test_voxel_points_are_physical_points_on_flipped_oblique_grids() -> None:
    """The points TRE is averaged over (brain voxels in the benchmark) follow the grid's
    spacing, origin and direction, not only its indices."""
    image = sitk.Image([5, 6, 7], sitk.sitkFloat32)
    image.SetSpacing((2.0, 3.0, 4.0))
    image.SetOrigin((90.0, -126.0, 7.5))
    turn = sitk.Euler3DTransform()
    turn.SetRotation(0.2, -0.1, 0.3)
    flip = np.diag([-1.0, 1.0, 1.0])  # x flipped, like the SPM12 SPECT template
    image.SetDirection(tuple((np.asarray(turn.GetMatrix()).reshape(3, 3) @ flip).ravel()))
    mask = np.zeros((7, 6, 5), bool)
    picked = [(0, 0, 0), (4, 5, 6), (1, 2, 3)]  # (x, y, z) indices
    for x, y, z in picked:
        mask[z, y, x] = True
    points = registration.voxel_points(image, mask)
    expected = sorted(image.TransformIndexToPhysicalPoint(index) for index in picked)
    np.testing.assert_allclose(sorted(map(tuple, points)), expected, atol=1e-9)


def test_ctrl_c_during_registration_cancels_instead_of_failing_it(spm12: Path,
                                                                  monkeypatch) -> None:
    """A SIGINT that lands while ITK optimises (its Python callbacks are the only Python code
    running then) is a cancel, not a failed registration that the alignment check would skip:
    the run stops at once and KeyboardInterrupt reaches the caller (the CLI's exit 130)."""
    import os
    import signal

    reference = sitk.ReadImage(str(spm12 / "T1.nii"))
    shift = sitk.Euler3DTransform()
    shift.SetTranslation((12.0, -5.0, 4.0))
    moved = registration.moved_header(sitk.ReadImage(str(spm12 / "T2.nii")), shift)
    iterations = []

    class SignalledRegistration(sitk.ImageRegistrationMethod):
        """ITK's registration, with Ctrl-C pressed at its third iteration."""

        def Execute(self, fixed, moving):  # noqa: N802 (SimpleITK's name)
            def press_ctrl_c() -> None:
                iterations.append(1)
                if len(iterations) == 3:
                    os.kill(os.getpid(), signal.SIGINT)  # handled in the next Python code

            self.AddCommand(sitk.sitkIterationEvent, press_ctrl_c)
            return super().Execute(fixed, moving)

    counted = []

    class CountedRegistration(sitk.ImageRegistrationMethod):
        def Execute(self, fixed, moving):  # noqa: N802
            self.AddCommand(sitk.sitkIterationEvent, lambda: counted.append(1))
            return super().Execute(fixed, moving)

    monkeypatch.setattr(sitk, "ImageRegistrationMethod", CountedRegistration)
    registration.check_alignment(reference, moved, "T2")
    monkeypatch.setattr(sitk, "ImageRegistrationMethod", SignalledRegistration)
    with pytest.raises(KeyboardInterrupt):
        registration.check_alignment(reference, moved, "T2")
    assert len(iterations) <= 6 < len(counted)  # stopped at once (then 1 per further level)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_estimate_from_a_small_overlap_says_it_may_be_far_larger(spm12: Path) -> None:
    """The check is a local fit from the volumes as placed: 150 mm apart (18 % overlap) it
    stops ~10 mm off, far short of the truth, so the warning says the estimate is a lower one;
    at 15 mm (92 % overlap) it is an estimate like any other."""
    reference = sitk.ReadImage(str(spm12 / "T1.nii"))
    messages = {}
    for shift in (15.0, 150.0):
        move = sitk.Euler3DTransform()
        move.SetTranslation((shift, 0.0, 0.0))
        moved = registration.moved_header(sitk.ReadImage(str(spm12 / "PET.nii")), move)
        report = registration.check_alignment(reference, moved, "PET")
        assert report.misaligned
        messages[shift] = report.message()
    assert "may be far larger" not in messages[15.0] and "(estimated;" in messages[15.0]
    assert "estimated where they overlap, 18% of the reference: it may be far larger" in (
        messages[150.0])


@pytest.mark.parametrize("limit", [0, 100])
def test_a_transform_file_cut_short_is_refused_saying_why(limit: int, tmp_path: Path) -> None:
    """A transform file that the disk cut (here the process's file size limit, a real short
    write) is one error that says why and leaves nothing: ITK's writer says nothing, and a
    transform cut at 100 bytes was kept as if whole (an empty one said only "nothing was
    written")."""
    import subprocess
    import sys

    target = tmp_path / "moved.tfm"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "import SimpleITK as sitk\n"
        "from medfusion import registration\n"
        "from medfusion.errors import OutputError\n"
        "transform = sitk.Euler3DTransform()\n"
        "transform.SetTranslation((1.5, 2.0, 3.0))\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "try:\n"
        "    registration.write_transform(sys.argv[1], transform)\n"
        "except OutputError as error:\n"
        "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "file size limit" in done.stdout and "moved.tfm" in done.stdout, done.stdout
    assert list(tmp_path.iterdir()) == []
