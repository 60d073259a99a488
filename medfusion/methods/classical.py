"""Classical fusion baselines in torch: pixel average, pixel maximum, Laplacian pyramid.

All three work on whole batches (B, K, H, W) at once, on CPU or GPU, with no Python loop over
images or sources. They are the baselines every fusion comparison reports and the fallback when
the CNN bundle is missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# 5-tap binomial kernel (Burt & Adelson's a = 0.375 generating kernel), applied separably.
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
MIN_LEVEL_SIZE = 8
MAX_LEVELS = 5


class AverageFusion:
    """Pixel-wise mean of the sources."""

    name = "average"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=1).clamp_(0.0, 1.0)


class MaxFusion:
    """Pixel-wise maximum of the sources."""

    name = "max"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.amax(dim=1).clamp_(0.0, 1.0)


class LaplacianPyramidFusion:
    """Laplacian pyramid fusion: keep the detail coefficient with the largest magnitude at each
    pixel and level (the sharpest source wins), average the coarsest (base) level.

    ``levels=None`` picks as many levels as keep the coarsest level at least 8 pixels wide
    (at most 5). The decomposition reconstructs its input exactly, so identical sources give
    back the source.
    """

    name = "laplacian"

    def __init__(self, levels: int | None = None) -> None:
        self.levels = levels

    def _levels_for(self, height: int, width: int) -> int:
        if self.levels is not None:
            return self.levels
        possible = int(math.floor(math.log2(max(min(height, width), 1) / MIN_LEVEL_SIZE)))
        return max(0, min(MAX_LEVELS, possible))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        b, k, h, w = batch.shape
        images = batch.reshape(b * k, 1, h, w)
        details: list[torch.Tensor] = []
        current = images
        for _ in range(self._levels_for(h, w)):
            smaller = _reduce(current)
            details.append(current - _expand(smaller, current.shape[-2:]))
            current = smaller
        fused = current.reshape(b, k, *current.shape[-2:]).mean(dim=1, keepdim=True)
        for detail in reversed(details):
            stacked = detail.reshape(b, k, *detail.shape[-2:])
            fused = _expand(fused, detail.shape[-2:]) + _max_abs(stacked)[:, None]
        return fused[:, 0].clamp_(0.0, 1.0)


def _max_abs(stacked: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, H, W): per pixel, the value of largest magnitude (first on ties).

    A loop over the few sources with ``torch.where`` is much faster on CPU than ``argmax`` +
    ``gather`` over a short dimension, and stays vectorised over the batch and pixels.
    """
    chosen = stacked[:, 0]
    magnitude = chosen.abs()
    for index in range(1, stacked.shape[1]):
        candidate = stacked[:, index]
        candidate_magnitude = candidate.abs()
        larger = candidate_magnitude > magnitude
        chosen = torch.where(larger, candidate, chosen)
        magnitude = torch.where(larger, candidate_magnitude, magnitude)
    return chosen


def _reduce(images: torch.Tensor) -> torch.Tensor:
    """Next, coarser pyramid level: separable 5x5 binomial blur with reflected borders, kept
    at every second pixel (the strided convolutions compute only the kept pixels)."""
    kernel = torch.tensor(_BINOMIAL, dtype=images.dtype, device=images.device)
    kernel = kernel / kernel.sum()
    h, w = images.shape[-2:]
    mode = "reflect" if min(h, w) > 2 else "replicate"
    padded = F.pad(images, (2, 2, 2, 2), mode=mode)
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, 5), stride=(1, 2))
    return F.conv2d(blurred, kernel.view(1, 1, 5, 1), stride=(2, 1))


def _expand(images: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Upsample a coarser level to ``size`` (bilinear, so odd sizes work)."""
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


_METHODS = {"average": AverageFusion, "max": MaxFusion, "laplacian": LaplacianPyramidFusion}


def build(name: str, device: torch.device | None = None):
    """Return a new classical method (they hold no tensors, so ``device`` needs no action)."""
    return _METHODS[name]()
