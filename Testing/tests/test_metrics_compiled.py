"""The metrics' compiled building blocks (medfusion/metrics/_compiled.py) against plain NumPy /
SciPy spellings of the same operations, on odd sizes, both filter steps and several kernels.
The metrics built on them are checked against the reference MATLAB transcriptions in
test_metrics_reference.py; these pin each block down on its own."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.ndimage import correlate1d

from medfusion.metrics import _common, _compiled


def _valid_reference(image: np.ndarray, kernel: np.ndarray, step: int) -> np.ndarray:
    """MATLAB ``filter2(outer(k, k), image, 'valid')(1:step:end, 1:step:end)`` via SciPy."""
    half, size = kernel.size // 2, kernel.size
    full = correlate1d(correlate1d(image, kernel, axis=0, mode="constant"), kernel, axis=1,
                       mode="constant")
    # SciPy's output i uses inputs i - size // 2 ...: the valid output j is its j + size // 2
    valid = full[half:half + image.shape[0] - size + 1, half:half + image.shape[1] - size + 1]
    return valid[::step, ::step]


@pytest.fixture
def images():
    rng = np.random.default_rng(20)
    return rng.uniform(0, 255, (2, 53, 47))


# sizes 9, 11 and 17 run the loops with a fixed tap count, 3 and 8 the loops for any size
# (_compiled._FILTER_SIZE, _MOMENT_SIZES, _COVARIANCE_SIZES): both forms are pinned here
@pytest.mark.parametrize("size,sigma", [(11, 1.5), (17, 3.4), (9, 1.2), (3, 0.6), (8, None)])
@pytest.mark.parametrize("step", [1, 2])
def test_filters_match_scipy(images, size, sigma, step):
    kernel = _common.gaussian_kernel(size, sigma) if sigma else np.full(size, 1.0 / size)
    x, y = images
    expected = _valid_reference(x, kernel, step)
    np.testing.assert_allclose(_common.filter_valid(x, kernel, step), expected, rtol=0,
                               atol=1e-10)
    if step == 1:
        mean, var = _compiled.moments_valid(x, kernel, 1.5)
        np.testing.assert_allclose(mean, expected, atol=1e-10)
        np.testing.assert_allclose(var, 1.5 * (_valid_reference(x * x, kernel, 1)
                                               - expected**2), atol=1e-7)
        mean_y = _valid_reference(y, kernel, 1)
        cov = _compiled.covariance_valid(x, y, kernel, expected, mean_y, 0.5)
        np.testing.assert_allclose(cov, 0.5 * (_valid_reference(x * y, kernel, 1)
                                               - expected * mean_y), atol=1e-7)


@pytest.mark.parametrize("center,mode", [(1.0, "constant"), (2.0, "constant"), (2.0, "nearest")])
def test_gradients_match_2d_correlations(images, center, mode):
    x = images[0]
    gx_kernel = np.outer([1.0, center, 1.0], [1.0, 0.0, -1.0])
    scipy_mode = "constant" if mode == "constant" else "nearest"
    from scipy.ndimage import correlate

    gx, gy = _compiled.gradient_3x3(_common.pad_border(x, mode), center)
    np.testing.assert_allclose(gx, correlate(x, gx_kernel, mode=scipy_mode), atol=1e-10)
    np.testing.assert_allclose(gy, correlate(x, gx_kernel.T, mode=scipy_mode), atol=1e-10)
    magnitude = _compiled.gradient_magnitude(_common.pad_border(x, mode), center)
    np.testing.assert_allclose(magnitude, np.hypot(gx, gy), atol=1e-10)


def test_sobel_ratio_is_infinite_where_sx_is_zero():
    image = np.zeros((6, 7))
    image[:, 3:] = 10.0  # a vertical edge: sx != 0 next to it, 0 elsewhere
    image[4, 0] = 5.0
    strength, ratio = _compiled.sobel_strength_ratio(_common.pad_border(image, "constant"))
    gx, gy = _compiled.gradient_3x3(_common.pad_border(image, "constant"), 2.0)
    np.testing.assert_allclose(strength, np.hypot(gx, gy))
    flat = gx == 0
    assert flat.any() and (~flat).any()
    assert np.isinf(ratio[flat]).all() and (ratio[flat] > 0).all()
    np.testing.assert_allclose(ratio[~flat], -gy[~flat] / gx[~flat])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bins", [256, 64, 7])
def test_grey_levels_and_histograms_match_numpy(images, normalize, bins):
    x = images[0] * 1.1 - 10  # values outside 0..255 are clipped
    x[0, :4] = [0.5, 1.5, 254.5, -0.5]  # halves round up
    image = x
    if normalize:
        image = (x - x.min()) / (x.max() - x.min()) * 255.0
    expected = np.clip(np.floor(image + 0.5), 0, 255).astype(np.int64) * bins // 256
    levels = _common.grey_levels(x, bins, normalize)
    np.testing.assert_array_equal(levels, expected)
    np.testing.assert_allclose(_common.histogram(levels, bins),
                               np.bincount(expected.ravel(), minlength=bins) / expected.size)
    other = _common.grey_levels(images[1], bins)
    joint = np.zeros((bins, bins))
    np.add.at(joint, (levels.ravel(), other.ravel()), 1.0)
    np.testing.assert_allclose(_common.joint_histogram(levels, other, bins), joint / joint.sum())
    assert _common.grey_levels(np.full((4, 5), 3.0), bins, True).max() == 0  # constant -> 0


def test_pearson_matches_numpy(images):
    x, y = images
    assert _common.pearson(x, 0.3 * x + y) == pytest.approx(
        np.corrcoef(x.ravel(), (0.3 * x + y).ravel())[0, 1], abs=1e-13)
    assert np.isnan(_common.pearson(x, np.full_like(x, 2.0)))


def test_fast_log_is_within_one_ulp_of_numpy():
    """FMI's vectorised logarithm: within 1 ulp of np.log over the range its callers use (a
    value plus 1e-300: 1e-300 up to a few units) and beyond, on both sides of sqrt(1/2) where it
    switches exponent; exactly 0 at 1, and k ln 2 at 2^k to the last bit or so."""
    rng = np.random.default_rng(5)
    edge = np.sqrt(0.5)
    values = np.concatenate([
        np.exp(rng.uniform(np.log(1e-300), np.log(1e3), 200_000)),
        rng.uniform(0.0, 1.0, 100_000) + 1e-300,
        [1.0, 2.0, 0.5, 1e-300, 1.0 + 2**-52, 1.0 - 2**-53, edge, np.nextafter(edge, 0),
         np.nextafter(edge, 1), 2 * edge, np.nextafter(2 * edge, 3), 8.0, 2.0**-700],
    ])
    got, expected = _compiled.fast_logs(values), np.log(values)
    ulps = np.abs(got - expected) / np.spacing(np.abs(expected).clip(1e-300))
    assert ulps.max() <= 1.0
    assert _compiled.fast_logs(np.array([1.0]))[0] == 0.0
    assert _compiled.fast_logs(np.array([2.0**-700]))[0] == pytest.approx(-700 * np.log(2),
                                                                          rel=2e-16)


def test_compiled_loops_are_thread_safe(images):
    """The metrics run the kernels on two threads at once (they release the GIL): two threads
    give the same numbers as one."""
    x, y = (np.tile(a, (6, 6)) for a in images)
    kernel = _common.gaussian_kernel(11, 1.5)
    alone = _compiled.moments_valid(x, kernel, 1.0)[1]
    results = [None, None]

    def run(index: int) -> None:
        results[index] = _compiled.moments_valid(x if index == 0 else y, kernel, 1.0)[1]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(results[0], alone)
    np.testing.assert_array_equal(results[1], _compiled.moments_valid(y, kernel, 1.0)[1])
