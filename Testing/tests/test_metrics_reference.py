"""Slow, straightforward reference implementations of the expensive metrics, and tests that the
fast vectorised ones in ``medfusion.metrics`` give the same numbers.

Each ``naive_*`` function is a loop-by-loop transcription of the public reference MATLAB code
named in its docstring (read through the search tool; no code copied; FMI's l x l grid of one
window pair as numpy arrays, as fmi.m's matrices, the same formula), deliberately written
without the tricks of the fast versions (no separable filters, no shared statistics, no
closed forms), so an agreement is evidence rather than a tautology. The benchmark
(``Testing/benchmarks/bench_metrics.py``) times them beside the fast versions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import convolve2d

import medfusion.metrics as M

# --- naive references ------------------------------------------------------------------------


def _filter2(kernel: np.ndarray, image: np.ndarray, shape: str) -> np.ndarray:
    """MATLAB ``filter2`` (2D correlation) through an explicit 2D convolution."""
    return convolve2d(image, kernel[::-1, ::-1], mode=shape)


def _fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    half = (size - 1) / 2.0
    y, x = np.mgrid[-half:half + 1, -half:half + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return g / g.sum()


def naive_qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Per-pixel loops of VIFB ``metricsQabf.m`` (Xydeas & Petrovic), with G = 1 where g_S == g_F
    as in the paper (VIFB sets G = g_F there)."""
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)

    def strength_angle(img):
        sx = convolve2d(img, h3, mode="same")
        sy = convolve2d(img, h1, mode="same")
        g = np.sqrt(sx**2 + sy**2)
        ang = np.zeros_like(g)
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                ang[i, j] = math.pi / 2 if sx[i, j] == 0 else math.atan(sy[i, j] / sx[i, j])
        return g, ang

    ga, aa = strength_angle(a)
    gb, ab = strength_angle(b)
    gf, af = strength_angle(f)
    num = den = 0.0
    for gs, as_ in ((ga, aa), (gb, ab)):
        for i in range(f.shape[0]):
            for j in range(f.shape[1]):
                if gs[i, j] > gf[i, j]:
                    g = gf[i, j] / gs[i, j]
                elif gs[i, j] == gf[i, j]:
                    g = 1.0
                else:
                    g = gs[i, j] / gf[i, j]
                o = 1 - abs(as_[i, j] - af[i, j]) / (math.pi / 2)
                q = tg / (1 + math.exp(kg * (g - dg))) * ta / (1 + math.exp(ka * (o - da)))
                num += q * gs[i, j]
                den += gs[i, j]
    return num / den


def naive_vifp(ref: np.ndarray, dist: np.ndarray) -> float:
    """``vifp_mscale.m`` (Sheikh & Bovik, LIVE) with explicit 2D filters."""
    sigma_nsq, num, den = 2.0, 0.0, 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        win = _fspecial_gaussian(n, n / 5.0)
        if scale > 1:
            ref = _filter2(win, ref, "valid")[::2, ::2]
            dist = _filter2(win, dist, "valid")[::2, ::2]
        mu1, mu2 = _filter2(win, ref, "valid"), _filter2(win, dist, "valid")
        s1 = _filter2(win, ref * ref, "valid") - mu1 * mu1
        s2 = _filter2(win, dist * dist, "valid") - mu2 * mu2
        s12 = _filter2(win, ref * dist, "valid") - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        g[s1 < 1e-10] = 0
        sv[s1 < 1e-10] = s2[s1 < 1e-10]
        s1[s1 < 1e-10] = 0
        g[s2 < 1e-10] = 0
        sv[s2 < 1e-10] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= 1e-10] = 1e-10
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    return num / den


def naive_piella(a: np.ndarray, b: np.ndarray, f: np.ndarray, sw: int) -> float:
    """Liu et al.'s ``metricPeilla.m`` (sw 1: Q0, 2: QW, 3: QE with alpha = 1) with
    ``ssim_index.m`` statistics computed window by window."""
    if sw == 3:
        fx = np.array([[1, 0, -1]] * 3, float)
        fy = fx.T

        def edge(img):
            return np.sqrt(_filter2(fx, img, "same") ** 2 + _filter2(fy, img, "same") ** 2)

        return naive_piella(edge(a), edge(b), edge(f), 2)
    win = _fspecial_gaussian(11, 1.5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    rows, cols = a.shape[0] - 10, a.shape[1] - 10
    q = np.zeros((rows, cols))
    sal = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            wa, wb, wf = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11], f[i:i + 11, j:j + 11]
            ma, mb, mf = (win * wa).sum(), (win * wb).sum(), (win * wf).sum()
            va = (win * wa * wa).sum() - ma * ma
            vb = (win * wb * wb).sum() - mb * mb
            vf = (win * wf * wf).sum() - mf * mf
            caf = (win * wa * wf).sum() - ma * mf
            cbf = (win * wb * wf).sum() - mb * mf
            s_af = ((2 * mf * ma + c1) * (2 * caf + c2)) / ((mf**2 + ma**2 + c1) * (vf + va + c2))
            s_bf = ((2 * mf * mb + c1) * (2 * cbf + c2)) / ((mf**2 + mb**2 + c1) * (vf + vb + c2))
            # saliency: round-off of flat windows counts as 0 (MedFusion's documented
            # convention), then metricPeilla's +0.5 where both are flat
            sa, sb = (0.0 if va < 1e-6 else va), (0.0 if vb < 1e-6 else vb)
            if sa + sb == 0:
                sa, sb = 0.5, 0.5
            lam = sa / (sa + sb)
            q[i, j] = lam * s_af + (1 - lam) * s_bf
            sal[i, j] = max(sa, sb)
    if sw == 1:
        return float(q.mean())
    return float((sal / sal.sum() * q).sum())


def _naive_fmi_pair(s_sub: np.ndarray, f_sub: np.ndarray) -> float:
    """One window of Haghighat's ``fmi.m`` (fast-FMI), the full l x l joint-PDF grid."""
    length = s_sub.size
    s = s_sub.flatten(order="F").astype(float)
    f = f_sub.flatten(order="F").astype(float)
    s = np.ones(length) if s.max() == s.min() else (s - s.min()) / (s.max() - s.min())
    f = np.ones(length) if f.max() == f.min() else (f - f.min()) / (f.max() - f.min())
    sp, fp = s / s.sum(), f / f.sum()
    sc, fc = np.cumsum(sp), np.cumsum(fp)
    st, ft = sp - sp.mean(), fp - fp.mean()
    c = 0.0 if (st * ft).sum() == 0 else (st * ft).sum() / math.sqrt((st**2).sum() * (ft**2).sum())
    i = np.arange(1, length + 1)
    s_sd = math.sqrt(max((i * i * sp).sum() - (i * sp).sum() ** 2, 0))
    f_sd = math.sqrt(max((i * i * fp).sum() - (i * fp).sum() ** 2, 0))

    def bound(x, y):  # Frechet upper (c >= 0) or lower (c < 0) bound, as fmi.m writes them
        if c >= 0:
            return 0.5 * (x + y - abs(x - y))
        return 0.5 * (x + y - 1 + abs(x + y - 1))

    # the l x l grid of (fused CDF p, source CDF q) pairs, as fmi.m's matrices
    grid = bound(fc[:, None], sc[None, :])
    if (c >= 0 and (c == 0 or s_sd == 0 or f_sd == 0)) or (c < 0 and (s_sd == 0 or f_sd == 0)):
        phi = 0.0
    else:
        cov = float((grid - fc[:, None] * sc[None, :]).sum())
        phi = c / (cov / (f_sd * s_sd))
    # the joint PDF's upper part: the grid's second difference, bound(p - 1, .) = 0 at p = 0
    padded = np.zeros((length + 1, length + 1))
    padded[1:, 1:] = grid
    up = padded[1:, 1:] - padded[:-1, 1:] - padded[1:, :-1] + padded[:-1, :-1]
    jp = phi * up + (1 - phi) * fp[:, None] * sp[None, :]
    jp = jp[jp != 0]
    joint = float(-(jp * np.log2(np.abs(jp))).sum())
    h_s = -sum(v * math.log2(v) for v in sp if v != 0)
    h_f = -sum(v * math.log2(v) for v in fp if v != 0)
    mi = h_s + h_f - joint
    return 0.0 if mi == 0 else 2 * mi / (h_s + h_f)


def naive_fmi(a: np.ndarray, b: np.ndarray, f: np.ndarray, w: int = 3) -> float:
    """Haghighat's ``fmi.m`` (feature 'none'), window by window, including its reuse of the
    normalised fused window in the second source's equality test."""
    half = w // 2
    rows, cols = a.shape
    values = []
    for p in range(half, rows - half):
        for q in range(half, cols - half):
            sa = a[p - half:p + half + 1, q - half:q + half + 1]
            sb = b[p - half:p + half + 1, q - half:q + half + 1]
            sf = f[p - half:p + half + 1, q - half:q + half + 1]
            if np.array_equal(sa, sf):
                v_a = 1.0
            else:
                v_a = _naive_fmi_pair(sa, sf)
                sf = (np.ones_like(sf) if sf.max() == sf.min()
                      else (sf - sf.min()) / (sf.max() - sf.min()))
            v_b = 1.0 if np.array_equal(sb, sf) else _naive_fmi_pair(sb, sf)
            values.append((v_a + v_b) / 2)
    return float(np.mean(values))


def naive_qncie(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Liu et al.'s ``metricWang.m``: min-max to 0..255 (rounded), NCC from 256x256 joint
    histograms, eigenvalues of the 3x3 NCC matrix, NCIE = 1 - H_R."""
    def norm(x):
        # MATLAB round(): halves away from zero
        return np.floor((x - x.min()) / (x.max() - x.min()) * 255 + 0.5)

    def ncc(x, y):
        h = np.zeros((256, 256))
        for u, v in zip(x.ravel().astype(int), y.ravel().astype(int), strict=True):
            h[u, v] += 1
        h /= h.sum()
        px, py = h.sum(1), h.sum(0)
        hx = -sum(p * math.log2(p) for p in px if p > 0)
        hy = -sum(p * math.log2(p) for p in py if p > 0)
        hxy = -sum(p * math.log2(p) for p in h.ravel() if p > 0)
        return (hx + hy - hxy) / math.log2(256)

    a, b, f = norm(a), norm(b), norm(f)
    r = np.array([[1, ncc(a, b), ncc(a, f)], [ncc(a, b), 1, ncc(b, f)],
                  [ncc(a, f), ncc(b, f), 1]])
    lam = np.linalg.eig(r)[0].real
    hr = -sum(v / 3 * math.log2(v / 3) for v in lam if v > 0) / math.log2(256)
    return 1 - hr


# --- agreement tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crop_pair(aanlib):
    """A 48x48 brain-edge crop of a real CT-MRI pair and its average fusion (0-255 floats)."""
    from PIL import Image

    ct = np.asarray(Image.open(aanlib / "CT-MRI" / "CT" / "20005.png").convert("L"), float)
    mri = np.asarray(Image.open(aanlib / "CT-MRI" / "MRI" / "20005.png").convert("L"), float)
    a, b = ct[100:148, 40:88], mri[100:148, 40:88]
    return a, b, (a + b) / 2


def test_fmi_matches_fmi_m_window_by_window(crop_pair):
    a, b, f = crop_pair
    small = (slice(0, 24), slice(0, 24))
    assert M.fmi(f[small], a[small], b[small]) == pytest.approx(
        naive_fmi(a[small], b[small], f[small]), abs=1e-10)
    # a max fusion equals one source in many windows: exercises the equality shortcut
    fmax = np.maximum(a, b)[small]
    assert M.fmi(fmax, a[small], b[small]) == pytest.approx(
        naive_fmi(a[small], b[small], fmax), abs=1e-10)


def test_fmi_window_pairs_cover_negative_correlation_and_ties():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 256, (400, 9)).astype(float)
    f = 255 - s + rng.normal(0, 30, s.shape)  # mostly c < 0: the lower Frechet bound
    # few grey levels: many tied CDF breakpoints between and within the two windows
    s_ties = rng.integers(0, 3, (400, 9)).astype(float)
    f_ties = rng.integers(0, 3, (400, 9)).astype(float)
    s, f = np.concatenate([s, s_ties]), np.concatenate([f, f_ties])
    from medfusion.metrics._compiled import nmi_of_windows

    # window pair k side by side in 3 x 3n maps (values in column-major order, as fmi.m's (:));
    # only the windows at columns 3k are computed
    count = len(s)
    s_map = s.reshape(count, 3, 3).transpose(2, 0, 1).reshape(3, 3 * count)
    f_map = f.reshape(count, 3, 3).transpose(2, 0, 1).reshape(3, 3 * count)
    todo = np.zeros((1, 3 * count - 2), dtype=bool)
    todo[0, ::3] = True
    out = np.zeros(todo.shape)
    nmi_of_windows(f_map, s_map[None].copy(), todo, 3, out)
    fast = out[0, ::3]
    slow = [_naive_fmi_pair(s[k].reshape(3, 3, order="F"), f[k].reshape(3, 3, order="F"))
            for k in range(len(s))]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_fmi_keeps_the_normalised_fused_window_quirk():
    """fmi.m compares later sources with the min-max normalised fused window once a source
    differed: with F = 5 B + 3 and B in {0, 1}, B equals that window wherever it has both
    levels, and fmi.m counts 1 there."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (14, 14)).astype(float)
    b = rng.integers(0, 2, (14, 14)).astype(float)
    f = 5 * b + 3
    assert M.fmi(f, a, b) == pytest.approx(naive_fmi(a, b, f), abs=1e-10)
    from medfusion.metrics.information import _equal_to_normalised, _FeatureWindows

    matches = _equal_to_normalised(_FeatureWindows(b, 3), _FeatureWindows(f, 3),
                                   np.ones((12, 12), dtype=bool))
    windows = np.lib.stride_tricks.sliding_window_view(b, (3, 3))
    both_levels = windows.min(axis=(2, 3)) == 0
    both_levels &= windows.max(axis=(2, 3)) == 1
    np.testing.assert_array_equal(matches, both_levels | (windows.min(axis=(2, 3)) == 1))


def test_fmi_5x5_window_matches_fmi_m():
    rng = np.random.default_rng(11)
    a, b = rng.integers(0, 256, (2, 9, 10)).astype(float)
    f = np.maximum(a, b)
    f[:4, :4] = a[:4, :4]  # some windows equal to a source
    assert M.fmi(f, a, b, window=5) == pytest.approx(naive_fmi(a, b, f, w=5), abs=1e-10)


def test_qabf_matches_pixel_loops(crop_pair):
    a, b, f = crop_pair
    assert M.qabf(f, a, b) == pytest.approx(naive_qabf(a, b, f), abs=1e-12)


def test_vif_matches_explicit_filters(crop_pair):
    a, b, f = crop_pair
    expected = naive_vifp(a, f) + naive_vifp(b, f)
    assert M.vif(f, a, b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("sw, func", [(1, M.q0), (2, M.qw), (3, M.qe)])
def test_piella_matches_window_loops(crop_pair, sw, func):
    a, b, f = crop_pair
    assert func(f, a, b) == pytest.approx(naive_piella(a, b, f, sw), rel=1e-9)


def test_qncie_matches_metric_wang(crop_pair):
    a, b, f = crop_pair
    assert M.qncie(f, a, b) == pytest.approx(naive_qncie(a, b, f), abs=1e-10)
