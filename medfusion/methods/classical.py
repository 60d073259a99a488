"""Classical fusion baselines in torch: pixel average, pixel maximum, Laplacian pyramid and
guided-filter fusion (GFF; Li, Kang & Hu, IEEE TIP 22(7), 2013).

All of them work on whole batches (B, K, H, W) at once, on CPU or GPU, with no Python loop over
images or sources. They are the baselines every fusion comparison reports and the fallback when
the CNN bundle is missing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medfusion.methods.sources import check_sources
from medfusion.resources import load_bundle_script, sesf_bundle_dir

# The box mean, guided filter and weight normalisation are the sesf bundle's
# (``sesf_bundle/scripts/fusion.py``): that bundle needs them when used alone, without
# medfusion, so their one copy lives there and gff loads the same file as the sesf method does.
_fusion = load_bundle_script(sesf_bundle_dir(), "scripts/fusion.py", "medfusion._sesf_fusion")
_box_mean = _fusion.box_mean
_guided_filter = _fusion.guided_filter
_normalise_weights = _fusion.normalise_weights

# 5-tap binomial kernel (Burt & Adelson's a = 0.375 generating kernel), applied separably.
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
MIN_LEVEL_SIZE = 8
MAX_LEVELS = 5


class AverageFusion:
    """Pixel-wise mean of the sources."""

    name = "average"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_sources(batch, self.name)
        return batch.mean(dim=1).clamp_(0.0, 1.0)


class MaxFusion:
    """Pixel-wise maximum of the sources."""

    name = "max"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_sources(batch, self.name)
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
        check_sources(batch, self.name)
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


class GuidedFilterFusion:
    """Guided-filter fusion (Li, Kang & Hu, "Image Fusion With Guided Filtering", IEEE TIP 2013).

    Two-scale decomposition with a mean filter (base = mean, detail = source - base); saliency
    = Gaussian-smoothed |Laplacian|; binary maps mark the most salient source per pixel and are
    refined by guided filtering with each source as guide, coarse for the base layers
    (``r1``, ``eps1``) and fine for the detail layers (``r2``, ``eps2``). The defaults are the
    paper's (intensities in [0, 1]). Identical sources give back the source.
    """

    name = "gff"

    def __init__(
        self,
        base_radius: int = 15,
        r1: int = 45,
        eps1: float = 0.3,
        r2: int = 7,
        eps2: float = 1e-6,
        gaussian_radius: int = 5,
        gaussian_sigma: float = 5.0,
    ) -> None:
        self.base_radius = base_radius
        self.r1, self.eps1, self.r2, self.eps2 = r1, eps1, r2, eps2
        self.gaussian_radius = gaussian_radius
        self.gaussian_sigma = gaussian_sigma

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_sources(batch, self.name)
        b, k, h, w = batch.shape
        images = batch.reshape(b * k, 1, h, w)
        base = _box_mean(images, self.base_radius)
        detail = images - base
        saliency = _gaussian_blur(
            _laplacian(images).abs_(), self.gaussian_radius, self.gaussian_sigma
        ).reshape(b, k, h, w)
        winners = _first_argmax_one_hot(saliency).reshape(b * k, 1, h, w)
        weight_base = _normalise_weights(
            _guided_filter(images, winners, self.r1, self.eps1).reshape(b, k, h, w)
        )
        weight_detail = _normalise_weights(
            _guided_filter(images, winners, self.r2, self.eps2).reshape(b, k, h, w)
        )
        fused = (weight_base * base.reshape(b, k, h, w)).sum(dim=1)
        fused += (weight_detail * detail.reshape(b, k, h, w)).sum(dim=1)
        return fused.clamp_(0.0, 1.0)


def _first_argmax_one_hot(stacked: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> same shape, 1 where a source is the per-pixel maximum (first on ties).

    A loop over the few sources (as in :func:`_max_abs`) is far faster on CPU than ``argmax``
    over a short dimension.
    """
    best = stacked[:, 0]
    winner = torch.zeros_like(best, dtype=torch.long)
    for index in range(1, stacked.shape[1]):
        larger = stacked[:, index] > best
        best = torch.where(larger, stacked[:, index], best)
        winner = torch.where(larger, index, winner)
    sources = torch.arange(stacked.shape[1], device=stacked.device).view(1, -1, 1, 1)
    return (sources == winner[:, None]).to(stacked.dtype)


def _laplacian(images: torch.Tensor) -> torch.Tensor:
    """3x3 Laplacian ([0 1 0; 1 -4 1; 0 1 0]) with replicated borders, as shifted sums (cheaper
    on CPU than a 3x3 convolution)."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    centre = padded[..., 1:-1, 1:-1]
    return (
        padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2]
        + padded[..., 1:-1, 2:] - 4.0 * centre
    )


def _gaussian_blur(images: torch.Tensor, radius: int, sigma: float) -> torch.Tensor:
    """Separable (2r+1)-tap Gaussian blur with replicated borders."""
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma * sigma))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


_METHODS = {
    "average": AverageFusion,
    "max": MaxFusion,
    "laplacian": LaplacianPyramidFusion,
    "gff": GuidedFilterFusion,
}


def build(name: str, device: torch.device | None = None):
    """Return a new classical method (they hold no tensors, so ``device`` needs no action)."""
    return _METHODS[name]()
