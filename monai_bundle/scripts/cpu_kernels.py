"""Compiled CPU kernels for :class:`scripts.network.FusionNet`'s full-resolution passes.

Why: on a CPU the network's convolutions run on the block grid and take a fraction of its time;
the rest was a dozen full-resolution passes (pooling, the bilinear upsampling of the maps and of
the base layer, the two-source combination), each reading and writing whole images. Here they
are compiled loops (numba) that read every source pixel once: :func:`block_stats` (the block
CNN's input and the base layer's means, ``x`` and ``x^2`` pooled in one pass) and
:func:`compose_two` (upsampling and combination row by row, each fused pixel written once;
where training left every detail gain dead, as in the shipped weights, the selection alone:
the detail terms would move no pixel beyond float32 rounding); and
:func:`conv3x3`, the block CNN's last layer (2 output channels, where oneDNN was slow) as one
matrix product and a compiled sum of shifted tap planes, and :func:`bound_logits` (six small
torch operations on the block grid in one loop). The block CNN's other layers run as oneDNN
calls with their activations fused (:func:`conv_leaky`, :func:`linear_leaky`; torch's layers
where :data:`ONEDNN_LAYERS` is off).
They compute what the network's torch code computes (``FusionNet._block_stats``,
``upsample_bilinear``, ``_combine_two_sources``, the head's last layer: the block means to the
bit, the fused image within 3.4e-5 for the shipped weights on the 189 validation atlas pairs,
1e-4 tested on random inputs; the logit difference is taken on the block grid before
upsampling, which rounds less than upsampling each logit, so with logits of 1e4 the two paths
differ by ~3e-4) and serve inference only: the network takes them for float32 CPU inputs
without gradients, and keeps its torch code for training, GPUs, TorchScript and ONNX export.

The two full-resolution loops (:func:`block_stats`' pooling, :func:`compose_two`) are split into
row bands run in parallel, one per torch thread (:func:`bands`), where numba's threading layer
is OpenMP ("omp", numba's choice where TBB is not installed; GNU OpenMP on Linux): its workers
wait for work spinning, as torch's do, so a band starts at once (a 512^2 pair: the two loops
alone 0.50 -> 0.31 ms, the method 0.93x the time, this 2-core VM). Numba's other layers hand
work over more slowly, and the same split in Python threads was slower than one thread (the
method 1.2-1.3x the time with "workqueue"; 4.7 against 4.4 ms in Python threads): there, and
where torch runs one thread, the loops run on the calling thread alone, without the GIL. Every
output row is computed as in the serial loop, so the result is the same to the bit. As with
torch's own OpenMP pool, a process forked after the loops ran in parallel must not run them in
parallel again (numba then ends it): it must set torch to one thread first, as torch's
DataLoader workers do, and the loops then run serially. This module imports numba; the network
imports it only when numba is installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numba
import numpy as np
import torch
from numba.extending import intrinsic

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
# the upsampling and combination may fuse a * b + c into one rounding (FMA: faster, and no less
# precise); the block means may not, so that they stay torch's to the bit
_JIT_FUSED = {**_JIT, "fastmath": {"contract"}}
_JIT_BANDS = {"cache": True, "nogil": True, "parallel": True}  # row bands in parallel (prange)
# fewer rows than this per band, and a loop is not split (a thread's start costs more there)
MIN_ROWS_PER_BAND = 64
_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HIGH = _F32(0.693359375)  # ln 2 in 9 bits: n * _LN2_HIGH is exact for |n| < 2^15
_LN2_LOW = _F32(-2.12194440e-4)  # ln 2 - _LN2_HIGH
_ROUNDING = _F32(12582912.0)  # 1.5 * 2^23: t + _ROUNDING holds round(t) in its low bits
_ROUNDING_BITS = 0x4B400000  # the bits of _ROUNDING
_EXP_LIMIT = _F32(87.0)  # exp(87) and exp(-87) are normal float32 numbers
# below this, every re-injected detail ``s_k (1 - w_k) d_k`` (|d_k| <= 1) moves a fused pixel by
# less than float32 rounding of values near 1 (2^-24 each): the composition then skips the detail
# terms and the base layer (the shipped weights' gains: sigmoid <= 1e-13 on atlas pairs)
DEAD_GAIN_SIGMOID = 2.0**-25


@intrinsic
def _bit_cast(typingctx, value, number_type):  # noqa: ARG001 (numba passes the typing context)
    """The bits of ``value`` read as a ``number_type`` of the same width (``np.int32`` for a
    float32, ``np.float32`` for an int32): a cast of the bits, no conversion."""
    target = number_type.instance_type

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], context.get_value_type(target))
    return target(value, number_type), codegen


@numba.njit(**_JIT_FUSED, inline="always")
def sigmoid(z: float) -> float:
    """``1 / (1 + exp(-z))`` in float32, within 4e-7 of torch's (relative), in a form that
    vectorises: ``exp(t) = 2^n e^r`` with ``n = round(t / ln 2)`` taken from the bits of
    ``t / ln 2 + 1.5 * 2^23`` and ``e^r`` (``|r| <= ln 2 / 2``) from its degree-6 Taylor
    polynomial (error below 2e-7). ``t`` is clamped to +-87: further out the result stays at
    1.6e-38 (or 1 minus that) where torch's goes on shrinking, a difference no fusion sees."""
    t = min(max(-z, -_EXP_LIMIT), _EXP_LIMIT)
    shifted = t * _LOG2E + _ROUNDING
    n = shifted - _ROUNDING
    r = t - n * _LN2_HIGH - n * _LN2_LOW
    p = _F32(1.0 / 720.0)
    p = p * r + _F32(1.0 / 120.0)
    p = p * r + _F32(1.0 / 24.0)
    p = p * r + _F32(1.0 / 6.0)
    p = p * r + _F32(0.5)
    p = p * r + _F32(1.0)
    p = p * r + _F32(1.0)
    bits = (_bit_cast(shifted, np.int32) - np.int32(_ROUNDING_BITS - 127)) << np.int32(23)
    power = _bit_cast(np.int32(bits), np.float32)  # (numba widens int32 arithmetic to int64)
    return _F32(1.0) / (_F32(1.0) + p * power)


@numba.njit(**_JIT)
def sigmoid_of_array(values: np.ndarray, out: np.ndarray) -> None:
    """:func:`sigmoid` of each element (for tests)."""
    for index in range(values.size):
        out.flat[index] = sigmoid(values.flat[index])


@numba.njit(**_JIT_FUSED, inline="always")
def _source_cell(position: int, scale: int, cells: int) -> tuple[int, int, float]:
    """Cells and weight of bilinear upsampling by ``scale`` (``align_corners=False``, edges
    repeated): output ``position`` is ``(1 - t) cell[first] + t cell[second]``."""
    source = max((position + 0.5) / scale - 0.5, 0.0)
    first = int(source)
    return first, min(first + 1, cells - 1), _F32(source - first)


@numba.njit(**_JIT_FUSED, inline="always")
def _widen(row: np.ndarray, scale: int, out: np.ndarray) -> None:
    """``row`` upsampled bilinearly by ``scale`` along its length into ``out`` (the edge
    cells repeated, as :func:`_source_cell`). Phase by phase: output ``scale * j + r`` mixes
    cell ``j`` with ``j - 1`` (``r < scale / 2``) or ``j + 1`` by a weight of ``r`` alone, so
    the loads run along the row (2.4x faster than gathering the cells of each position)."""
    cells, half = row.shape[0], scale // 2
    for phase in range(scale):
        if phase < half:
            weight = _F32(0.5 - (phase + 0.5) / scale)
            out[phase] = row[0]
            for cell in range(1, cells):
                out[cell * scale + phase] = row[cell] + weight * (row[cell - 1] - row[cell])
        else:
            weight = _F32((phase + 0.5) / scale - 0.5)
            for cell in range(cells - 1):
                out[cell * scale + phase] = row[cell] + weight * (row[cell + 1] - row[cell])
            out[(cells - 1) * scale + phase] = row[cells - 1]


@numba.njit(**_JIT_FUSED, inline="always")
def _slot(keys: np.ndarray, key: int, keep: int) -> tuple[int, bool]:
    """The one of two row slots that holds ``key``, or the one to fill with it (not the one
    holding ``keep``); and whether it must be filled."""
    if keys[0] == key:
        return 0, False
    if keys[1] == key:
        return 1, False
    victim = 1 if keys[0] == keep else 0
    keys[victim] = key
    return victim, True


@numba.njit(**_JIT_FUSED, inline="always")
def _combine_row(first: np.ndarray, second: np.ndarray, maps_above: np.ndarray,
                 maps_below: np.ndarray, maps_weight: float, base_above: np.ndarray,
                 base_below: np.ndarray, base_weight: float, max_prior: float,
                 out: np.ndarray) -> None:
    """One fused row from the sources' rows and the widened block rows above and below it:
    maps (logit difference, gain 0, gain 1) and base means (source 0, 1), each mixed by its
    vertical weight (``(1 - t) above + t below``) as it is used
    (``scripts.network._combine_two_sources``, clamped). Why mixed here: mixing each channel
    into a row buffer first cost a store and a load per pixel and channel (25 % of the loop)."""
    maps_keep, base_keep = _F32(1.0) - maps_weight, _F32(1.0) - base_weight
    for position in range(out.shape[0]):
        x0, x1 = first[position], second[position]
        logit = maps_keep * maps_above[0, position] + maps_weight * maps_below[0, position]
        gain0 = maps_keep * maps_above[1, position] + maps_weight * maps_below[1, position]
        gain1 = maps_keep * maps_above[2, position] + maps_weight * maps_below[2, position]
        base0 = base_keep * base_above[0, position] + base_weight * base_below[0, position]
        base1 = base_keep * base_above[1, position] + base_weight * base_below[1, position]
        keep_second = x1 + sigmoid(gain0) * (x0 - base0)
        keep_first = x0 + sigmoid(gain1) * (x1 - base1)
        weight = sigmoid(logit + max_prior * (x0 - x1))
        fused = keep_second + weight * (keep_first - keep_second)
        out[position] = min(max(fused, _F32(0.0)), _F32(1.0))


@numba.njit(**_JIT_FUSED, inline="always")
def _select_row(first: np.ndarray, second: np.ndarray, logit_above: np.ndarray,
                logit_below: np.ndarray, maps_weight: float, max_prior: float,
                out: np.ndarray) -> None:
    """:func:`_combine_row` where no detail is re-injected (every gain's sigmoid below
    :data:`DEAD_GAIN_SIGMOID`): ``F = x_1 + w_0 (x_0 - x_1)``, the selection alone."""
    maps_keep = _F32(1.0) - maps_weight
    for position in range(out.shape[0]):
        x0, x1 = first[position], second[position]
        logit = maps_keep * logit_above[position] + maps_weight * logit_below[position]
        weight = sigmoid(logit + max_prior * (x0 - x1))
        fused = x1 + weight * (x0 - x1)
        out[position] = min(max(fused, _F32(0.0)), _F32(1.0))


@numba.njit(**_JIT_FUSED)
def _compose_rows(x: np.ndarray, maps: np.ndarray, coarse: np.ndarray, max_prior: float,
                  block: int, base_pool: int, with_detail: bool, out: np.ndarray, start: int,
                  stop: int) -> None:
    """The fused rows ``start`` to ``stop`` of ``out`` (B, 1, H, W), counted over the images
    (row ``r`` of image ``i`` is ``i * H + r``); without the detail terms (and the base
    layer) where ``with_detail`` is False.

    ``maps`` (B, 4, H / block, W / block): logit and gain of source 0, then of source 1;
    ``coarse`` (B, 2, H / base_pool, W / base_pool): the sources' base-layer means. Upsampling
    is separable: each block row (and base row) is widened once, kept in one of two slots while
    the output rows between it and the next need it, and each output row mixes two slots."""
    height, width = x.shape[2], x.shape[3]
    map_rows, base_rows = maps.shape[2], coarse.shape[2]
    low = np.empty((3, maps.shape[3]), np.float32)  # logit difference, gain 0, gain 1
    wide_maps = np.empty((2, 3, width), np.float32)
    wide_base = np.empty((2, 2, width), np.float32)
    map_keys = np.full(2, -1, np.int64)
    base_keys = np.full(2, -1, np.int64)
    map_slots = np.zeros(2, np.int64)
    base_slots = np.zeros(2, np.int64)
    for flat in range(start, stop):
        image, row = flat // height, flat % height
        first, second, maps_weight = _source_cell(row, block, map_rows)
        for which, cell in enumerate((first, second)):
            other = second if which == 0 else first
            slot, fresh = _slot(map_keys, image * map_rows + cell, image * map_rows + other)
            map_slots[which] = slot
            if fresh:
                for column in range(maps.shape[3]):
                    low[0, column] = maps[image, 0, cell, column] - maps[image, 2, cell, column]
                    low[1, column] = maps[image, 1, cell, column]
                    low[2, column] = maps[image, 3, cell, column]
                for channel in range(3 if with_detail else 1):
                    _widen(low[channel], block, wide_maps[slot, channel])
        if not with_detail:
            _select_row(x[image, 0, row], x[image, 1, row], wide_maps[map_slots[0], 0],
                        wide_maps[map_slots[1], 0], maps_weight, max_prior, out[image, 0, row])
            continue
        first, second, base_weight = _source_cell(row, base_pool, base_rows)
        for which, cell in enumerate((first, second)):
            other = second if which == 0 else first
            slot, fresh = _slot(base_keys, image * base_rows + cell, image * base_rows + other)
            base_slots[which] = slot
            if fresh:
                for source in range(2):
                    _widen(coarse[image, source, cell], base_pool, wide_base[slot, source])
        _combine_row(x[image, 0, row], x[image, 1, row], wide_maps[map_slots[0]],
                     wide_maps[map_slots[1]], maps_weight, wide_base[base_slots[0]],
                     wide_base[base_slots[1]], base_weight, max_prior, out[image, 0, row])


@numba.njit(**_JIT_BANDS)
def _compose_bands(x: np.ndarray, maps: np.ndarray, coarse: np.ndarray, max_prior: float,
                   block: int, base_pool: int, with_detail: bool, out: np.ndarray,
                   parts: int) -> None:
    """:func:`_compose_rows` of every row, in ``parts`` bands of rows run in parallel."""
    rows = x.shape[0] * x.shape[2]
    for part in numba.prange(parts):
        _compose_rows(x, maps, coarse, max_prior, block, base_pool, with_detail, out,
                      part * rows // parts, (part + 1) * rows // parts)


@numba.njit(**_JIT)
def _moments(x: np.ndarray, size: int, mean: np.ndarray, square: np.ndarray, start: int,
             stop: int) -> None:
    """The ``size x size`` block means of ``x`` and ``x^2`` in block rows ``start`` to ``stop``
    (counted over the images): ``x`` (N, H, W), ``mean`` and ``square`` (N, H / size,
    W / size).

    Each block is summed as torch's ``avg_pool2d`` sums it (row by row, left to right, in
    float32), so the means are torch's to the bit: the network's block spread
    ``sqrt(mean(x^2) - mean^2)`` of a flat block is a difference of rounded numbers, and a
    different order of the same sum moved the network's output by up to 1e-3."""
    blocks_down, blocks_across = mean.shape[1], mean.shape[2]
    total = np.empty(blocks_across, np.float32)
    total_square = np.empty(blocks_across, np.float32)
    scale = _F32(1.0 / (size * size))
    for flat in range(start, stop):
        image, block_row = flat // blocks_down, flat % blocks_down
        total[:] = 0.0
        total_square[:] = 0.0
        for offset in range(size):
            line = x[image, block_row * size + offset]
            if size == 4:  # the block's four values in one loop body: LLVM's vectorised
                for block in range(blocks_across):  # stride-4 loads (2x faster)
                    v0, v1 = line[4 * block], line[4 * block + 1]
                    v2, v3 = line[4 * block + 2], line[4 * block + 3]
                    total[block] = (((total[block] + v0) + v1) + v2) + v3
                    total_square[block] = ((((total_square[block] + v0 * v0) + v1 * v1)
                                            + v2 * v2) + v3 * v3)
            else:
                for column in range(size):
                    for block in range(blocks_across):
                        value = line[block * size + column]
                        total[block] += value
                        total_square[block] += value * value
        for block in range(blocks_across):
            mean[image, block_row, block] = total[block] * scale
            square[image, block_row, block] = total_square[block] * scale


@numba.njit(**_JIT_BANDS)
def _moments_bands(x: np.ndarray, size: int, mean: np.ndarray, square: np.ndarray,
                   parts: int) -> None:
    """:func:`_moments` of every block row, in ``parts`` bands run in parallel."""
    rows = mean.shape[0] * mean.shape[1]
    for part in numba.prange(parts):
        _moments(x, size, mean, square, part * rows // parts, (part + 1) * rows // parts)


_LAYER: list[str] = []  # numba's threading layer once launched


def bands(rows: int) -> int:
    """Into how many row bands a loop over ``rows`` output rows is split: torch's thread count
    (what the caller allows), at most numba's (``numba.set_num_threads`` of the calling thread
    counts), with at least :data:`MIN_ROWS_PER_BAND` rows each, where numba's threading layer
    is OpenMP ("omp"); otherwise 1 (the calling thread alone)."""
    parts = min(torch.get_num_threads(), rows // MIN_ROWS_PER_BAND)
    if parts < 2:
        return 1
    if not _LAYER:
        try:
            numba.get_num_threads()  # launches numba's threading layer, so that it can be read
            _LAYER.append(numba.threading_layer())
        except (ValueError, RuntimeError, OSError):  # no layer loads here: the calling thread
            _LAYER.append("")
    if _LAYER[0] != "omp":
        return 1
    return min(parts, numba.get_num_threads())


def _in_bands(serial, parallel, rows: int, *args) -> None:  # noqa: ANN001 (numba functions)
    """``serial(*args, 0, rows)`` on the calling thread, or ``parallel(*args, parts)`` on
    ``parts`` of numba's threads (:func:`bands`)."""
    parts = bands(rows)
    if parts == 1:
        serial(*args, 0, rows)
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(parts)  # (per calling thread: numba's count for its next loops)
    try:
        parallel(*args, parts)
    finally:
        numba.set_num_threads(threads)


@numba.njit(**_JIT)
def _means(values: np.ndarray, size: int, mean: np.ndarray) -> None:
    """The ``size x size`` block means of ``values`` (N, H, W) into ``mean``
    (N, H / size, W / size), summed in torch's order."""
    blocks_down, blocks_across = mean.shape[1], mean.shape[2]
    total = np.empty(blocks_across, np.float32)
    scale = _F32(1.0 / (size * size))
    for flat in range(mean.shape[0] * blocks_down):
        image, block_row = flat // blocks_down, flat % blocks_down
        total[:] = 0.0
        for offset in range(size):
            line = values[image, block_row * size + offset]
            for column in range(size):
                for block in range(blocks_across):
                    total[block] += line[block * size + column]
        for block in range(blocks_across):
            mean[image, block_row, block] = total[block] * scale


@numba.njit(**_JIT)
def _stats(mean: np.ndarray, square: np.ndarray, stats: np.ndarray) -> None:
    """The block statistics ``stats``
    (N, h, w, 2): the mean and ``sqrt(max(mean(x^2) - mean^2, 0))``, as torch's
    ``(square - mean * mean).clamp_min(0).sqrt()`` (to one float32 step: torch's vectorised
    square root is not always correctly rounded)."""
    rows = mean.shape[1]
    for flat in range(mean.shape[0] * rows):
        image, row = flat // rows, flat % rows
        for column in range(mean.shape[2]):
            average = mean[image, row, column]
            stats[image, row, column, 0] = average
            stats[image, row, column, 1] = np.sqrt(max(square[image, row, column]
                                                       - average * average, _F32(0.0)))


def _block_means(values: np.ndarray, size: int) -> np.ndarray:
    """``avg_pool2d`` of (N, H, W) ``values`` by ``size`` (to the bit)."""
    n, h, w = values.shape
    mean = np.empty((n, h // size, w // size), np.float32)
    _means(values, size, mean)
    return mean


def block_stats(x: torch.Tensor, block: int, base_pool: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``FusionNet._block_stats`` of a float32 CPU ``(B, K, H, W)`` tensor whose H and W are
    multiples of ``block`` and ``base_pool`` (the means to the bit, the spreads within one
    float32 step of torch's vectorised square root): the block means and spreads
    ``(B * K, 2, H / block, W / block)`` channels-last and the base layer's means
    ``(B, K, H / base_pool, W / base_pool)``. Every source pixel is read once, for ``x`` and
    ``x^2`` together; the coarser grids are pooled from the finer means, as there."""
    b, k, h, w = x.shape
    if x.dtype != torch.float32 or h % block or w % block or h % base_pool or w % base_pool:
        raise ValueError(f"block_stats needs float32 sources whose height and width are "
                         f"multiples of {block} and {base_pool}, got {x.dtype} {tuple(x.shape)}")
    images = x.contiguous().reshape(b * k, h, w).numpy()
    fine = min(block, base_pool)
    if fine > 1:
        mean = np.empty((b * k, h // fine, w // fine), np.float32)
        square = np.empty_like(mean)
        _in_bands(_moments, _moments_bands, mean.shape[0] * mean.shape[1], images, fine,
                  mean, square)
    else:
        mean = square = images
    coarse = mean if fine == base_pool else _block_means(mean, base_pool // fine)
    if block > fine:
        mean, square = _block_means(mean, block // fine), _block_means(square, block // fine)
    stats = np.empty(mean.shape + (2,), np.float32)  # (N, h, w, 2): channels-last memory
    if block > 1:
        _stats(mean, square, stats)
    else:  # one pixel per block: the pixel and no spread
        stats[..., 0] = mean
        stats[..., 1] = 0.0
    coarse = torch.from_numpy(coarse).reshape(b, k, h // base_pool, w // base_pool)
    return torch.from_numpy(stats).permute(0, 3, 1, 2), coarse


@numba.njit(**_JIT_FUSED)
def _sum_taps(planes: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """``out`` (N, C, h, w) = ``bias`` + the sum over the 3x3 taps of ``planes``
    (C * 9, N, h, w), each tap plane shifted by its offset, zeros beyond the edges: the second
    half of :func:`conv3x3`. Row by row, each tap a contiguous run (vectorised)."""
    images, channels, height, width = out.shape
    for flat in range(images * channels * height):
        image = flat // (channels * height)
        channel, row = (flat // height) % channels, flat % height
        line = out[image, channel, row]
        line[:] = bias[channel]
        for dy in range(3):
            source_row = row + dy - 1
            if source_row < 0 or source_row >= height:
                continue
            for dx in range(3):
                tap = planes[channel * 9 + dy * 3 + dx, image, source_row]
                for column in range(max(0, 1 - dx), min(width, width + 1 - dx)):
                    line[column] += tap[column + dx - 1]


def tap_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The ``(C_out * 9, C_in)`` matrix of a 3x3 convolution's ``weight`` (C_out, C_in / groups,
    3, 3) for :func:`conv3x3_taps`: row ``9 o + 3 dy + dx`` holds output ``o``'s tap ``(dy,
    dx)``; with ``groups``, block-diagonal (each group's outputs read its own inputs only)."""
    outputs, per_group = weight.shape[0], weight.shape[1]
    taps = weight.detach().permute(0, 2, 3, 1).reshape(outputs * 9, per_group)
    if groups == 1:
        return taps.contiguous()
    return torch.block_diag(*taps.reshape(groups, outputs * 9 // groups, per_group))


def conv3x3(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            groups: int = 1) -> torch.Tensor:
    """A 3x3 convolution (stride 1, zero padding 1, no dilation) of channels-last ``features``
    (N, h, w, C_in) with ``weight`` (C_out, C_in / groups, 3, 3): ``(N, C_out, h, w)``,
    contiguous (:func:`conv3x3_taps` of :func:`tap_matrix`)."""
    return conv3x3_taps(features, tap_matrix(weight, groups), bias)


def conv3x3_taps(features: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`conv3x3` with its :func:`tap_matrix` made beforehand.

    One matrix product makes the ``C_out * 9`` tap planes ``taps @ features^T``, a compiled
    loop adds them up shifted. Why: for the block CNN's last layer (24 -> 2 channels on 64x64
    maps) oneDNN's convolution took ~150 us, as long as for 16 output channels; this takes
    ~80 us, the same numbers to float32 rounding (the sums run in another order).
    """
    images, height, width, channels = features.shape
    outputs = taps.shape[0] // 9
    planes = times_transposed(taps, features.reshape(-1, channels))
    out = torch.empty((images, outputs, height, width), dtype=torch.float32)
    _sum_taps(planes.reshape(outputs * 9, images, height, width).numpy(),
              bias.detach().contiguous().numpy(), out.numpy())
    return out


def _onednn_layers_available() -> bool:
    """Whether this torch has oneDNN's layers with fused activations (``torch.ops.mkldnn``'s
    ``_convolution_pointwise`` and ``_linear_pointwise``: x86 and ARM builds with oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and all(
            hasattr(torch.ops.mkldnn, name)
            for name in ("_convolution_pointwise", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


# the block CNN's layers as oneDNN calls with their activations fused (:func:`conv_leaky`,
# :func:`linear_leaky`, :func:`times_transposed`); False: torch's own layers and matrix products
# (the same numbers to float32 rounding). Why: on the block grid of a 512^2 pair each layer is
# a few tens of microseconds, and a separate activation pass, MKL's matrix products for these
# thin matrices (24 columns) and the head's five small products cost as much as its FLOPs: the
# block CNN 0.75x the time (Testing/benchmarks/bench_flops.py --compare-fused-layers)
ONEDNN_LAYERS = _onednn_layers_available()


def onednn_layers() -> bool:
    """Whether the block CNN runs as oneDNN calls now: :data:`ONEDNN_LAYERS`, and torch's
    ``torch.backends.mkldnn.enabled`` switch on (as torch's own layers respect it)."""
    return ONEDNN_LAYERS and torch.backends.mkldnn.enabled


@contextlib.contextmanager
def torch_layers() -> Iterator[None]:
    """Within the block, the block CNN runs torch's layers (:data:`ONEDNN_LAYERS` off); the
    flag as it was afterwards (for comparisons and FLOP counts: torch's counter does not see
    oneDNN's fused calls)."""
    global ONEDNN_LAYERS
    fused, ONEDNN_LAYERS = ONEDNN_LAYERS, False
    try:
        yield
    finally:
        ONEDNN_LAYERS = fused


def with_torch_layers_fallback(run):  # noqa: ANN001, ANN201 (a call and its result)
    """``run()``; where it raises ``RuntimeError`` with :func:`onednn_layers` on and succeeds
    with them off, this torch's oneDNN refused a fused operation (a build without the
    activation, say): :data:`ONEDNN_LAYERS` stays off for the process (logged once) and the
    second result is returned. Where torch's layers fail too, their error is raised and the flag
    restored (it was not oneDNN's doing)."""
    global ONEDNN_LAYERS
    if not onednn_layers():
        return run()
    try:
        return run()
    except RuntimeError as error:
        ONEDNN_LAYERS = False
        try:
            result = run()
        except Exception:
            ONEDNN_LAYERS = True
            raise  # (torch's layers' own error: what the call raised before the fused layers)
        logging.getLogger(__name__).warning(
            "oneDNN's fused layers failed (%s: %s); the block CNN runs torch's layers",
            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return result


def onednn_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """``conv``'s weight reordered once into the layout oneDNN picks for it (for channels-last
    inputs of 64^2 maps; other sizes give the same numbers), for :func:`conv_leaky`; the weight
    as it is where torch cannot reorder it."""
    weight = conv.weight.detach()
    reorder = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
    if not onednn_layers() or reorder is None:
        return weight
    try:
        return reorder(weight, list(conv.padding), list(conv.stride), list(conv.dilation),
                       conv.groups, [2, conv.in_channels, 64, 64])
    except (RuntimeError, TypeError):
        return weight


def conv_leaky(x: torch.Tensor, conv: torch.nn.Conv2d, slope: float,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """``leaky_relu(conv(x), slope)`` in one oneDNN call (channels-last ``x`` in and out) for a
    zero-padded ``conv``, with ``weight`` (:func:`onednn_weight`) in place of its own where
    given; torch's two layers where :data:`ONEDNN_LAYERS` is off."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"conv_leaky takes zero-padded convolutions with numeric padding, got "
                         f"{conv}")
    if not onednn_layers():
        return torch.nn.functional.leaky_relu_(conv(x), slope)
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight if weight is None else weight, conv.bias, list(conv.padding),
        list(conv.stride), list(conv.dilation), conv.groups, "leaky_relu", [float(slope)], "")


def linear_leaky(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float
                 ) -> torch.Tensor:
    """``leaky_relu(x @ weight^T + bias, slope)`` for a 2-D ``x`` in one oneDNN call (torch's
    ``addmm`` and activation where :data:`ONEDNN_LAYERS` is off)."""
    if not onednn_layers():
        return torch.nn.functional.leaky_relu_(torch.addmm(bias, x, weight.t()), slope)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "leaky_relu", [float(slope)], "")


def times_transposed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` for 2-D float32 ``a`` and contiguous ``b`` (oneDNN's product where
    :data:`ONEDNN_LAYERS` is on: for the last layer's tap planes, 18 x 24 by 24 x 8192, 0.57x
    MKL's time; the stacked head's block-diagonal 36 x 48 by 48 x 4096, 0.65x)."""
    if not onednn_layers():
        return torch.mm(a, b.t())
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@numba.njit(**_JIT_FUSED)
def _bound_logits(maps: np.ndarray, sources: int, bound: float) -> None:
    """In place on ``maps`` (B, 2 K, h, w): each position's selection logits (channels 0, 2,
    ...) centred on their mean over the ``sources`` and bounded, ``L tanh(l / L)`` with
    ``tanh(u) = 2 sigmoid(2 u) - 1`` (the vectorising :func:`sigmoid`)."""
    images, positions = maps.shape[0], maps.shape[2] * maps.shape[3]
    flat = maps.reshape(images, maps.shape[1], positions)
    scale, two = _F32(1.0) / _F32(sources), _F32(2.0)
    mean = np.empty(positions, np.float32)
    for image in range(images):  # loops along the positions, which vectorise
        mean[:] = 0.0
        for source in range(sources):
            logits = flat[image, 2 * source]
            for position in range(positions):
                mean[position] += logits[position]
        for source in range(sources):
            logits = flat[image, 2 * source]
            for position in range(positions):
                u = (logits[position] - mean[position] * scale) / bound
                logits[position] = bound * (two * sigmoid(two * u) - _F32(1.0))


def bound_logits(maps: torch.Tensor, sources: int, bound: float) -> torch.Tensor:
    """``FusionNet._bounded`` of contiguous float32 block maps ``(B, 2 K, h, w)``, in place
    (within float32 rounding of torch's ``tanh``); returns ``maps``."""
    if (maps.dtype != torch.float32 or not maps.is_contiguous() or maps.dim() != 4
            or maps.shape[1] != 2 * sources or not bound > 0):
        raise ValueError(f"bound_logits got maps {maps.dtype} {tuple(maps.shape)} for "
                         f"{sources} sources and bound {bound}")
    _bound_logits(maps.numpy(), sources, _F32(bound))
    return maps


@numba.njit(**_JIT)
def _largest_gain_sigmoid(maps: np.ndarray) -> float:
    """``sigmoid`` of the largest gain in the block maps ``(B, 2 K, h, w)``; NaN if a gain is."""
    largest = -_EXP_LIMIT
    for image in range(maps.shape[0]):
        for channel in range(1, maps.shape[1], 2):
            for row in range(maps.shape[2]):
                for column in range(maps.shape[3]):
                    value = maps[image, channel, row, column]
                    if value != value:
                        return np.nan
                    largest = max(largest, value)
    return sigmoid(largest)


def compose_two(x: torch.Tensor, maps: torch.Tensor, coarse: torch.Tensor,
                max_prior: torch.Tensor, block: int, base_pool: int) -> torch.Tensor:
    """The fused ``(B, 1, H, W)`` image in [0, 1] of two float32 CPU sources ``x`` from the
    block maps ``(B, 4, H / block, W / block)`` (logit and gain of each source) and the base
    means ``coarse`` ``(B, 2, H / base_pool, W / base_pool)``: ``combine_sources`` of the
    bilinearly upsampled maps and base layers, clamped, without full-size intermediates. Where
    every gain's sigmoid is below :data:`DEAD_GAIN_SIGMOID` the detail terms and the base layer
    are left out (the same image to float32 rounding, in ~0.45x the time: 0.10 against 0.23 ms
    for a 512^2 pair)."""
    b, _, h, w = x.shape
    # the loops index without bounds checks: shapes that do not fit are refused here
    if (x.shape[1] != 2 or maps.shape != (b, 4, h // block, w // block) or h % block or w % block
            or coarse.shape != (b, 2, h // base_pool, w // base_pool) or h % base_pool
            or w % base_pool or {x.dtype, maps.dtype, coarse.dtype} != {torch.float32}):
        raise ValueError(f"compose_two got sources {tuple(x.shape)}, maps {tuple(maps.shape)} "
                         f"and base means {tuple(coarse.shape)} (float32 needed) for blocks of "
                         f"{block} and {base_pool}")
    fused = torch.empty((b, 1, h, w), dtype=torch.float32)
    maps = maps.contiguous()
    with_detail = not _largest_gain_sigmoid(maps.numpy()) < DEAD_GAIN_SIGMOID  # NaN: True
    _in_bands(_compose_rows, _compose_bands, b * h, x.contiguous().numpy(), maps.numpy(),
              coarse.contiguous().numpy(), _F32(float(max_prior.detach())), block, base_pool,
              with_detail, fused.numpy())
    return fused
