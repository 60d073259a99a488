"""Information-theory metrics: EN, H (cross-entropy), MI, NMI, QNCIE, FMI.

All histogram metrics quantise the 0-255 grey scale (see ``_common``) into ``bins`` bins
(default 256, one per 8-bit level). ``normalize`` stretches each image's own min..max to
0..255 first, as the reference MATLAB codes of MI, NMI and QNCIE (VIFB, Liu et al.) do.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft

from medfusion.metrics import _compiled
from medfusion.metrics._common import (
    GREY_MAX,
    MetricInputError,
    entropy_of,
    grey_levels,
    histogram,
    joint_histogram,
    prepare,
    shared,
    too_small,
    undefined,
)


def entropy(
    img: object,
    bins: int = 256,
    data_range: float = GREY_MAX,
    base: float = 2.0,
) -> float:
    """EN (ENT): Shannon entropy of the grey-level histogram, ``-sum_l p_l log_b p_l``.

    Reference: Roberts, van Aardt & Ahmed, J. Appl. Remote Sens. 2 (2008); VIFB
    ``metricsEntropy`` (256 bins of the 8-bit image, bits). Range ``[0, log_b(bins)]``
    (8 bits for 256 bins); higher is better (more information). Knobs: ``bins``, ``base``
    (2: bits, e: nats), ``data_range``.
    """
    image, _ = prepare(img, [], data_range, min_sources=0)
    return entropy_of(histogram(_levels(image, bins, False), bins), base)


def _levels(image: np.ndarray, bins: int, normalize: bool) -> np.ndarray:
    """:func:`grey_levels`, shared by the histogram metrics of one ``compute_metrics`` call."""
    return shared(("levels", bins, normalize), (image,),
                  lambda: grey_levels(image, bins, normalize))


def _entropies_nats(a: np.ndarray, b: np.ndarray, bins: int,
                    normalize: bool) -> tuple[float, float, float]:
    """``(H(a), H(b), H(a, b))`` in nats from one joint histogram (shared by MI, NMI, QNCIE)."""
    def compute() -> tuple[float, float, float]:
        joint = joint_histogram(_levels(a, bins, normalize), _levels(b, bins, normalize), bins)
        return (entropy_of(joint.sum(axis=1), np.e), entropy_of(joint.sum(axis=0), np.e),
                entropy_of(joint, np.e))

    return shared(("entropies", bins, normalize), (a, b), compute)


def _mutual_information_pair(
    a: np.ndarray, b: np.ndarray, bins: int, normalize: bool, base: float
) -> tuple[float, float, float]:
    """Return ``(MI(a, b), H(a), H(b))`` in base ``base`` from one joint histogram."""
    unit = np.log(base)
    h_a, h_b, h_ab = (h / unit for h in _entropies_nats(a, b, bins, normalize))
    return h_a + h_b - h_ab, h_a, h_b


def mutual_information(
    fused: object,
    *sources: object,
    base: float = 2.0,
    bins: int = 256,
    normalize: bool = True,
    data_range: float = GREY_MAX,
) -> float:
    """MI: sum over sources of ``MI(S, F) = H(S) + H(F) - H(S, F)`` (joint histogram).

    Reference: Qu, Zhang & Yan, Electron. Lett. 38 (2002); VIFB ``metricsMutinf`` and Zhou et
    al.'s review (sum over the two sources). Range ``[0, K*log_b(bins)]`` for K sources;
    higher is better. Knobs: ``base`` (VIFB's code uses nats, Liu/MEFB bits; default bits),
    ``bins``, ``normalize`` (min-max stretch of each image first, as VIFB and Liu do).
    With one source (e.g. a target image) it is plain ``MI(T, F)``.
    """
    image, checked = prepare(fused, sources, data_range)
    return float(sum(_mutual_information_pair(s, image, bins, normalize, base)[0]
                     for s in checked))


def normalized_mutual_information(
    fused: object,
    *sources: object,
    base: float = 2.0,
    bins: int = 256,
    normalize: bool = True,
    data_range: float = GREY_MAX,
) -> float:
    """NMI (Hossny's revised MI): ``2 * sum_S MI(S, F) / (H(S) + H(F))``.

    Reference: Hossny, Nahavandi & Creighton, Electron. Lett. 44 (2008); Liu et al.'s
    ``metricMI`` (sw=1) as used by MEFB ``metricsNMI`` and Zhou et al.'s review. Range
    ``[0, K]`` for K sources (each term is at most 1, reached when F equals that source);
    higher is better; independent of ``base``. Undefined (NaN + warning) when a source and F
    are both constant.
    """
    image, checked = prepare(fused, sources, data_range)
    total = 0.0
    for source in checked:
        mi, h_s, h_f = _mutual_information_pair(source, image, bins, normalize, base)
        if h_s + h_f == 0:
            return undefined("NMI", "a source and the fused image are both constant")
        total += mi / (h_s + h_f)
    return 2.0 * total


def cross_entropy(
    fused: object,
    *sources: object,
    bins: int = 256,
    base: float = 2.0,
    data_range: float = GREY_MAX,
) -> float:
    """H (CE): mean over sources of the cross-entropy ``sum_l p_S(l) log(p_S(l) / p_F(l))``.

    Reference: Bulanon, Burks & Alchanatis, Biosyst. Eng. 103 (2009); VIFB
    ``metricsCross_entropy`` (levels where either histogram is empty are skipped; mean of
    the two sources). The seed paper (Li et al. 2021) lists "H" beside ENT without a formula;
    MedFusion reads it as this cross-entropy, the field's usual histogram-divergence metric.
    Range ``[0, inf)``; lower is better (0 when the histograms agree).
    """
    image, checked = prepare(fused, sources, data_range)
    p_f = histogram(_levels(image, bins, False), bins)
    values = []
    for source in checked:
        p_s = histogram(_levels(source, bins, False), bins)
        keep = (p_s > 0) & (p_f > 0)
        values.append(float((p_s[keep] * np.log(p_s[keep] / p_f[keep])).sum() / np.log(base)))
    return float(np.mean(values))


def qncie(
    fused: object,
    *sources: object,
    bins: int = 256,
    normalize: bool = True,
    data_range: float = GREY_MAX,
) -> float:
    """QNCIE: nonlinear correlation information entropy of the sources and the fused image.

    ``NCC(X, Y) = H(X) + H(Y) - H(X, Y)`` with logarithms base ``b = bins`` (MI in units of
    ``log b``); ``R`` is the (K+1)x(K+1) matrix of NCCs (1 on the diagonal) of the sources and
    F; with its eigenvalues ``lambda_i``: ``QNCIE = 1 + sum_i (lambda_i/n) log_b(lambda_i/n)``,
    ``n = K+1``. Reference: Wang, Shen & Jin, "Performance evaluation of image fusion
    techniques" (2008); Liu et al.'s ``metricWang`` (b = 256, min-max normalised images).
    Range ``[0, 1]``; higher is better.
    """
    image, checked = prepare(fused, sources, data_range)
    images = [*checked, image]
    n = len(images)
    r = np.eye(n)
    log_b = np.log(bins)
    for i in range(n):
        for j in range(i + 1, n):
            h_i, h_j, h_ij = _entropies_nats(images[i], images[j], bins, normalize)
            ncc = (h_i + h_j - h_ij) / log_b
            r[i, j] = r[j, i] = ncc
    eig = np.clip(np.linalg.eigvalsh(r), 0.0, None) / n
    nz = eig[eig > 0]
    return float(1.0 + (nz * np.log(nz)).sum() / log_b)


# --- FMI -----------------------------------------------------------------------------------
#
# Only windows whose value is not known in advance are computed: equal windows give 1, a
# constant window gives 0 (fmi.m's Pearson c is 0 there, so its joint PDF is the product of the
# marginals and its MI is 0 up to round-off). Those are decided on the whole image with boolean
# window filters; the rest, window pair by window pair, in compiled code
# (``_compiled.nmi_of_windows``).


def _features(image: np.ndarray, feature: str) -> np.ndarray:
    """Feature map of Haghighat's FMI: raw pixels, MATLAB ``gradient`` (x) or ``dct2``."""
    if feature == "none":
        return image
    if feature == "gradient":
        return np.gradient(image, axis=1)
    if feature == "dct":
        return sfft.dctn(image, norm="ortho")
    raise MetricInputError(f"FMI feature must be 'none', 'gradient' or 'dct', got {feature!r}")


def _any_in_windows(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Per ``rows x cols`` window ('valid' positions, by top-left corner): any True inside?"""
    out = mask[:mask.shape[0] - rows + 1]
    for k in range(1, rows):
        out = out | mask[k:mask.shape[0] - rows + 1 + k]
    result = out[:, :out.shape[1] - cols + 1]
    for k in range(1, cols):
        result = result | out[:, k:out.shape[1] - cols + 1 + k]
    return result


class _FeatureWindows:
    """All ``side x side`` windows of a feature map: which are constant, and the values of
    selected windows as an (l, n) array in fmi.m's column-major window order."""

    def __init__(self, feature_map: np.ndarray, side: int) -> None:
        rows, cols = feature_map.shape
        self.map = np.ascontiguousarray(feature_map)
        self.side = side
        self.shape = (rows - side + 1, cols - side + 1)
        steps_x = self.map[:, 1:] != self.map[:, :-1]
        steps_y = self.map[1:] != self.map[:-1]
        self.constant = ~(_any_in_windows(steps_x, side, side - 1)
                          | _any_in_windows(steps_y, side - 1, side))
        # flat offset of window element k = j*side + i (row i, column j) from the window corner
        i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        self._offsets = (i * cols + j).ravel(order="F")
        self._cols = cols

    def take(self, flat_windows: np.ndarray) -> np.ndarray:
        """Values of windows given by flat indices into the window grid: shape (l, n)."""
        corner = (flat_windows // self.shape[1]) * self._cols + flat_windows % self.shape[1]
        return np.take(self.map, self._offsets[:, None] + corner[None, :])


def _equal_to_normalised(src: _FeatureWindows, fus: _FeatureWindows,
                         windows: np.ndarray) -> np.ndarray:
    """fmi.m's test of a source window against the min-max normalised fused window.

    Only windows whose source values lie in 0..1 and include a 1 can match (the normalised
    window spans 0..1, or is all ones for a constant fused window); those few are compared
    value by value, with fmi.m's operations so that the floats are the same.
    """
    side = src.side
    result = np.zeros(src.shape, dtype=bool)
    ones = src.map == 1
    if not ones.any():
        return result
    outside = (src.map < 0) | (src.map > 1)
    possible = (windows & _any_in_windows(ones, side, side)
                & ~_any_in_windows(outside, side, side))
    flat = np.flatnonzero(possible)
    if flat.size:
        f_values = fus.take(flat)
        low = f_values.min(axis=0)
        span = f_values.max(axis=0) - low
        normalised = np.where(span == 0, 1.0, (f_values - low) / np.where(span == 0, 1.0, span))
        result.ravel()[flat] = (src.take(flat) == normalised).all(axis=0)
    return result


def feature_mutual_information(
    fused: object,
    *sources: object,
    feature: str = "none",
    window: int = 3,
    data_range: float = GREY_MAX,
) -> float:
    """FMI: mean over w x w sliding windows of the mean over sources of the windows' NMI.

    Per window and source: ``FMI_SF = 2 MI(S_w, F_w) / (H(S_w) + H(F_w))`` on the windows'
    features treated as PDFs (fast-FMI joint-PDF estimate); 1 where the windows are equal.
    Reference: Haghighat, Aghagolzadeh & Seyedarabi, Comput. Electr. Eng. 37 (2011) and
    Haghighat & Razian, fast-FMI (AICT 2014); their ``fmi.m`` (default ``feature='none'``,
    ``w=3``: "FMI_pixel"). Range ``[0, 1]``; higher is better. Knobs: ``feature`` ('none',
    'gradient', 'dct'; MEFB's 'wavelet' default is not provided), ``window``. NaN + warning
    for images smaller than the window.
    """
    if window < 2:
        raise MetricInputError(f"FMI window must be at least 2, got {window}")
    image, checked = prepare(fused, sources, data_range)
    side = 2 * (window // 2) + 1  # fmi.m uses w = 2*floor(w/2)+1 pixels per side
    if min(image.shape) < side:
        return too_small("FMI", image.shape, side)
    f_map = _features(image, feature)
    fus = _FeatureWindows(f_map, side)
    values = np.empty((len(checked), *fus.shape))  # per source: 1 equal, 0 constant, or NMI
    todo = np.empty(values.shape, dtype=bool)  # ... or to be computed
    s_maps = np.empty((len(checked), *f_map.shape))
    differed = np.zeros(fus.shape, dtype=bool)  # an earlier source's window differed
    for k, source in enumerate(checked):
        s_maps[k] = _features(source, feature)
        src = _FeatureWindows(s_maps[k], side)
        equal = ~_any_in_windows(s_maps[k] != f_map, side, side)
        if differed.any():
            # fmi.m quirk kept for exact agreement: once a source's window differed from the
            # fused window, later sources are compared with the min-max normalised fused window
            equal = np.where(differed, _equal_to_normalised(src, fus, differed), equal)
        values[k] = equal
        np.logical_not(equal, out=todo[k])
        todo[k] &= ~src.constant & ~fus.constant
        differed |= ~equal
    _compiled.nmi_of_windows(fus.map, s_maps, todo.reshape(len(checked), -1), side,
                             values.reshape(len(checked), -1))
    total = values.sum(axis=0)
    return float(total.mean() / len(checked))
