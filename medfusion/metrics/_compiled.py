"""The metrics' compiled loops (numba): separable window filters, the per-pixel arithmetic of
SSIM, Piella's weights, VIF and QAB/F, 3x3 gradients, grey levels and histograms, Pearson sums,
and FMI's per-window work.

Why compiled: the window metrics (SSIM, Q0/QW, QE, VIF) run ~30 separable filter passes per
512² pair, each followed by several whole-image NumPy operations, and FMI computes up to
~230 000 window pairs of 9 values each. As NumPy (banded BLAS products; row operations over
blocks of windows) a filter pass took ~2.3 ms and a window pair ~0.9 µs; these loops take ~0.9 ms
and ~0.4 µs, fuse the passes that follow, and run without the GIL, so the metrics' two threads
both work. Transcendental functions over whole images stay with NumPy (its vectorised log, exp
and arctan are ~4x faster than a compiled scalar call); the loops here prepare their arguments.
FMI's ~30 logarithms per window pair use :func:`fast_log`, plain arithmetic that vectorises in
its loops (window pairs 20 % faster than with scalar log calls).

Imported with the metrics package (numba costs ~0.2 s to import; ``medfusion fuse`` without
``--metrics`` never imports it). ``cache=True`` keeps the compiled functions in numba's cache
(next to this file, or in the user's cache folder where that is read-only), so they compile
once per installation.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_TINY = 1e-300  # p * log(|p| + _TINY) is p log|p| for |p| > 1e-284 (all that occur), 0 at 0


# every loop: compiled once per installation (``cache``), run without the GIL, and with NumPy's
# division semantics: numba's default (Python's) checks every division for a zero divisor and
# raises, which keeps LLVM from vectorising any loop that divides (the per-pixel chains ran
# 10-20 % slower). The divisions here are guarded or by nonzero values.
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}

# fused multiply-adds (one rounding instead of two) in the filters: ~12 % faster; not in FMI,
# whose results are held to fmi.m within 1e-12
_FUSED_MULTIPLY_ADD = {"contract"}

# Separable 'valid' filters, one output row at a time: the vertical pass makes one line (in the
# L1 cache), the horizontal pass turns it into the output row at once. Full-size float64 images
# do not fit the CPU's caches, so every pass over a whole image costs memory bandwidth; this way
# the input is read and the output written once, with no intermediate image.
#
# Two forms of the same sums, in the same order (so bit-identical): kernels of the sizes the
# metrics use on full-size images (SSIM's and Piella's 11-tap Gaussian, VIF's 17 and 9) run
# loops with the tap count a compile-time constant (:func:`_fixed_filter`, ...): LLVM unrolls
# the taps and vectorises across the columns with each sum in a register, one load per tap and
# one store per output (1.5-2x faster on a 512^2 image). Any other size runs loops that add one
# tap at a time into a line held in the L1 cache (:func:`_horizontal`, ...): with a variable tap
# count the fixed form was 2x slower than these. Each fixed size compiles loops of its own
# (~1 s, once per installation), so each function lists only the sizes where it pays: VIF
# downsamples with the 9 taps; the covariance's fixed form was no faster at 17 taps (two loads
# per tap).
_FILTER_SIZE = 9
_MOMENT_SIZES = (9, 11, 17)
_COVARIANCE_SIZES = (9, 11)


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD, inline="always")
def _centred(target: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray, norm: float) -> None:
    """``target = norm * (target - mean_x mean_y)``: a filtered product made a (co)variance."""
    for c in range(target.size):
        target[c] = norm * (target[c] - mean_x[c] * mean_y[c])


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD)
def _horizontal(line: np.ndarray, kernel: np.ndarray, step: int, target: np.ndarray) -> None:
    """``target[c] = sum_t kernel[t] line[c * step + t]``, one tap at a time (any size)."""
    target[:] = 0.0
    for t in range(kernel.size):
        weight = kernel[t]
        if step == 1:
            for c in range(target.size):
                target[c] += weight * line[c + t]
        else:
            for c in range(target.size):
                target[c] += weight * line[c * step + t]


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD, inline="always")
def _fixed_horizontal(line: np.ndarray, kernel: np.ndarray, step: int, target: np.ndarray,
                      size: int) -> None:
    """:func:`_horizontal` for a kernel of ``size`` taps, a constant where this is inlined."""
    for c in range(target.size):
        total = 0.0
        for t in range(size):
            total += kernel[t] * line[c * step + t]
        target[c] = total


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD, inline="always")
def _fixed_filter(image: np.ndarray, kernel: np.ndarray, step: int, size: int) -> np.ndarray:
    """:func:`filter_valid` for a kernel of ``size`` taps (a constant where this is inlined)."""
    height, width = image.shape
    out = np.empty(((height - size) // step + 1, (width - size) // step + 1))
    line = np.empty(width)
    for r in range(out.shape[0]):
        top = r * step
        for c in range(width):
            total = 0.0
            for t in range(size):
                total += kernel[t] * image[top + t, c]
            line[c] = total
        _fixed_horizontal(line, kernel, step, out[r], size)
    return out


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD)
def filter_valid(image: np.ndarray, kernel: np.ndarray, step: int) -> np.ndarray:
    """Separable 'valid' correlation with ``kernel`` along both axes, every ``step``-th row and
    column (see ``_common.filter_valid``)."""
    size = kernel.size
    if size == _FILTER_SIZE:
        return _fixed_filter(image, kernel, step, _FILTER_SIZE)
    height, width = image.shape
    out = np.empty(((height - size) // step + 1, (width - size) // step + 1))
    line = np.empty(width)
    for r in range(out.shape[0]):
        line[:] = 0.0
        for t in range(size):
            weight = kernel[t]
            source = image[r * step + t]
            for c in range(width):
                line[c] += weight * source[c]
        _horizontal(line, kernel, step, out[r])
    return out


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD, inline="always")
def _fixed_covariance(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, mean_x: np.ndarray,
                      mean_y: np.ndarray, norm: float, size: int) -> np.ndarray:
    """:func:`covariance_valid` for a kernel of ``size`` taps (a constant where inlined)."""
    height, width = x.shape
    out = np.empty((height - size + 1, width - size + 1))
    line = np.empty(width)
    for r in range(out.shape[0]):
        for c in range(width):
            total = 0.0
            for t in range(size):
                total += kernel[t] * (x[r + t, c] * y[r + t, c])
            line[c] = total
        _fixed_horizontal(line, kernel, 1, out[r], size)
        _centred(out[r], mean_x[r], mean_y[r], norm)
    return out


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD)
def covariance_valid(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, mean_x: np.ndarray,
                     mean_y: np.ndarray, norm: float) -> np.ndarray:
    """Windowed covariance ``norm * (filter(x y) - mean_x mean_y)`` ('valid', step 1), the
    product formed on the fly."""
    size = kernel.size
    if size == _COVARIANCE_SIZES[0]:
        return _fixed_covariance(x, y, kernel, mean_x, mean_y, norm, _COVARIANCE_SIZES[0])
    if size == _COVARIANCE_SIZES[1]:
        return _fixed_covariance(x, y, kernel, mean_x, mean_y, norm, _COVARIANCE_SIZES[1])
    height, width = x.shape
    out = np.empty((height - size + 1, width - size + 1))
    line = np.empty(width)
    for r in range(out.shape[0]):
        line[:] = 0.0
        for t in range(size):
            weight = kernel[t]
            line_x, line_y = x[r + t], y[r + t]
            for c in range(width):
                line[c] += weight * (line_x[c] * line_y[c])
        _horizontal(line, kernel, 1, out[r])
        _centred(out[r], mean_x[r], mean_y[r], norm)
    return out


@numba.njit(**_JIT, inline="always")
def _moment_buffers(x: np.ndarray, size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The outputs (mean, variance) of a windowed-moments pass over ``x`` and its two lines."""
    height, width = x.shape
    mean = np.empty((height - size + 1, width - size + 1))
    return mean, np.empty(mean.shape), np.empty(width), np.empty(width)


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD, inline="always")
def _fixed_moments(x: np.ndarray, kernel: np.ndarray, norm: float, size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`moments_valid` for a kernel of ``size`` taps (a constant where inlined)."""
    mean, var, line, square_line = _moment_buffers(x, size)
    width = x.shape[1]
    for r in range(mean.shape[0]):
        for c in range(width):
            total = 0.0
            squares = 0.0
            for t in range(size):
                value = x[r + t, c]
                total += kernel[t] * value
                squares += kernel[t] * (value * value)
            line[c] = total
            square_line[c] = squares
        _fixed_horizontal(line, kernel, 1, mean[r], size)
        _fixed_horizontal(square_line, kernel, 1, var[r], size)
        _centred(var[r], mean[r], mean[r], norm)
    return mean, var


@numba.njit(**_JIT, fastmath=_FUSED_MULTIPLY_ADD)
def moments_valid(x: np.ndarray, kernel: np.ndarray, norm: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Windowed mean and variance ``norm * (filter(x^2) - mean^2)`` ('valid', step 1) in one
    pass over ``x``: the same numbers as :func:`filter_valid` and :func:`covariance_valid`."""
    size = kernel.size
    if size == _MOMENT_SIZES[0]:
        return _fixed_moments(x, kernel, norm, _MOMENT_SIZES[0])
    if size == _MOMENT_SIZES[1]:
        return _fixed_moments(x, kernel, norm, _MOMENT_SIZES[1])
    if size == _MOMENT_SIZES[2]:
        return _fixed_moments(x, kernel, norm, _MOMENT_SIZES[2])
    mean, var, line, square_line = _moment_buffers(x, size)
    width = x.shape[1]
    for r in range(mean.shape[0]):
        line[:] = 0.0
        square_line[:] = 0.0
        for t in range(size):
            weight = kernel[t]
            source = x[r + t]
            for c in range(width):
                value = source[c]
                line[c] += weight * value
                square_line[c] += weight * (value * value)
        _horizontal(line, kernel, 1, mean[r])
        _horizontal(square_line, kernel, 1, var[r])
        _centred(var[r], mean[r], mean[r], norm)
    return mean, var


@numba.njit(**_JIT)
def ssim_map(mean_x: np.ndarray, mean_y: np.ndarray, var_x: np.ndarray, var_y: np.ndarray,
             cov_xy: np.ndarray, c1: float, c2: float) -> np.ndarray:
    """``((2 mx my + C1)(2 cxy + C2)) / ((mx^2 + my^2 + C1)(vx + vy + C2))`` per window."""
    out = np.empty(mean_x.shape)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            mx, my = mean_x[r, c], mean_y[r, c]
            out[r, c] = ((2.0 * mx * my + c1) * (2.0 * cov_xy[r, c] + c2)) / (
                (mx * mx + my * my + c1) * (var_x[r, c] + var_y[r, c] + c2))
    return out


@numba.njit(**_JIT)
def edge_agreement_exponents(g_s: np.ndarray, a_s: np.ndarray, g_f: np.ndarray, a_f: np.ndarray,
                             kg: float, dg: float, ka: float, da: float
                             ) -> tuple[np.ndarray, np.ndarray]:
    """The exponents of QAB/F's two sigmoids (NumPy's vectorised exp takes them):
    ``kg (G - dg)`` with ``G = min(g_S, g_F) / max(g_S, g_F)`` (1 where both are 0) and
    ``ka (1 - |a_S - a_F| / (pi/2) - da)``."""
    strength = np.empty(g_s.shape)
    orientation = np.empty(g_s.shape)
    for r in range(g_s.shape[0]):
        for c in range(g_s.shape[1]):
            gs, gf = g_s[r, c], g_f[r, c]
            none = 1.0 if gs == 0.0 and gf == 0.0 else 0.0
            ratio = (min(gs, gf) + none) / (max(gs, gf) + none)
            strength[r, c] = (ratio - dg) * kg
            angle = abs(a_s[r, c] - a_f[r, c]) / (-np.pi / 2)
            orientation[r, c] = (angle + (1.0 - da)) * ka
    return strength, orientation


@numba.njit(**_JIT)
def piella_quality(variances: tuple, maps: tuple, flat_variance: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Piella's saliency-weighted quality ``sum_i lambda_i Q_i`` and saliency ``max_i s_i`` per
    window, from each source's local variance and quality map (tuples of equal-shape arrays):
    variances below ``flat_variance`` count as 0, and where all are 0 every source gets 0.5."""
    sources = len(variances)
    rows, cols = maps[0].shape
    quality = np.empty((rows, cols))
    saliency = np.empty((rows, cols))
    for r in range(rows):
        for c in range(cols):
            total = 0.0
            for k in range(sources):
                v = variances[k][r, c]
                total += v if v >= flat_variance else 0.0
            flat = total == 0
            if flat:
                total = 0.5 * sources
            q = 0.0
            best = 0.0
            for k in range(sources):
                v = variances[k][r, c]
                v = 0.5 if flat else (v if v >= flat_variance else 0.0)
                q += v / total * maps[k][r, c]
                best = max(best, v)
            quality[r, c] = q
            saliency[r, c] = best
    return quality, saliency


@numba.njit(**_JIT)
def vif_information(var_ref: np.ndarray, var_dist: np.ndarray, cov: np.ndarray,
                    eps: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """One scale of ``vifp_mscale``, per window: the arguments ``1 + g^2 s1^2 / (sv^2 + s_n^2)``
    and ``1 + s1^2 / s_n^2`` of its two log10 sums (NumPy's vectorised log10 takes them), from
    the windowed variances (clipped at 0) and covariance of reference and distorted image. Its
    special cases: g = 0 for a flat reference or distorted window or g < 0 (sv^2 = s2^2
    then), sv^2 floored at eps, a flat reference window carries no information."""
    num = np.empty(cov.shape)
    den = np.empty(cov.shape)
    for r in range(cov.shape[0]):
        for c in range(cov.shape[1]):
            s1 = max(var_ref[r, c], 0.0)
            s2 = max(var_dist[r, c], 0.0)
            s12 = cov[r, c]
            ref_ok = s1 >= eps
            g = s12 / (s1 + eps)
            if not (ref_ok and s2 >= eps and g >= 0):
                g = 0.0
            sv = max(s2 - g * s12, eps) + noise
            s1 = s1 if ref_ok else 0.0
            num[r, c] = 1.0 + g * g * s1 / sv
            den[r, c] = 1.0 + s1 / noise
    return num, den


@numba.njit(**_JIT)
def centred_products(x: np.ndarray, y: np.ndarray, mean_x: float, mean_y: float
                     ) -> tuple[float, float, float]:
    """``(sum dx dy, sum dx^2, sum dy^2)`` with ``dx = x - mean_x``, ``dy = y - mean_y``, in one
    pass (no difference images)."""
    xy = 0.0
    xx = 0.0
    yy = 0.0
    for r in range(x.shape[0]):
        line_x, line_y = x[r], y[r]
        for c in range(line_x.size):
            dx, dy = line_x[c] - mean_x, line_y[c] - mean_y
            xy += dx * dy
            xx += dx * dx
            yy += dy * dy
    return xy, xx, yy


@numba.njit(**_JIT)
def grey_levels(image: np.ndarray, low: float, high: float, stretch: bool, bins: int
                ) -> np.ndarray:
    """``_common.grey_levels`` in one pass: optionally ``(x - low) / (high - low) * 255``, then
    the nearest grey level (halves up) clipped to 0..255, merged into ``bins`` bins."""
    levels = np.empty(image.shape, dtype=np.int64)
    for r in range(image.shape[0]):
        source, target = image[r], levels[r]
        for c in range(source.size):
            value = source[c]
            if stretch:
                value = (value - low) / (high - low) * 255.0
            level = min(max(np.floor(value + 0.5), 0.0), 255.0)
            target[c] = int(level) if bins == 256 else int(level) * bins // 256
    return levels


@numba.njit(**_JIT)
def counts(levels: np.ndarray, bins: int) -> np.ndarray:
    """Counts of each level in a flat array of integer levels."""
    out = np.zeros(bins)
    for level in levels:
        out[level] += 1.0
    return out


@numba.njit(**_JIT)
def joint_counts(levels_a: np.ndarray, levels_b: np.ndarray, bins: int) -> np.ndarray:
    """Counts ``n[a, b]`` of the level pairs of two integer-level images."""
    counts = np.zeros((bins, bins))
    for r in range(levels_a.shape[0]):
        line_a, line_b = levels_a[r], levels_b[r]
        for c in range(line_a.size):
            counts[line_a[c], line_b[c]] += 1.0
    return counts


@numba.njit(**_JIT)
def gradient_3x3(padded: np.ndarray, center: float) -> tuple[np.ndarray, np.ndarray]:
    """'Valid' correlations of a padded image (``_common.pad_border``: 'same' size for the
    image) with ``outer([1, c, 1], [1, 0, -1])`` (x: left minus right) and ``outer([1, 0, -1],
    [1, c, 1])`` (y: upper minus lower row), in one pass. ``center`` c = 1: Prewitt, 2: Sobel;
    zero padding gives MATLAB ``filter2`` / ``conv2`` 'same', replicated borders ``imfilter``
    'replicate'."""
    rows, cols = padded.shape[0] - 2, padded.shape[1] - 2
    gx = np.empty((rows, cols))
    gy = np.empty((rows, cols))
    for r in range(rows):
        up, mid, down = padded[r], padded[r + 1], padded[r + 2]
        for c in range(cols):
            across_up = up[c] - up[c + 2]
            across_mid = mid[c] - mid[c + 2]
            across_down = down[c] - down[c + 2]
            gx[r, c] = across_up + across_down + center * across_mid
            gy[r, c] = (up[c] - down[c]) + (up[c + 2] - down[c + 2]) + center * (
                up[c + 1] - down[c + 1])
    return gx, gy


@numba.njit(**_JIT)
def sobel_strength_ratio(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VIFB's Sobel maps of a zero-padded image: strength ``sqrt(sx^2 + sy^2)`` and the ratio
    ``sy / sx`` (+inf where sx == 0, so that NumPy's arctan gives pi/2 there); sx = left minus
    right column, sy = lower minus upper row."""
    sx, sy = gradient_3x3(padded, 2.0)
    for r in range(sx.shape[0]):
        line_x, line_y = sx[r], sy[r]
        for c in range(line_x.size):
            x, y = line_x[c], -line_y[c]
            line_y[c] = y / x if x != 0 else np.inf
            line_x[c] = np.sqrt(x * x + y * y)
    return sx, sy


@numba.njit(**_JIT)
def gradient_magnitude(padded: np.ndarray, center: float) -> np.ndarray:
    """``sqrt(gx^2 + gy^2)`` of :func:`gradient_3x3`."""
    gx, gy = gradient_3x3(padded, center)
    for r in range(gx.shape[0]):
        line_x, line_y = gx[r], gy[r]
        for c in range(line_x.size):
            line_x[c] = np.sqrt(line_x[c] * line_x[c] + line_y[c] * line_y[c])
    return gx


# --- a natural logarithm that vectorises ---------------------------------------------------
#
# A loop calling np.log makes one scalar libm call per value (~7 ns); FMI takes ~30 logarithms
# per window pair. This one is plain arithmetic on the float's bits, so LLVM vectorises loops
# of it (~1-2 ns per value); it is within 1 ulp of np.log (tested).


@intrinsic
def _bits_of(typingctx, value):  # noqa: ARG001 (numba passes the typing context)
    """The IEEE-754 bits of a float64 as an int64 (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _float_of(typingctx, bits):  # noqa: ARG001
    """The float64 whose IEEE-754 bits are ``bits`` (int64)."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


_SQRT_HALF_BITS = 0x3FE6A09E667F3BCD  # the bits of sqrt(1/2)
_LN2_HIGH = 0.6931467056274414  # ln 2 in 21 bits: k * _LN2_HIGH is exact for every exponent k
_LN2_LOW = 4.7493250390316726e-07  # ln 2 - _LN2_HIGH


@numba.njit(**_JIT, inline="always")
def fast_log(x: float) -> float:
    """``log(x)`` for positive, finite, normal ``x`` (the callers' values plus ``_TINY``).

    ``x = 2^k (1 + f)`` with ``1 + f`` in [sqrt(1/2), sqrt(2)); ``log(1 + f) = 2 atanh(s)``,
    ``s = f / (2 + f)``, ``|s| <= 0.172``; ``2 atanh(s) = 2 s + s R(s^2)`` with the series
    ``R(z) = sum_n 2 z^n / (2n + 1)`` (9 terms: the next is below 2^-53 of the result), and
    ``2 s = f - f s`` keeps the leading term exact: ``log(1 + f) = f - s (f - R)``.
    """
    bits = _bits_of(x)
    k = (bits - _SQRT_HALF_BITS) >> 52
    f = _float_of(bits - (k << 52)) - 1.0
    s = f / (2.0 + f)
    z = s * s
    r = z * (2 / 3 + z * (2 / 5 + z * (2 / 7 + z * (2 / 9 + z * (
        2 / 11 + z * (2 / 13 + z * (2 / 15 + z * (2 / 17 + z * (2 / 19)))))))))
    exponent = float(k)
    return exponent * _LN2_HIGH + ((f - s * (f - r)) + exponent * _LN2_LOW)


@numba.njit(**_JIT)
def fast_logs(values: np.ndarray) -> np.ndarray:
    """:func:`fast_log` of each value of a 1-D array (for tests and benchmarks)."""
    out = np.empty(values.size)
    for k in range(values.size):
        out[k] = fast_log(values[k])
    return out


# --- FMI: per-window work ------------------------------------------------------------------
#
# The windows run in blocks of _FMI_BLOCK. Per block, the marginal PDF of every window needed
# is computed for all of them at once (:func:`_block_marginals`: the values of window j in
# column j, so each step is one loop across the windows, and those loops vectorise); then the
# window pairs of the block, one source at a time, run :func:`_block_pairs`, again as loops
# across the pairs. The merge of the two CDFs' breakpoints, a walk with a data-dependent step
# per pair, becomes ranks there: F_i comes after exactly the A_j < F_i (both CDFs rise), so
# each breakpoint's predecessor, its cell of the coupling and the other marginal's PDF at that
# cell are counts and selects in an unrolled l x l loop. Each pair's terms are put back in the
# walk's order before they are summed, so the sums, and FMI, are the walk's to the bit.
#
# Against the walk, one pair at a time (interleaved, ns per window pair): 0.64-0.79x on a
# textured 512^2 slice, where every window pair is computed, 0.98-1.02x on the benchmark's
# CT-MRI pair, whose sparse blocks spend their time gathering windows. What it needs: each
# quantity in an array of its own (views of one scratch array kept LLVM from vectorising: 5-10x
# slower loops); rows padded by _FMI_PAD values (strides that are multiples of 4 KiB alias in
# the L1 cache); the window length 9 of the 3 x 3 window a compile-time constant.

_FMI_BLOCK = 256  # windows per block
_FMI_PAD = 16  # extra columns of the block arrays (row strides off multiples of 4 KiB)
_FMI_LENGTH = 9  # fmi.m's default 3 x 3 window: loops compiled with this length


@numba.njit(**_JIT, inline="always")
def _block_marginals(values: np.ndarray, count: int, pdf: np.ndarray, logs: np.ndarray,
                     stats: np.ndarray) -> None:
    """fmi.m's window PDFs of the first ``count`` columns of ``values`` (length, block): each
    column min-max shifted, then sum-normalised (a constant window: uniform), into ``pdf``, and
    ``log(pdf)`` into ``logs``. ``stats`` rows, per window: 0 the index standard deviation,
    1 the entropy in nats, 2 ``sum_k (pdf_k - 1/l)^2``, 3 ``sum_k (l - k) pdf_k`` (the sums of
    the CDF; ``stats[4:6]`` is scratch). Each window's sums run over its values in order, as a
    loop over one window would."""
    length = values.shape[0]
    uniform = 1.0 / length
    low, total = stats[4], stats[5]
    for j in range(count):
        low[j] = values[0, j]
    for k in range(1, length):
        for j in range(count):
            low[j] = min(low[j], values[k, j])
    total[:count] = 0.0
    for k in range(length):
        for j in range(count):
            shifted = values[k, j] - low[j]
            pdf[k, j] = shifted
            total[j] += shifted
    for k in range(length):
        for j in range(count):
            pdf[k, j] = uniform if total[j] == 0 else pdf[k, j] / total[j]
            logs[k, j] = fast_log(pdf[k, j] + _TINY)
    mean_index, square_index = stats[4], stats[5]  # (low and total are no longer needed)
    stats[:4, :count] = 0.0
    mean_index[:count] = 0.0
    square_index[:count] = 0.0
    for k in range(length):
        for j in range(count):
            p = pdf[k, j]
            mean_index[j] += (k + 1) * p
            square_index[j] += (k + 1) * (k + 1) * p
            stats[1, j] -= p * logs[k, j]
            centred = p - uniform
            stats[2, j] += centred * centred
            stats[3, j] += (length - k) * p
    for j in range(count):
        stats[0, j] = np.sqrt(max(square_index[j] - mean_index[j] * mean_index[j], 0.0))


@numba.njit(**_JIT, inline="always")
def _pair_work(length: int) -> tuple:
    """Scratch arrays of :func:`_block_pairs` for windows of ``length`` values, each its own
    allocation (LLVM then knows that they do not overlap)."""
    width = _FMI_BLOCK + _FMI_PAD
    rows = 2 * length + 1
    return (np.empty((rows, width)), np.empty((rows, width)), np.empty((rows, width)),
            np.empty((rows, width)), np.empty((rows, width)), np.empty((rows, width)),
            np.empty((rows, width)), np.empty((rows, width)), np.empty((rows, width)),
            np.empty((rows, width)), np.empty((rows, width)), np.empty((rows, width)),
            np.empty((length + 1, width), dtype=np.int64),
            np.empty((length + 1, width), dtype=np.int64),
            np.empty(width), np.empty(width), np.empty(width), np.empty(width),
            np.empty(width), np.empty(width), np.empty(width))


@numba.njit(**_JIT, inline="always")
def _block_pairs(a_pdf: np.ndarray, a_log: np.ndarray, a_stats: np.ndarray, f_pdf: np.ndarray,
                 f_log: np.ndarray, f_stats: np.ndarray, count: int, work: tuple,
                 out: np.ndarray, length: int) -> None:
    """Fast-FMI ``2 MI / (H_a + H_f)`` of the window pairs ``p < count``: column ``p`` of the
    source's :func:`_block_marginals` results with column ``p`` of the fused window's, into
    ``out[p]``; ``work`` from :func:`_pair_work`, ``length`` the window's values (a constant
    where this is inlined).

    Haghighat & Razian: marginal PDFs, Pearson ``c`` of the PDFs, joint PDF ``w U + (1 - w)
    f a^T`` mixing the Frechet upper (c >= 0) or lower (c < 0) bound coupling ``U`` of the CDFs
    with the independent product, ``w = c / corr(U)``. ``U`` is a monotone coupling: instead of
    fmi.m's l x l grid its mass lies on the at most 2l cells cut by the merged breakpoints of
    the two CDFs (the lower coupling of (f, a) is the upper coupling of (f, reversed a)); the
    product part's entropy over the whole grid has a closed form, and on the coupling's cells
    ``log`` of the product is the sum of the marginals' logs.
    """
    (cdf_a, cdf_f, a_oriented, a_log_oriented, mass_f, mass_a, merged, cell_a, cell_a_log,
     cell_f, cell_f_log, terms, rank_f, rank_a, pearson, upper, weight, rest, log_rest,
     sum_min, correction) = work
    n = count
    uniform = 1.0 / length
    pearson[:n] = 0.0
    for k in range(length):
        for p in range(n):
            pearson[p] += (a_pdf[k, p] - uniform) * (f_pdf[k, p] - uniform)
    for p in range(n):
        num = pearson[p]
        den = np.sqrt(a_stats[2, p] * f_stats[2, p])
        c = 0.0 if num == 0 else num / (den if den > 0 else 1.0)
        pearson[p] = c
        upper[p] = 1.0 if c >= 0 else 0.0
    for k in range(length):
        for p in range(n):
            keep = upper[p] != 0
            a_oriented[k, p] = a_pdf[k, p] if keep else a_pdf[length - 1 - k, p]
            a_log_oriented[k, p] = a_log[k, p] if keep else a_log[length - 1 - k, p]
    for p in range(n):
        cdf_f[0, p] = f_pdf[0, p]
        cdf_a[0, p] = a_oriented[0, p]
    for k in range(1, length):
        for p in range(n):
            cdf_f[k, p] = cdf_f[k - 1, p] + f_pdf[k, p]
            cdf_a[k, p] = cdf_a[k - 1, p] + a_oriented[k, p]
    _place_breakpoints(cdf_f, cdf_a, a_oriented, a_log_oriented, True, n, length, rank_f,
                       mass_f, cell_a, cell_a_log, terms, 0)
    _place_breakpoints(cdf_a, cdf_f, f_pdf, f_log, False, n, length, rank_a, mass_a, cell_f,
                       cell_f_log, terms, length)
    _in_merged_order(terms, rank_f, rank_a, n, length, merged, sum_min)
    for p in range(n):
        c = pearson[p]
        sum_f_cdf = f_stats[3, p]
        # sum over the grid of min(F_i, A_j) = sum over gaps of mass (l - i)(l - j)
        bound = sum_min[p] if upper[p] != 0 else (length + 1) * sum_f_cdf - sum_min[p]
        cov_bound = bound - sum_f_cdf * a_stats[3, p]
        a_sd, f_sd = a_stats[0, p], f_stats[0, p]
        sd_ok = a_sd > 0 and f_sd > 0 and c != 0
        corr_bound = cov_bound / (f_sd * a_sd) if sd_ok else cov_bound
        w = c / corr_bound if sd_ok and corr_bound != 0 else 0.0
        weight[p] = w
        rest[p] = 1.0 - w
        log_rest[p] = np.log(abs(1.0 - w) + _TINY)
    _cell_terms(mass_f, f_pdf, f_log, cell_a, cell_a_log, rest, weight, log_rest, n, length,
                terms, 0)
    _cell_terms(mass_a, cell_f, cell_f_log, a_oriented, a_log_oriented, rest, weight, log_rest,
                n, length, terms, length)
    _in_merged_order(terms, rank_f, rank_a, n, length, merged, correction)
    for p in range(n):
        total = a_stats[1, p] + f_stats[1, p]
        product_entropy = rest[p] * (total - log_rest[p])
        mi = total - (product_entropy + correction[p])
        out[p] = 0.0 if mi == 0 else 2.0 * mi / (total if total > 0 else 1.0)


@numba.njit(**_JIT, inline="always")
def _place_breakpoints(own: np.ndarray, other: np.ndarray, other_pdf: np.ndarray,
                       other_log: np.ndarray, of_f: bool, n: int, length: int, rank: np.ndarray,
                       mass: np.ndarray, cell: np.ndarray, cell_log: np.ndarray,
                       terms: np.ndarray, offset: int) -> None:
    """Where each breakpoint of the CDF ``own`` falls among those of ``other`` (pairs p < n).

    F's breakpoint F_i (``of_f``) follows the r = #{A_j < F_i} (F first on ties), A's A_j the
    #{F_i <= A_j}: that count is its ``rank``. Its gap (predecessor, breakpoint] has as
    ``mass`` the breakpoint minus the larger of the two candidate predecessors, and lies in
    the other CDF's step ``rank`` (the last step where a rounded last CDF value leaves none):
    that step's PDF and log go to ``cell`` and ``cell_log``. ``terms[offset + k]``: the gap's
    ``mass (l - i)(l - j)`` (i, j its F and A steps, multiplied in that order)."""
    for k in range(length):
        for p in range(n):
            value = own[k, p]
            r = 0
            before = 0.0
            step, step_log = 0.0, 0.0
            below = True  # all of the other's breakpoints so far come before this one
            for j in range(length):
                candidate = other[j, p]
                is_below = candidate < value if of_f else candidate <= value
                r += is_below
                before = candidate if is_below else before
                first = below > is_below  # the other's first breakpoint after this one
                step = other_pdf[j, p] if first else step
                step_log = other_log[j, p] if first else step_log
                below = is_below
            step = other_pdf[length - 1, p] if below else step
            step_log = other_log[length - 1, p] if below else step_log
            gap = value - max(own[k - 1, p] if k > 0 else 0.0, before)
            rank[k, p] = r
            mass[k, p] = gap
            cell[k, p] = step
            cell_log[k, p] = step_log
            terms[offset + k, p] = (gap * (length - k) * (length - r) if of_f
                                    else gap * (length - r) * (length - k))


@numba.njit(**_JIT, inline="always")
def _cell_terms(mass: np.ndarray, f_values: np.ndarray, f_logs: np.ndarray,
                a_values: np.ndarray, a_logs: np.ndarray, rest: np.ndarray, weight: np.ndarray,
                log_rest: np.ndarray, n: int, length: int, terms: np.ndarray,
                offset: int) -> None:
    """On each gap's cell of the coupling, the product part's ``p log p`` minus the joint's,
    into ``terms[offset + k]``; ``f_values`` / ``a_values`` the two marginals' PDF at the cell
    (and their logs). Where a gap's mass is 0 the joint is the product there: the terms
    cancel, so 0."""
    for k in range(length):
        for p in range(n):
            gap = mass[k, p]
            cell = rest[p] * f_values[k, p] * a_values[k, p]
            joint = weight[p] * gap + cell
            term = (cell * (log_rest[p] + f_logs[k, p] + a_logs[k, p])
                    - joint * fast_log(abs(joint) + _TINY))
            terms[offset + k, p] = term if gap != 0 else 0.0


@numba.njit(**_JIT, inline="always")
def _in_merged_order(terms: np.ndarray, rank_f: np.ndarray, rank_a: np.ndarray, n: int,
                     length: int, merged: np.ndarray, total: np.ndarray) -> None:
    """``total[p]``: the sum of pair p's breakpoint terms (F's in ``terms[:l]``, A's in
    ``terms[l:2l]``) in the order of the merged breakpoints, as the walk added them."""
    for i in range(length):
        for p in range(n):
            merged[i + rank_f[i, p], p] = terms[i, p]
    for j in range(length):
        for p in range(n):
            merged[j + rank_a[j, p], p] = terms[length + j, p]
    total[:n] = 0.0
    for g in range(2 * length):
        for p in range(n):
            total[p] += merged[g, p]


@numba.njit(**_JIT, inline="always")
def _gather_windows(image: np.ndarray, windows: np.ndarray, start: int, stop: int, side: int,
                    grid_cols: int, values: np.ndarray) -> int:
    """The values of the windows of ``image`` in ``start:stop`` (flat window indices) where
    ``windows`` is set, in fmi.m's column-major order, as the columns of ``values``; returns
    how many."""
    count = 0
    for w in range(start, stop):
        if not windows[w]:
            continue
        row, col = w // grid_cols, w % grid_cols
        for jj in range(side):
            for ii in range(side):
                values[jj * side + ii, count] = image[row + ii, col + jj]
        count += 1
    return count


@numba.njit(**_JIT)
def nmi_of_windows(fus_map: np.ndarray, src_maps: np.ndarray, todo: np.ndarray, side: int,
                   out: np.ndarray) -> None:
    """:func:`_block_pairs` of the ``side x side`` windows of the fused map and of each source
    map (``src_maps``: (K, rows, cols)) where ``todo`` (K, windows) is set, written to ``out``
    (K, windows); windows are the 'valid' window grid, flat, by top-left corner. Each fused
    window's marginal is computed once for all sources."""
    sources = src_maps.shape[0]
    grid_cols = fus_map.shape[1] - side + 1
    length = side * side
    width = _FMI_BLOCK + _FMI_PAD
    values = np.empty((length, width))
    f_pdf, f_log, f_stats = np.empty((length, width)), np.empty((length, width)), np.empty(
        (6, width))
    a_pdf, a_log, a_stats = np.empty((length, width)), np.empty((length, width)), np.empty(
        (6, width))
    g_pdf, g_log, g_stats = np.empty((length, width)), np.empty((length, width)), np.empty(
        (6, width))  # the fused marginals in the order of one source's pairs
    work = _pair_work(length)
    result = np.empty(width)
    needed = np.zeros(todo.shape[1], dtype=np.bool_)  # by any source
    for k in range(sources):
        needed |= todo[k]
    f_column = np.empty(_FMI_BLOCK, dtype=np.int64)  # block window -> its fused column
    for start in range(0, todo.shape[1], _FMI_BLOCK):
        stop = min(start + _FMI_BLOCK, todo.shape[1])
        count = _gather_windows(fus_map, needed, start, stop, side, grid_cols, values)
        if count == 0:
            continue
        _block_marginals(values, count, f_pdf, f_log, f_stats)
        column = 0
        for w in range(start, stop):
            f_column[w - start] = column
            column += needed[w]
        for k in range(sources):
            count = _gather_windows(src_maps[k], todo[k], start, stop, side, grid_cols, values)
            if count == 0:
                continue
            _block_marginals(values, count, a_pdf, a_log, a_stats)
            pair = 0
            for w in range(start, stop):
                if todo[k, w]:
                    fused = f_column[w - start]
                    for r in range(length):
                        g_pdf[r, pair] = f_pdf[r, fused]
                        g_log[r, pair] = f_log[r, fused]
                    for r in range(4):
                        g_stats[r, pair] = f_stats[r, fused]
                    pair += 1
            if length == _FMI_LENGTH:
                _block_pairs(a_pdf, a_log, a_stats, g_pdf, g_log, g_stats, count, work, result,
                             _FMI_LENGTH)
            else:
                _block_pairs(a_pdf, a_log, a_stats, g_pdf, g_log, g_stats, count, work, result,
                             length)
            pair = 0
            for w in range(start, stop):
                if todo[k, w]:
                    out[k, w] = result[pair]
                    pair += 1
