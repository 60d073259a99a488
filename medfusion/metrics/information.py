"""Information-theory metrics: EN, H (cross-entropy), MI, NMI, QNCIE, FMI.

All histogram metrics quantise the 0-255 grey scale (see ``_common``) into ``bins`` bins
(default 256, one per 8-bit level). ``normalize`` stretches each image's own min..max to
0..255 first, as the reference MATLAB codes of MI, NMI and QNCIE (VIFB, Liu et al.) do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import fft as sfft

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
# Layout: the windows of one (source, fused) pair are columns of (l, n) arrays, l = w*w values
# in fmi.m's column-major order, n windows. Every step is then a handful of long row operations
# (no per-window Python, no short-row sorts or gathers). Only windows whose value is not known
# in advance are computed: equal windows give 1, a constant window gives 0 (fmi.m's Pearson c is
# 0 there, so its joint PDF is the product of the marginals and its MI is 0 up to round-off).

# Windows per block (~20 MB of work arrays). Long NumPy calls matter for threads: only the loops
# run without the GIL, so with 2048-window blocks two slices on two threads cost 1.7x the CPU of
# one after the other (the threads queue for the GIL between short calls); 8192: ~1.1x.
_FMI_CHUNK = 8192
_TINY = 1e-300  # p * log(|p| + _TINY) is p log|p| for |p| > 1e-284 (all that occur), 0 at 0


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


class _Workspace:
    """Work arrays of ``_fmi_pairs`` for blocks of up to ``count`` windows of ``length`` values,
    allocated once per FMI call and reused by every block.

    Why: fresh multi-100-kB NumPy temporaries are fresh pages from the OS (glibc returns freed
    heap tops), and their page faults cost more than the arithmetic (measured: ~14 000 minor
    faults and 2x the time per 256x256 FMI without reuse).
    """

    def __init__(self, length: int, count: int) -> None:
        self.length, self.count = length, count
        size = 2 * length
        rows = 2 * _comparators(length, length)  # merge network outputs: 2 per comparator
        # one block for all (freed as one: glibc then keeps such blocks on its heap)
        block = np.empty((6 * length + 11 * size + rows, count))
        parts = np.split(block, np.cumsum([4 * length, 2 * length, size, 2 * size, 8 * size]))
        self.pdfs = parts[0].reshape(4, length, count)  # source/fused PDFs and deviations
        self.short = parts[1].reshape(2, length, count)  # logs, the selected source PDF
        self.keys = parts[2]
        self.ints = parts[3].reshape(2, size, count).view(np.int64)
        self.floats = parts[4].reshape(8, size, count)
        self.rows = parts[5].view(np.int64)

    def view(self, count: int) -> _Workspace:
        """The same buffers cut to the first ``count`` windows."""
        out = object.__new__(_Workspace)
        out.length, out.count = self.length, count
        for name in ("pdfs", "short", "keys", "ints", "floats", "rows"):
            setattr(out, name, getattr(self, name)[..., :count])
        return out


def _comparators(m: int, n: int) -> int:
    """Number of comparators of :func:`_merge` for sequences of ``m`` and ``n`` rows."""
    if m == 0 or n == 0:
        return 0
    if m == 1 and n == 1:
        return 1
    even, odd = (m + 1) // 2 + (n + 1) // 2, m // 2 + n // 2
    return (_comparators((m + 1) // 2, (n + 1) // 2) + _comparators(m // 2, n // 2)
            + min(odd, even - 1))


def _window_pdfs(values: np.ndarray, pdf: np.ndarray, dev: np.ndarray,
                 logs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fmi.m's per-window marginal PDF (min-max, then sum-normalised; constant -> uniform) into
    ``pdf``, its deviation from the uniform PDF into ``dev``; returns the index standard
    deviation and the entropy (nats) per window."""
    length = values.shape[0]
    np.subtract(values, values.min(axis=0), out=pdf)
    total = pdf.sum(axis=0)
    flat = total == 0
    pdf /= np.where(flat, 1.0, total)
    if flat.any():
        pdf[:, flat] = 1.0 / length
    np.subtract(pdf, 1.0 / length, out=dev)
    index = np.arange(1, length + 1, dtype=np.float64)
    mean_index = index @ pdf
    sd = np.sqrt(np.maximum((index * index) @ pdf - mean_index * mean_index, 0.0))
    np.add(pdf, _TINY, out=logs)
    np.log(logs, out=logs)
    return sd, -np.einsum("kn,kn->n", pdf, logs)


def _plogp_sum(p: np.ndarray, logs: np.ndarray) -> np.ndarray:
    """Column sums of ``p ln|p|`` (0 where p == 0); ``logs`` is scratch of p's shape."""
    np.abs(p, out=logs)
    logs += _TINY
    np.log(logs, out=logs)
    return np.einsum("kn,kn->n", p, logs)


def _merge(a: list[np.ndarray], b: list[np.ndarray], rows: Iterator[np.ndarray]
           ) -> list[np.ndarray]:
    """Batcher's odd-even merge of two sorted sequences of rows (elementwise per column): a
    fixed network of ``minimum``/``maximum`` row operations (30 comparators for 9 + 9) whose
    outputs go to fresh rows taken from ``rows``."""
    if not a or not b:
        return a or b
    if len(a) == 1 and len(b) == 1:
        return [np.minimum(a[0], b[0], out=next(rows)), np.maximum(a[0], b[0], out=next(rows))]
    even = _merge(a[0::2], b[0::2], rows)
    odd = _merge(a[1::2], b[1::2], rows)
    pairs = min(len(odd), len(even) - 1)
    out = [even[0]]
    for i in range(pairs):
        out += [np.minimum(odd[i], even[i + 1], out=next(rows)),
                np.maximum(odd[i], even[i + 1], out=next(rows))]
    return out + even[pairs + 1:] + odd[pairs:]


def _fmi_pairs(src: np.ndarray, fus: np.ndarray, work: _Workspace | None = None) -> np.ndarray:
    """Fast-FMI normalised MI ``2 MI / (H_S + H_F)`` of each window pair (columns of ``src`` and
    ``fus``, (l, n) arrays of window values).

    Haghighat & Razian's fast-FMI: window values -> marginal PDFs (min-max, then sum-normalised),
    Pearson ``c`` of the PDFs, joint PDF ``w U + (1 - w) f a^T`` mixing the Frechet upper
    (c >= 0) or lower (c < 0) bound coupling ``U`` of the CDFs with the independent product,
    ``w = c / corr(U)``. Instead of fmi.m's l x l grid this uses that ``U`` is a monotone
    coupling: its mass sits on at most 2l cells, the gaps between the merged breakpoints of
    the two CDFs; the product part's entropy has a closed form. Same number (see the tests):
    the merge keys carry the breakpoint's label in their lowest mantissa bits (< 1e-14).
    Only arithmetic masks, bit operations and row operations, in reused buffers: ``np.where``
    on random masks and fresh temporaries are slow.
    """
    length, count = src.shape
    size = 2 * length
    work = _Workspace(length, count) if work is None else work.view(count)
    a_pdf, a_dev, f_pdf, f_dev = work.pdfs
    logs, a_pair = work.short
    a_sd, a_h = _window_pdfs(src, a_pdf, a_dev, logs)
    f_sd, f_h = _window_pdfs(fus, f_pdf, f_dev, logs)
    num = np.einsum("kn,kn->n", a_dev, f_dev)
    den = np.sqrt(np.einsum("kn,kn->n", a_dev, a_dev) * np.einsum("kn,kn->n", f_dev, f_dev))
    c = np.where(num == 0, 0.0, num / np.where(den > 0, den, 1.0))
    upper = c >= 0

    # The lower coupling of (f, a) (c < 0) is the upper coupling of (f, reversed a): pick a or
    # its reverse per window with bit masks (exact). Merge keys: the float bits of 1 + CDF
    # (monotone, one exponent, no subnormal numbers) with a label in the low bits, f's labels
    # below a's so that ties keep f's breakpoint first; a's labels have the ``a_flag`` bit set.
    own_bits = (length - 1).bit_length()
    a_flag = 1 << own_bits
    label_bits = 2 * a_flag - 1
    keep = -upper.astype(np.int64)  # all ones where c >= 0
    pair_bits = a_pair.view(np.int64)
    np.bitwise_and(a_pdf.view(np.int64), keep, out=pair_bits)
    pair_bits |= a_pdf[::-1].view(np.int64) & ~keep
    keys = work.keys
    np.add(f_pdf[0], 1.0, out=keys[0])
    np.add(a_pair[0], 1.0, out=keys[length])
    for k in range(1, length):
        np.add(keys[k - 1], f_pdf[k], out=keys[k])
        np.add(keys[length + k - 1], a_pair[k], out=keys[length + k])
    steps = np.arange(length, 0, -1, dtype=np.float64)
    sum_f_cdf = steps @ f_pdf  # sum_k F_k
    sum_a_cdf = steps @ a_pdf  # a's CDF in its own order
    int_keys = keys.view(np.int64)
    int_keys &= ~label_bits
    int_keys[:length] |= np.arange(length, dtype=np.int64)[:, None]
    int_keys[length:] |= (a_flag + np.arange(length, dtype=np.int64))[:, None]
    merged, scratch = work.ints
    np.stack(_merge(list(int_keys[:length]), list(int_keys[length:]), iter(work.rows)),
             out=merged)
    values, mass, is_a, own, f_before, a_before, f_next, a_next = work.floats
    np.subtract(merged.view(np.float64), 1.0, out=values)  # sorted CDF breakpoints, exact
    mass[0] = values[0]  # gap k = (values[k-1], values[k]]: one cell (p, q) of U
    np.subtract(values[1:], values[:-1], out=mass[1:])
    np.bitwise_and(merged, a_flag, out=scratch)
    np.multiply(scratch, 2.0 / a_flag, out=is_a)  # 2 where a's breakpoint, else 0
    np.bitwise_and(merged, a_flag - 1, out=scratch)
    np.copyto(own, scratch)  # the breakpoint's own index in its CDF

    # the cell of gap k: f_p, a_q are the lengths of the f- and a-CDF steps around the gap,
    # found by running max (last breakpoint before) / min (next one at or after) scans
    np.multiply(values, is_a, out=a_before)
    a_before *= 0.5  # values where a, else 0
    np.subtract(values, a_before, out=f_before)  # values where f, else 0
    np.add(values, is_a, out=f_next)  # a's breakpoints pushed above every CDF value (<= 1) ...
    np.subtract(values, is_a, out=a_next)
    a_next += 2.0  # ... and f's for the scan of a
    before, ahead = work.floats[4:6], work.floats[6:8]  # (f, a) pairs: one row op for both
    for k in range(1, size):
        np.maximum(before[:, k - 1], before[:, k], out=before[:, k])
    for k in range(size - 2, -1, -1):
        np.minimum(ahead[:, k + 1], ahead[:, k], out=ahead[:, k])
    cell = f_next
    cell[1:] -= f_before[:-1]  # f's last breakpoint strictly before the gap's end
    a_next[1:] -= a_before[:-1]
    cell *= a_next

    # sum_ij min(F_i, A_j) = sum over gaps of mass (l - p)(l - q); a breakpoint at position k
    # that is F_p has q = k - p, one that is A_q has p = k - q: the same product from ``own``
    np.subtract(length, own, out=f_before)
    own += (length - np.arange(size, dtype=np.float64))[:, None]
    sum_min = np.einsum("kn,kn,kn->n", mass, f_before, own)
    cov_bound = (np.where(upper, sum_min, (length + 1) * sum_f_cdf - sum_min)
                 - sum_f_cdf * sum_a_cdf)
    sd_ok = (a_sd > 0) & (f_sd > 0) & (c != 0)
    corr_bound = cov_bound / np.where(sd_ok, f_sd * a_sd, 1.0)
    weight = np.where(sd_ok & (corr_bound != 0), c / np.where(corr_bound != 0, corr_bound, 1.0),
                      0.0)

    cell *= 1.0 - weight  # the product part on the coupling's cells
    mass *= weight
    mass += cell  # the joint PDF there
    correction = _plogp_sum(cell, a_before) - _plogp_sum(mass, a_before)
    total = a_h + f_h
    # entropy of the product part over the whole l x l grid, in closed form
    product_entropy = (1.0 - weight) * (total - np.log(np.abs(1.0 - weight) + _TINY))
    mi = total - (product_entropy + correction)
    return np.where(mi == 0, 0.0, 2.0 * mi / np.where(total > 0, total, 1.0))


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
    total = np.zeros(fus.shape)
    differed = np.zeros(fus.shape, dtype=bool)  # an earlier source's window differed
    work: _Workspace | None = None
    for source in checked:
        s_map = _features(source, feature)
        src = _FeatureWindows(s_map, side)
        equal = ~_any_in_windows(s_map != f_map, side, side)
        if differed.any():
            # fmi.m quirk kept for exact agreement: once a source's window differed from the
            # fused window, later sources are compared with the min-max normalised fused window
            equal = np.where(differed, _equal_to_normalised(src, fus, differed), equal)
        values = equal.astype(np.float64)
        todo = np.flatnonzero(~equal & ~src.constant & ~fus.constant)
        if todo.size and (work is None or work.count < min(todo.size, _FMI_CHUNK)):
            work = _Workspace(side * side, min(todo.size, _FMI_CHUNK))
        for start in range(0, todo.size, _FMI_CHUNK):
            chunk = todo[start:start + _FMI_CHUNK]
            values.ravel()[chunk] = _fmi_pairs(src.take(chunk), fus.take(chunk), work)
        total += values
        differed |= ~equal
    return float(total.mean() / len(checked))
