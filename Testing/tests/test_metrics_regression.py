"""Regression values on real Harvard atlas pairs, checked against independent references.

Pairs: CT-MRI ``20005`` and PET-MRI ``25015`` (PET luminance Y = 0.299 R + 0.587 G + 0.114 B),
fused in the test with numpy by plain average and by maximum (0-255 floats, no rounding).

Where each expected value comes from (computed once when these tests were written):

- ``skimage``: scikit-image 0.26 — ``structural_similarity(S, F, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`` summed over the two sources (Wang et
  al.'s MATLAB ``ssim_index`` convention, as VIFB); ``structural_similarity(S, F,
  data_range=255)`` averaged (skimage's 7x7 uniform convention); ``peak_signal_noise_ratio``;
  ``measure.shannon_entropy`` of the image rounded half up to uint8 (bits).
- ``naive``: the loop-by-loop transcriptions of the reference MATLAB codes in
  ``test_metrics_reference.py`` run on the full 256x256 images (VIFB ``metricsQabf``,
  ``vifp_mscale``, Liu's ``metricPeilla`` and ``metricWang``), too slow to rerun here.
- in-test: straightforward formulas written independently below (SF, AG, EI, MI, H).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import convolve2d

import medfusion.metrics as M

EXPECTED = {
    # (pair, fusion): {metric: (value, source of the value)}
    ("ct", "avg"): {
        "SSIM": (1.40279068322203, "skimage gaussian, sum"),
        "SSIM_uniform_mean": (0.7007485639777078, "skimage default, mean"),
        "PSNR_vs_ct": (13.845064229201828, "skimage psnr"),
        "EN": (3.4985028595165586, "skimage shannon_entropy"),
        "QABF": (0.3938440726016899, "naive VIFB metricsQabf"),
        "VIF": (0.5705885850093805, "naive vifp_mscale, sum"),
        "QNCIE": (0.8080090643427917, "naive metricWang"),
        "Q0": (0.778712254763, "naive metricPeilla sw=1"),
        "QW": (0.631033453752, "naive metricPeilla sw=2"),
        "QE": (0.584137173205, "naive metricPeilla sw=3"),
    },
    ("ct", "max"): {
        "SSIM": (1.475685897681382, "skimage gaussian, sum"),
        "SSIM_uniform_mean": (0.7437703412753163, "skimage default, mean"),
        "PSNR_vs_ct": (18.652833038638455, "skimage psnr"),
        "EN": (2.723359355803179, "skimage shannon_entropy"),
        "QABF": (0.6738880662987808, "naive VIFB metricsQabf"),
        "VIF": (0.814222845776245, "naive vifp_mscale, sum"),
        "QNCIE": (0.8063534545729263, "naive metricWang"),
        "Q0": (0.828479768698, "naive metricPeilla sw=1"),
        "QW": (0.82856581358, "naive metricPeilla sw=2"),
        "QE": (0.836848814259, "naive metricPeilla sw=3"),
    },
    ("pet", "avg"): {
        "SSIM": (1.4883865602409734, "skimage gaussian, sum"),
        "SSIM_uniform_mean": (0.7493328116579892, "skimage default, mean"),
        "PSNR_vs_ct": (15.452429773510456, "skimage psnr (vs the PET luminance)"),
        "EN": (3.6264049814965684, "skimage shannon_entropy"),
        "QABF": (0.45899831245216105, "naive VIFB metricsQabf"),
        "VIF": (0.8512600269989776, "naive vifp_mscale, sum"),
        "QNCIE": (0.8095758637228254, "naive metricWang"),
        "Q0": (0.85406146193, "naive metricPeilla sw=1"),
        "QW": (0.670735609153, "naive metricPeilla sw=2"),
        "QE": (0.640663829116, "naive metricPeilla sw=3"),
    },
    ("pet", "max"): {
        "SSIM": (1.564575819010285, "skimage gaussian, sum"),
        "SSIM_uniform_mean": (0.788429122054801, "skimage default, mean"),
        "PSNR_vs_ct": (9.533199088811358, "skimage psnr (vs the PET luminance)"),
        "EN": (3.4038486165383626, "skimage shannon_entropy"),
        "QABF": (0.8040176369774117, "naive VIFB metricsQabf"),
        "VIF": (1.0255623238012928, "naive vifp_mscale, sum"),
        "QNCIE": (0.8109418248202023, "naive metricWang"),
        "Q0": (0.950586033911, "naive metricPeilla sw=1"),
        "QW": (0.933513398871, "naive metricPeilla sw=2"),
        "QE": (0.937013385591, "naive metricPeilla sw=3"),
    },
}

# Values of the fast implementation for the metrics checked in-test below, pinned so that a
# convention change shows up as a diff here (FMI: checked against fmi.m on crops).
PINNED = {
    ("ct", "avg"): {"FMI": 0.7501794430393472, "NMI": 1.1494726159945419},
    ("ct", "max"): {"FMI": 0.7781142680655346, "NMI": 1.251490171512},
    ("pet", "avg"): {"FMI": 0.6817258911811994, "NMI": 1.105037619116938},
    ("pet", "max"): {"FMI": 0.6873143205409192, "NMI": 1.2175373680961217},
}


def _grey(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def _luminance(path) -> np.ndarray:
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


@pytest.fixture(scope="module")
def pairs(aanlib):
    return {
        "ct": (_grey(aanlib / "CT-MRI" / "CT" / "20005.png"),
               _grey(aanlib / "CT-MRI" / "MRI" / "20005.png")),
        "pet": (_luminance(aanlib / "PET-MRI" / "PET" / "25015.png"),
                _grey(aanlib / "PET-MRI" / "MRI" / "25015.png")),
    }


def _fuse(a: np.ndarray, b: np.ndarray, how: str) -> np.ndarray:
    return (a + b) / 2 if how == "avg" else np.maximum(a, b)


# --- independent in-test formulas ----------------------------------------------------------


def _sf(f):  # Eskicioglu & Fisher, VIFB loops: RF over M(N-1), CF over (M-1)N
    m, n = f.shape
    rf = sum((f[i, j] - f[i, j - 1]) ** 2 for i in range(m) for j in range(1, n)) / (m * (n - 1))
    cf = sum((f[i, j] - f[i - 1, j]) ** 2 for j in range(n) for i in range(1, m)) / ((m - 1) * n)
    return math.sqrt(rf + cf)


def _ag(f):  # VIFB: MATLAB gradient (central inside, one-sided at the border)
    gx = np.empty_like(f)
    gy = np.empty_like(f)
    gx[:, 1:-1] = (f[:, 2:] - f[:, :-2]) / 2
    gx[:, 0], gx[:, -1] = f[:, 1] - f[:, 0], f[:, -1] - f[:, -2]
    gy[1:-1] = (f[2:] - f[:-2]) / 2
    gy[0], gy[-1] = f[1] - f[0], f[-1] - f[-2]
    m, n = f.shape
    return np.sqrt((gx**2 + gy**2) / 2).sum() / ((m - 1) * (n - 1))


def _ei(f):  # VIFB: imfilter(fspecial('sobel'), 'replicate'), as a convolution of the padded image
    w = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    padded = np.pad(f, 1, mode="edge")
    gx = convolve2d(padded, w[::-1, ::-1], mode="valid")
    gy = convolve2d(padded, w.T[::-1, ::-1], mode="valid")
    return np.sqrt(gx**2 + gy**2).mean()


def _levels(x, normalize):  # MATLAB round half away from zero of (min-max stretched) grey levels
    if normalize:
        x = (x - x.min()) / (x.max() - x.min()) * 255
    return np.floor(x + 0.5).astype(int)


def _mi_bits(x, y):  # VIFB metricsMutinf (natural log) converted to bits, via np.histogram2d
    h, _, _ = np.histogram2d(_levels(x, True).ravel(), _levels(y, True).ravel(),
                             bins=256, range=[[-0.5, 255.5], [-0.5, 255.5]])
    p = h / h.sum()
    px, py = p.sum(1), p.sum(0)

    def ent(q):
        q = q[q > 0]
        return -(q * np.log(q)).sum()

    return (ent(px) + ent(py) - ent(p.ravel())) / math.log(2)


def _ce(x, f):  # VIFB metricsCross_entropy for one source
    px = np.histogram(_levels(x, False), bins=256, range=(-0.5, 255.5))[0] / x.size
    pf = np.histogram(_levels(f, False), bins=256, range=(-0.5, 255.5))[0] / f.size
    keep = (px > 0) & (pf > 0)
    return float((px[keep] * np.log2(px[keep] / pf[keep])).sum())


# --- tests ----------------------------------------------------------------------------------

CASES = [("ct", "avg"), ("ct", "max"), ("pet", "avg"), ("pet", "max")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_values_match_reference_implementations(pairs, case):
    a, b = pairs[case[0]]
    f = _fuse(a, b, case[1])
    got = {
        "SSIM": M.ssim(f, a, b),
        "SSIM_uniform_mean": M.ssim(f, a, b, window="uniform", reduce="mean"),
        "PSNR_vs_ct": M.psnr(f, a),
        "EN": M.entropy(f),
        "QABF": M.qabf(f, a, b),
        "VIF": M.vif(f, a, b),
        "QNCIE": M.qncie(f, a, b),
        "Q0": M.q0(f, a, b),
        "QW": M.qw(f, a, b),
        "QE": M.qe(f, a, b),
    }
    for name, (expected, source) in EXPECTED[case].items():
        assert got[name] == pytest.approx(expected, rel=1e-9, abs=1e-11), f"{name} vs {source}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_values_match_in_test_formulas(pairs, case):
    a, b = pairs[case[0]]
    f = _fuse(a, b, case[1])
    assert M.spatial_frequency(f) == pytest.approx(_sf(f), rel=1e-12)
    assert M.average_gradient(f) == pytest.approx(_ag(f), rel=1e-12)
    assert M.edge_intensity(f) == pytest.approx(_ei(f), rel=1e-12)
    assert M.mutual_information(f, a, b) == pytest.approx(_mi_bits(a, f) + _mi_bits(b, f),
                                                          rel=1e-12)
    assert M.mutual_information(f, a, b, base=math.e) == pytest.approx(
        (_mi_bits(a, f) + _mi_bits(b, f)) * math.log(2), rel=1e-12)
    assert M.cross_entropy(f, a, b) == pytest.approx((_ce(a, f) + _ce(b, f)) / 2, rel=1e-12)
    assert M.standard_deviation(f) == pytest.approx(math.sqrt(((f - f.mean()) ** 2).mean()))
    assert M.correlation_coefficient(f, a, b) == pytest.approx(
        (np.corrcoef(a.ravel(), f.ravel())[0, 1] + np.corrcoef(b.ravel(), f.ravel())[0, 1]) / 2)
    assert M.scd(f, a, b) == pytest.approx(np.corrcoef((f - b).ravel(), a.ravel())[0, 1]
                                           + np.corrcoef((f - a).ravel(), b.ravel())[0, 1])
    for name, value in PINNED[case].items():
        assert M.compute_metrics(f, [a, b], names=[name])[name] == pytest.approx(value, rel=1e-9)


def test_max_fusion_beats_average_on_edges_and_contrast(pairs):
    """Direction sanity on real data: max fusion keeps the bright CT bone and the MRI edges,
    which the field's metrics reward over plain averaging (which halves both contrasts)."""
    a, b = pairs["ct"]
    avg, mx = M.compute_metrics(_fuse(a, b, "avg"), [a, b]), M.compute_metrics(
        _fuse(a, b, "max"), [a, b])
    for name in ("QABF", "VIF", "SD", "SF", "AG", "EI", "QW", "QE"):
        assert mx[name] > avg[name], name


def test_unit_range_inputs_give_the_8bit_numbers(pairs):
    a, b = pairs["pet"]
    f = _fuse(a, b, "avg")
    on_255 = M.compute_metrics(f, [a, b], target=a)
    on_unit = M.compute_metrics(f / 255, [a / 255, b / 255], target=a / 255, data_range=1.0)
    assert on_unit.keys() == on_255.keys()
    for name, value in on_255.items():
        assert on_unit[name] == pytest.approx(value, rel=1e-7, abs=1e-9), name
