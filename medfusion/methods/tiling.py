"""The memory tile of the learned methods: one budget, whole slices in batches, row strips.

Every network call of ``cnn`` (the fusion CNN) and ``sesf`` (its encoder) goes through
:func:`run_tiled`: slices run whole, as many per call as their estimated working memory
(``bytes_per_pixel`` x channels x pixels) fits the budget; a slice too large for the budget on
its own runs in row strips with a ``halo`` of rows above and below (at least the network's
receptive field), so each strip's kept rows are computed from the same neighbourhood as in the
whole slice and the result is the whole-slice result.

The budget is read here and nowhere else: ``MEDFUSION_MEMORY_BUDGET_MB`` (default 256), the same
number the engine sizes its method calls with (:func:`medfusion.engine.slices_per_call`), so a
method call from the engine is never split again for memory and only an oversized slice is
tiled; a method may still split it into smaller calls for speed (``max_pixels``: the CNN's
cache tile on CPU).
A method may still be given an explicit budget (``memory_budget_mb``) for tests or callers that
want another bound.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from medfusion.errors import InputError

if TYPE_CHECKING:  # the engine imports the budget without torch
    import torch

MEMORY_BUDGET_ENV = "MEDFUSION_MEMORY_BUDGET_MB"
DEFAULT_MEMORY_BUDGET_MB = 256.0


def check_budget(value: Any) -> float:
    """A memory budget in MB, checked: a positive number (one-line InputError otherwise)."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise InputError(f"memory budget must be a number of MB, got {value!r}") from None
    if not budget > 0:
        raise InputError(f"memory budget must be positive, got {value!r} MB")
    return budget


def memory_budget_mb() -> float:
    """The memory one method call may use for its working set, in MB (the environment's
    ``MEDFUSION_MEMORY_BUDGET_MB``, read at each call, or the default 256)."""
    text = os.environ.get(MEMORY_BUDGET_ENV)
    if not text:
        return DEFAULT_MEMORY_BUDGET_MB
    try:
        return max(1.0, float(text))
    except ValueError:
        raise InputError(f"{MEMORY_BUDGET_ENV} must be a number of MB, got {text!r}") from None


def memory_budget_bytes(budget_mb: float | None = None) -> int:
    """``budget_mb`` (default: :func:`memory_budget_mb`) in bytes."""
    return int((memory_budget_mb() if budget_mb is None else budget_mb) * 2**20)


def tile(
    channels: int,
    height: int,
    width: int,
    bytes_per_pixel: float,
    halo: int,
    align: int = 1,
    budget_mb: float | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """``(slices per call, rows per strip)`` for slices of ``channels x height x width``.

    Slices that fit the budget run whole (``rows == height``), as many per call as fit and, when
    ``max_pixels`` is given, no more than keep ``channels x height x width x slices`` within it
    (a cache tile: on CPU a network's temporaries stay in cache); a larger slice runs alone in
    strips of a multiple of ``align`` rows (at least ``align``), each with ``halo`` rows on both
    sides counted in its memory.
    """
    budget = memory_budget_bytes(budget_mb)
    per_slice = bytes_per_pixel * channels * height * width
    if per_slice <= budget:
        slices = max(1, int(budget // max(per_slice, 1.0)))
        if max_pixels is not None:
            slices = min(slices, max(1, max_pixels // max(channels * height * width, 1)))
        return slices, height
    rows = int(budget // (bytes_per_pixel * channels * width)) - 2 * halo
    return 1, max(align, rows // align * align)


def run_tiled(
    run: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    bytes_per_pixel: float,
    halo: int,
    align: int = 1,
    budget_mb: float | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """``run`` ((N, C, H, W) -> (N, C', H, W), shape-preserving in H and W) applied to
    ``inputs`` (B, C, H, W) within the memory tile of :func:`tile`; the same result as
    ``run(inputs)``. ``halo`` and ``align`` must be multiples of the network's stride."""
    import torch

    b, c, h, w = inputs.shape
    slices, rows = tile(c, h, w, bytes_per_pixel, halo, align, budget_mb, max_pixels)
    if rows >= h:
        parts = [run(inputs[i : i + slices]) for i in range(0, b, slices)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    out: torch.Tensor | None = None
    for i in range(b):
        for top in range(0, h, rows):
            start, stop = max(0, top - halo), min(h, top + rows + halo)
            strip = run(inputs[i : i + 1, :, start:stop])
            if out is None:
                out = strip.new_empty((b, strip.shape[1], h, w))
            kept = min(rows, h - top)
            out[i : i + 1, :, top : top + kept] = strip[:, :, top - start : top - start + kept]
    assert out is not None
    return out
