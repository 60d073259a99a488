"""Structure and edge metrics: SSIM, Piella's Q0 / QW / QE, and Xydeas-Petrovic QAB/F."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfusion.metrics import _compiled
from medfusion.metrics._common import (
    GREY_MAX,
    MetricInputError,
    gaussian_kernel,
    pad_border,
    prepare,
    reduce_over_sources,
    shared,
    too_small,
    undefined,
)

_K1, _K2 = 0.01, 0.03
_FLAT_VARIANCE = 1e-6  # grey levels^2; far below any real texture (one level of noise is ~0.08)


def _window(window: str, win_size: int | None) -> tuple[np.ndarray, bool]:
    """1D kernel and whether covariances are sample (N-1) estimates.

    ``"gaussian"``: Wang et al.'s 11x11, sigma 1.5 window, population moments (MATLAB
    ``ssim_index``). ``"uniform"``: a ``win_size`` box (default 7) with sample covariance, as
    scikit-image's ``structural_similarity`` defaults.
    """
    if window == "gaussian":
        return gaussian_kernel(win_size or 11, 1.5), False
    if window == "uniform":
        size = win_size or 7
        return np.full(size, 1.0 / size), True
    raise MetricInputError(f"window must be 'gaussian' or 'uniform', got {window!r}")


class _LocalStats:
    """Windowed means, variances and SSIM maps of images for one window; reused across metrics
    of one ``compute_metrics`` call through ``_common.shared``."""

    def __init__(self, kernel: np.ndarray, sample: bool) -> None:
        self.kernel = kernel
        self.norm = kernel.size**2 / (kernel.size**2 - 1.0) if sample else 1.0
        self.key = (kernel.tobytes(), sample)

    def moments(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windowed mean and variance, computed together (one pass over the image)."""
        return shared(("moments", *self.key), (image,),
                      lambda: _compiled.moments_valid(image, self.kernel, self.norm))

    def mean(self, image: np.ndarray) -> np.ndarray:
        return self.moments(image)[0]

    def var(self, image: np.ndarray) -> np.ndarray:
        return self.moments(image)[1]

    def cov(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Windowed covariance, a new array (the callers change it in place)."""
        return _compiled.covariance_valid(x, y, self.kernel, self.mean(x), self.mean(y),
                                          self.norm)

    def ssim_map(self, x: np.ndarray, y: np.ndarray, stabilized: bool = True) -> np.ndarray:
        """SSIM map (``stabilized``) or Wang & Bovik's UIQI map (C1 = C2 = 0); symmetric."""
        pair = (x, y) if id(x) <= id(y) else (y, x)
        return shared(("ssim", stabilized, *self.key), pair,
                      lambda: self._ssim_map(*pair, stabilized))

    def _ssim_map(self, x: np.ndarray, y: np.ndarray, stabilized: bool) -> np.ndarray:
        mx, my = self.mean(x), self.mean(y)
        vx, vy, cxy = self.var(x), self.var(y), self.cov(x, y)
        if stabilized:
            c1, c2 = (_K1 * GREY_MAX) ** 2, (_K2 * GREY_MAX) ** 2
            return _compiled.ssim_map(mx, my, vx, vy, cxy, c1, c2)
        # img_qi.m degenerate cases: flat windows compare means only, black windows contrast only
        var_sum, mean_sq = vx + vy, mx * mx + my * my
        q = np.ones_like(mx)
        both = (var_sum != 0) & (mean_sq != 0)
        q[both] = 4 * cxy[both] * mx[both] * my[both] / (var_sum[both] * mean_sq[both])
        flat = (var_sum == 0) & (mean_sq != 0)
        q[flat] = 2 * mx[flat] * my[flat] / mean_sq[flat]
        dark = (var_sum != 0) & (mean_sq == 0)
        q[dark] = 2 * cxy[dark] / var_sum[dark]
        return q


def ssim(
    fused: object,
    *sources: object,
    data_range: float = GREY_MAX,
    window: str = "gaussian",
    reduce: str = "sum",
    win_size: int | None = None,
) -> float:
    """SSIM: structural similarity of F to each source, combined over sources.

    ``SSIM(x, y) = mean_w [(2 mu_x mu_y + C1)(2 s_xy + C2)] / [(mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2
    + C2)]``, C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 255 after scaling; mean over the valid
    windows. Reference: Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 13 (2004). Defaults follow
    VIFB ``metricsSsim``: Gaussian 11/1.5 window, ``reduce="sum"`` (SSIM(A,F) + SSIM(B,F));
    ``reduce="mean"`` averages instead; ``window="uniform"`` is scikit-image's 7x7 box with sample
    covariance. Range [-K, K] for sum (K sources), [-1, 1] for mean; higher is better.
    """
    kernel, sample = _window(window, win_size)
    image, checked = prepare(fused, sources, data_range)
    if min(image.shape) < kernel.size:
        return too_small("SSIM", image.shape, kernel.size)
    stats = _LocalStats(kernel, sample)
    values = [float(stats.ssim_map(s, image).mean()) for s in checked]
    return reduce_over_sources(values, reduce)


def _piella_terms(
    image: np.ndarray, checked: Sequence[np.ndarray], stats: _LocalStats, stabilized: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Saliency-weighted quality map ``sum_i lambda_i Q(S_i, F | w)`` and saliency ``max_i s_i``.

    Saliency is the local variance (values below 1e-6 grey levels^2 are round-off and count as
    0); windows where every source is flat get equal weights and 0.5 added to each variance
    (Liu et al.'s ``metricPeilla`` convention).
    """
    return _compiled.piella_quality(tuple(stats.var(s) for s in checked),
                                    tuple(stats.ssim_map(image, s, stabilized) for s in checked),
                                    _FLAT_VARIANCE)


def _weighted_quality(image: np.ndarray, checked: Sequence[np.ndarray], window: str,
                      win_size: int | None, stabilized: bool) -> float:
    kernel, sample = _window(window, win_size)
    stats = _LocalStats(kernel, sample)
    quality, saliency = _piella_terms(image, checked, stats, stabilized)
    total = saliency.sum()
    if total == 0:
        return undefined("QW", "every source is constant")
    return float((saliency * quality).sum() / total)


def piella_q0(
    fused: object,
    *sources: object,
    data_range: float = GREY_MAX,
    window: str = "gaussian",
    win_size: int | None = None,
    stabilized: bool = True,
) -> float:
    """Q0: Piella's fusion quality index ``Q = mean_w sum_i lambda_i(w) Q0(S_i, F | w)``.

    ``lambda_i = s_i / sum_j s_j`` with the local variance as saliency ``s``. Reference:
    Piella & Heijmans, ICIP 2003; Liu et al.'s ``metricPeilla`` (sw=1), which uses the SSIM map
    (Gaussian 11/1.5, C1/C2 for 255) as local Q0. ``stabilized=False`` and
    ``window="uniform", win_size=8`` give Piella's original Wang-Bovik UIQI in 8x8 windows.
    Range [-1, 1]; higher is better.
    """
    kernel, sample = _window(window, win_size)
    image, checked = prepare(fused, sources, data_range)
    if min(image.shape) < kernel.size:
        return too_small("Q0", image.shape, kernel.size)
    quality, _ = _piella_terms(image, checked, _LocalStats(kernel, sample), stabilized)
    return float(quality.mean())


def piella_qw(
    fused: object,
    *sources: object,
    data_range: float = GREY_MAX,
    window: str = "gaussian",
    win_size: int | None = None,
    stabilized: bool = True,
) -> float:
    """QW: Piella's weighted fusion quality index, windows weighted by ``c(w) = max_i s_i(w)``.

    ``QW = sum_w c(w) sum_i lambda_i(w) Q0(S_i, F | w) / sum_w c(w)``. Reference: Piella &
    Heijmans, ICIP 2003; Liu et al.'s ``metricPeilla`` (sw=2), MEFB ``metricsQw``. Range
    [-1, 1]; higher is better. NaN + warning when every source is constant.
    """
    kernel, _ = _window(window, win_size)
    image, checked = prepare(fused, sources, data_range)
    if min(image.shape) < kernel.size:
        return too_small("QW", image.shape, kernel.size)
    return _weighted_quality(image, checked, window, win_size, stabilized)


def _prewitt_magnitude(image: np.ndarray) -> np.ndarray:
    """Liu's ``metricPeilla`` edge image: Prewitt magnitude, ``filter2`` 'same' (zero padding)."""
    return shared(("prewitt",), (image,),
                  lambda: _compiled.gradient_magnitude(pad_border(image, "constant"), 1.0))


def piella_qe(
    fused: object,
    *sources: object,
    data_range: float = GREY_MAX,
    alpha: float = 1.0,
    window: str = "gaussian",
    win_size: int | None = None,
    stabilized: bool = True,
) -> float:
    """QE: Piella's edge-dependent fusion quality ``QW(S, F)^(1-alpha) * QW(S', F')^alpha``.

    ``S'``, ``F'``: Prewitt edge magnitudes (zero padding). Reference: Piella & Heijmans, ICIP
    2003; Liu et al.'s ``metricPeilla`` (sw=3) and MEFB ``metricsQe`` use ``alpha = 1`` (the
    edge-image QW alone), the default here. Range [-1, 1] for alpha = 1; higher is better.
    """
    if not 0.0 <= alpha <= 1.0:
        raise MetricInputError(f"QE alpha must lie in [0, 1], got {alpha}")
    kernel, _ = _window(window, win_size)
    image, checked = prepare(fused, sources, data_range)
    if min(image.shape) < kernel.size:
        return too_small("QE", image.shape, kernel.size)
    edge_q = _weighted_quality(_prewitt_magnitude(image), [_prewitt_magnitude(s) for s in checked],
                               window, win_size, stabilized)
    if alpha == 1.0:
        return edge_q
    plain_q = _weighted_quality(image, checked, window, win_size, stabilized)
    return float(np.sign(plain_q) * abs(plain_q) ** (1.0 - alpha) * edge_q**alpha)


# --- QAB/F ---------------------------------------------------------------------------------

_TG, _KG, _DG = 0.9994, -15.0, 0.5
_TA, _KA, _DA = 0.9879, -22.0, 0.8


def _sobel_strength_orientation(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel edge strength and orientation ``atan(sy/sx)`` (pi/2 where sx == 0), zero padding.

    VIFB's ``conv2`` kernels h3 (x) and h1 (y): sx = left minus right column, sy = lower minus
    upper row (the signs matter: atan(sy/sx) is pinned to +pi/2 where sx == 0). Memoised within
    one ``compute_metrics`` call: the fused image's maps serve every source.
    """
    return shared(("sobel",), (image,), lambda: _sobel(image))


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    strength, ratio = _compiled.sobel_strength_ratio(pad_border(image, "constant"))
    return strength, np.arctan(ratio, out=ratio)


def _edge_preservation(g_s: np.ndarray, a_s: np.ndarray, g_f: np.ndarray,
                       a_f: np.ndarray) -> np.ndarray:
    """``Q^SF = Q_g(G^SF) * Q_a(A^SF)``: sigmoid-mapped strength and orientation agreement."""
    strength, orientation = _compiled.edge_agreement_exponents(g_s, a_s, g_f, a_f,
                                                               _KG, _DG, _KA, _DA)
    q = np.exp(strength, out=strength)
    q += 1.0
    q = np.divide(_TG, q, out=q)
    np.exp(orientation, out=orientation)
    orientation += 1.0
    q /= orientation
    q *= _TA
    return q


def edge_sums(source: np.ndarray, fused: np.ndarray) -> tuple[float, float]:
    """``(sum_px Q^SF g_S, sum_px g_S)`` of one prepared source against the fused image: the
    numerator and denominator of QAB/F (L = 1) and Q^{S/F}, shared by QABF, QSF_MIN and
    QSF_MAX within one ``compute_metrics`` call. Only the fused image's Sobel maps are kept for
    the other sources: each source's are needed once (two fewer full-size maps held per source)."""
    def compute() -> tuple[float, float]:
        g_s, a_s = _sobel(source)
        g_f, a_f = _sobel_strength_orientation(fused)
        q = _edge_preservation(g_s, a_s, g_f, a_f)
        return float(np.einsum("ij,ij->", q, g_s)), float(g_s.sum())

    return shared(("edge sums",), (source, fused), compute)


def qabf(fused: object, *sources: object, data_range: float = GREY_MAX, L: float = 1.0) -> float:
    """QAB/F: Xydeas-Petrovic edge-information preservation.

    ``QAB/F = sum_S sum_px Q^SF(px) w_S(px) / sum_S sum_px w_S(px)``, ``w_S = g_S^L``, where
    ``Q^SF`` maps the relative Sobel strength ``G = min(g_S, g_F)/max(g_S, g_F)`` and orientation
    agreement ``A = 1 - |a_S - a_F| / (pi/2)`` through sigmoids (Tg 0.9994, kg -15, Dg 0.5;
    Ta 0.9879, ka -22, Da 0.8). Reference: Xydeas & Petrovic, Electron. Lett. 36 (2000); VIFB
    ``metricsQabf`` (L = 1, 'same' zero-padded Sobel). VIFB's code sets G = g_F where
    g_S == g_F > 0 (a typo); here G = 1 there, as in the paper. Range [0, ~0.975] (the
    sigmoids' maximum, reached when F reproduces a source's edges); higher is better.
    NaN + warning when no source has any edge.
    """
    image, checked = prepare(fused, sources, data_range)
    numerator = denominator = 0.0
    for source in checked:
        if L == 1.0:
            part, weight_sum = edge_sums(source, image)
        else:
            g_s, a_s = _sobel_strength_orientation(source)
            g_f, a_f = _sobel_strength_orientation(image)
            weight = g_s**L
            part = float(np.einsum("ij,ij->", _edge_preservation(g_s, a_s, g_f, a_f), weight))
            weight_sum = float(weight.sum())
        numerator += part
        denominator += weight_sum
    if denominator == 0:
        return undefined("QABF", "no source has any edge (all constant)")
    return numerator / denominator
