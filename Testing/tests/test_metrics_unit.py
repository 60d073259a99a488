"""Hand-computable cases, invariances, directions and errors of ``medfusion.metrics``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

import medfusion.metrics as M
from medfusion.errors import InputError


@pytest.fixture(scope="module")
def mri(aanlib) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(aanlib / "CT-MRI" / "MRI" / "20005.png").convert("L"), float)


@pytest.fixture(scope="module")
def ct(aanlib) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(aanlib / "CT-MRI" / "CT" / "20005.png").convert("L"), float)


def _halves(shape=(64, 64)) -> np.ndarray:
    """Left half 0, right half 255: a known edge and a two-level histogram."""
    img = np.zeros(shape)
    img[:, shape[1] // 2:] = 255
    return img


# --- hand-computable values ------------------------------------------------------------------


def test_entropy_known_histograms():
    assert M.entropy(np.zeros((8, 8))) == 0.0
    assert M.entropy(_halves()) == pytest.approx(1.0)
    assert M.entropy(_halves(), base=math.e) == pytest.approx(math.log(2))
    levels = np.arange(256, dtype=float).reshape(16, 16)  # every grey level once
    assert M.entropy(levels) == pytest.approx(8.0)
    assert M.entropy(levels, bins=16) == pytest.approx(4.0)  # 16 levels per bin
    assert M.entropy(levels / 255, data_range=1.0) == pytest.approx(8.0)


def test_statistics_of_a_known_edge_and_ramp():
    img = _halves((4, 4))  # columns 0, 0, 255, 255
    assert M.mean_intensity(img) == 127.5
    assert M.standard_deviation(img) == 127.5
    # one jump of 255 among the 3 horizontal differences of each row, none vertically
    assert M.spatial_frequency(img) == pytest.approx(255 / math.sqrt(3))
    ramp = np.tile(np.arange(10, dtype=float), (10, 1))  # +1 per column
    assert M.average_gradient(ramp, operator="forward") == pytest.approx(math.sqrt(0.5))
    assert M.average_gradient(ramp) == pytest.approx(math.sqrt(0.5) * 100 / 81)  # all pixels
    assert M.energy_of_gradient(ramp) == pytest.approx(1.0)
    assert M.energy_of_gradient(ramp, reduce="sum") == pytest.approx(81.0)
    # Sobel on a unit ramp: |Sx| = (1 + 2 + 1) * 2 = 8 inside, 4 on the replicated border columns
    assert M.edge_intensity(ramp) == pytest.approx((8 * 8 + 2 * 4) / 10)


def test_fidelity_of_a_pure_intensity_shift(mri):
    shifted = mri + 3.0
    assert M.mse(shifted, mri) == pytest.approx(9.0)
    assert M.rmse(shifted, mri) == pytest.approx(3.0)
    assert M.rmse(shifted, mri, scale=1.0) == pytest.approx(3.0 / 255)
    assert M.psnr(shifted, mri) == pytest.approx(10 * math.log10(255**2 / 9))
    assert M.relative_error(shifted, mri) == pytest.approx(
        3 * math.sqrt(mri.size) / np.sqrt((mri**2).sum()))
    assert M.psnr(mri, mri) == math.inf
    # the fusion form averages over sources: MSE 9 and 0 -> 4.5, RMSE (3 + 0) / 2
    assert M.mse(shifted, mri, shifted) == pytest.approx(4.5)
    assert M.rmse(shifted, mri, shifted) == pytest.approx(1.5)


def test_qabf_of_a_perfect_copy_is_the_sigmoid_maximum(mri):
    peak = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert M.qabf(mri, mri, mri) == pytest.approx(peak, rel=1e-12)
    assert M.qabf(_halves(), _halves(), _halves()) == pytest.approx(peak, rel=1e-12)


def test_fusing_an_image_with_itself(mri):
    two = (mri, mri)
    assert M.ssim(mri, *two) == pytest.approx(2.0)
    assert M.ssim(mri, *two, reduce="mean") == pytest.approx(1.0)
    assert M.ssim(mri, *two, window="uniform") == pytest.approx(2.0)
    assert M.vif(mri, *two) == pytest.approx(2.0)
    for func in (M.q0, M.qw, M.qe, M.fmi, M.correlation_coefficient):
        assert func(mri, *two) == pytest.approx(1.0), func.__name__
    # QNCIE: NCC(X, X) = H(X) / 8 bits, so 1 needs all 256 grey levels equally often
    levels = np.arange(256, dtype=float).reshape(16, 16)
    assert M.qncie(levels, levels, levels) == pytest.approx(1.0)
    assert M.qncie(mri, *two) < 1.0
    assert M.mutual_information(mri, *two) == pytest.approx(2 * M.entropy(mri))
    assert M.nmi(mri, *two) == pytest.approx(2.0)  # 1 per source
    assert M.cross_entropy(mri, *two) == 0.0
    assert M.mse(mri, *two) == 0.0


def test_mutual_information_of_a_two_level_image():
    img = _halves()
    assert M.mutual_information(img, img) == pytest.approx(1.0)
    assert M.mutual_information(img, 255 - img) == pytest.approx(1.0)  # dependence, not sign
    noise = np.random.default_rng(0).integers(0, 2, img.shape) * 255.0
    assert M.mutual_information(img, noise) < 0.01


# --- invariances and directions ----------------------------------------------------------------


def test_invariance_to_intensity_offset(mri, ct):
    fused = (mri + ct) / 2
    for func in (M.correlation_coefficient, M.scd):
        assert func(fused + 20, mri, ct) == pytest.approx(func(fused, mri, ct), rel=1e-9)
    for func in (M.standard_deviation, M.spatial_frequency, M.average_gradient,
                 M.edge_intensity):
        assert func(fused + 20) == pytest.approx(func(fused), rel=1e-9), func.__name__
    offset = fused * 0.8 + 20  # an affine change, within 0..255
    assert M.correlation_coefficient(offset, mri, ct) == pytest.approx(
        M.correlation_coefficient(fused, mri, ct))
    # FMI min-max normalises each window: affine changes only matter through the "window
    # equals the source" shortcut, which textured random images never trigger
    rng = np.random.default_rng(7)
    a, b = rng.uniform(10, 240, (2, 40, 40))
    f = (a + b) / 2
    assert M.fmi(f * 0.8 + 20, a, b) == pytest.approx(M.fmi(f, a, b), rel=1e-9)


def test_noise_lowers_structure_metrics(mri, ct):
    fused = np.maximum(mri, ct)
    noisy = np.clip(fused + np.random.default_rng(1).normal(0, 20, fused.shape), 0, 255)
    for func in (M.qabf, M.ssim, M.vif, M.qw, M.q0, M.fmi):
        assert func(noisy, mri, ct) < func(fused, mri, ct), func.__name__
    assert M.psnr(noisy, fused) < 25 < M.psnr(fused + 1, fused)


def test_blur_lowers_sharpness_metrics(mri):
    blurred = ndimage.gaussian_filter(mri, 2.0)
    for func in (M.spatial_frequency, M.average_gradient, M.edge_intensity,
                 M.energy_of_gradient):
        assert func(blurred) < 0.7 * func(mri), func.__name__


def test_directions_registry():
    assert M.direction("QAB/F") == "higher"
    assert M.direction("rmse") == "lower"
    assert M.direction("RMSE_target") == "lower"
    assert M.direction("H") == "lower"
    assert M.METRICS["MEAN"].higher_is_better is None
    lower = {n for n, s in M.METRICS.items() if s.direction == "lower"}
    assert lower == {"H", "MSE", "RMSE", "REL"}


# --- errors and undefined values ------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3)), "2D"),
    (np.zeros((8, 9)), "shape"),
    (np.full((8, 8), np.nan), "NaN"),
    (np.full((8, 8), np.inf), "NaN or infinite"),
])
def test_bad_inputs_raise_input_errors(bad, message):
    good = np.zeros((8, 8))
    with pytest.raises(M.MetricInputError, match=message) as info:
        M.mse(good, bad)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    with pytest.raises(InputError):
        M.compute_metrics(good, [bad])


def test_parameter_errors():
    img = np.zeros((32, 32))
    with pytest.raises(M.MetricInputError, match="data_range"):
        M.entropy(img, data_range=0)
    with pytest.raises(M.MetricInputError, match="window"):
        M.ssim(img, img, window="box")
    with pytest.raises(M.MetricInputError, match="at least"):
        M.qabf(img)
    with pytest.raises(M.MetricInputError, match="unknown metric"):
        M.compute_metrics(img, [img], names=["NOPE"])
    with pytest.raises(M.MetricInputError, match="no target"):
        M.compute_metrics(img, [img], names=["RMSE_target"])


def test_values_on_another_scale_than_data_range_are_refused(mri):
    """0-255 images scored with ``data_range=1`` used to give plausible-looking numbers (their
    grey levels clipped); noise just below 0 or above the range stays allowed."""
    unit = mri / 255.0
    with pytest.raises(M.MetricInputError, match="source 2 has values .* outside data_range"):
        M.compute_metrics(unit, [unit, mri], names=["QABF"], data_range=1.0)
    with pytest.raises(M.MetricInputError, match=r"fused image .* \(255 for 8-bit images"):
        M.compute_metrics(mri, [unit, unit], names=["QABF"], data_range=1.0)
    with pytest.raises(M.MetricInputError, match="target image"):
        M.compute_metrics(unit, [unit], target=unit - 0.5, names=["MSE_target"], data_range=1.0)
    noisy = unit + np.random.default_rng(0).normal(0, 0.02, unit.shape)  # a few % outside
    assert math.isfinite(M.compute_metrics(noisy, [unit, unit], names=["QABF"],
                                           data_range=1.0)["QABF"])


def test_constant_inputs_give_nan_with_a_warning(mri):
    flat = np.full_like(mri, 100.0)
    for func in (M.correlation_coefficient, M.vif):
        with pytest.warns(M.MetricUndefinedWarning, match="undefined"):
            assert math.isnan(func(flat, flat, flat))
    black = np.zeros_like(mri)  # QAB/F: zero padding gives a flat non-zero image border edges
    with pytest.warns(M.MetricUndefinedWarning, match="no source has any edge"):
        assert math.isnan(M.qabf(black, black, black))
    with pytest.warns(M.MetricUndefinedWarning):
        values = M.compute_metrics(flat, [flat, flat])
    assert set(values) == set(M.available_metrics())
    assert values["SSIM"] == pytest.approx(2.0) and values["EN"] == 0.0


def test_images_too_small_for_a_window_give_nan_with_a_warning():
    """Small slices (thin volumes, tiny crops) are valid input: window metrics have no value
    there (NaN + MetricUndefinedWarning, as for constant images), the others still work."""
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 255, (2, 30, 30))
    f = (a + b) / 2
    with pytest.warns(M.MetricUndefinedWarning, match=r"smaller than its 41x41 window"):
        assert math.isnan(M.vif(f, a, b))
    with pytest.warns(M.MetricUndefinedWarning, match=r"SSIM is undefined.*11x11"):
        assert math.isnan(M.ssim(f[:8, :8], a[:8, :8], b[:8, :8]))
    assert math.isfinite(M.ssim(f[:8, :8], a[:8, :8], b[:8, :8], window="uniform"))  # 7x7 fits
    expected_nan = {
        (30, 30): {"VIF"},
        (9, 9): {"VIF", "SSIM", "Q0", "QW", "QE"},
        (2, 40): {"VIF", "SSIM", "Q0", "QW", "QE", "FMI"},
        (1, 40): {"VIF", "SSIM", "Q0", "QW", "QE", "FMI", "SF", "AG", "EOG"},
    }
    for shape, nan_names in expected_nan.items():
        crop = (slice(0, shape[0]), slice(0, shape[1]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = M.compute_metrics(f[crop], [a[crop], b[crop]])
        assert {n for n, v in values.items() if math.isnan(v)} == nan_names, shape
        assert caught and all(issubclass(w.category, M.MetricUndefinedWarning) for w in caught)
    # a thin volume: every slice is 9x9, the window metrics are NaN, the rest aggregate
    volume = np.stack([a[:9, :9], b[:9, :9]])
    with pytest.warns(M.MetricUndefinedWarning, match="undefined on some slices"):
        _, aggregate = M.volume_metrics(volume, [volume, volume[::-1]], names=["SSIM", "EN"])
    assert math.isnan(aggregate["SSIM"]) and math.isfinite(aggregate["EN"])


# --- tables ----------------------------------------------------------------------------------


def test_compute_metrics_all_names_aliases_targets_options(mri, ct):
    fused = (mri + ct) / 2
    everything = M.compute_metrics(fused, [mri, ct], target=mri)
    targets = [n + M.TARGET_SUFFIX for n in ("MI", "SSIM", "MSE", "RMSE", "PSNR", "REL")]
    assert list(everything) == M.available_metrics() + targets
    assert all(math.isfinite(v) for v in everything.values())
    picked = M.compute_metrics(fused, [mri, ct], names=["ENT", "STD", "GRAD", "QAB/F"])
    assert list(picked) == ["EN", "SD", "AG", "QABF"]
    assert picked["QABF"] == M.qabf(fused, mri, ct)
    with_target = M.compute_metrics(fused, [mri, ct], target=ct, names=["RMSE"])
    assert with_target["RMSE_target"] == pytest.approx(M.rmse(fused, ct))
    mean_ssim = M.compute_metrics(fused, [mri, ct], names=["SSIM"],
                                  options={"SSIM": {"reduce": "mean"}})
    assert mean_ssim["SSIM"] == pytest.approx(everything["SSIM"] / 2)


def test_volume_metrics_per_slice_and_foreground(mri, ct):
    stack_a = np.stack([np.zeros_like(mri), mri, mri[::-1], np.zeros_like(mri)]) / 255
    stack_b = np.stack([np.zeros_like(ct), ct, ct[::-1], np.zeros_like(ct)]) / 255
    fused = np.maximum(stack_a, stack_b)
    names = ["EN", "QABF", "SSIM"]
    rows, aggregate = M.volume_metrics(fused, [stack_a, stack_b], mask="foreground",
                                       names=names, data_range=1.0)
    assert [row["slice"] for row in rows] == [1.0, 2.0]
    expected = M.compute_metrics(fused[1], [stack_a[1], stack_b[1]], names=names, data_range=1)
    for name in names:
        assert rows[0][name] == pytest.approx(expected[name])
        assert aggregate[name] == pytest.approx((rows[0][name] + rows[1][name]) / 2)
    assert aggregate["slices"] == 2
    with pytest.warns(M.MetricUndefinedWarning, match="undefined on some slices"):
        all_rows, all_agg = M.volume_metrics(fused, [stack_a, stack_b], names=names,
                                             data_range=1.0)
    assert len(all_rows) == 4 and math.isnan(all_rows[0]["QABF"])
    assert all_agg["QABF"] == pytest.approx(aggregate["QABF"])  # NaN slices ignored
    mask = np.zeros(fused.shape, bool)
    mask[2, 100, 100] = True
    masked, _ = M.volume_metrics(fused, [stack_a, stack_b], mask=mask, names=["EN"],
                                 data_range=1.0)
    assert [row["slice"] for row in masked] == [2.0]
    sideways, _ = M.volume_metrics(fused, [stack_a, stack_b], axis=1, names=["MEAN"],
                                   data_range=1.0)
    assert len(sideways) == fused.shape[1]
    with pytest.raises(M.MetricInputError, match="3D"):
        M.volume_metrics(fused[0], [stack_a[0]])


def test_no_torch_needed():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; import medfusion.metrics as M; "
            "import numpy as np; x = np.eye(64); print(M.qabf(x, x), M.vif(x, x), M.ssim(x, x))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_warnings_are_not_raised_for_normal_inputs(mri, ct):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.compute_metrics(np.maximum(mri, ct), [mri, ct])
