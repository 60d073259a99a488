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


def _window_counts(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """How many pixels of a line of ``size`` fall in the window centred on each pixel."""
    index = torch.arange(size, device=device)
    return ((index + radius).clamp(max=size - 1) - (index - radius).clamp(min=0) + 1).double()


def _box_mean(images: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window clipped to the image (He et al.'s border handling: divide
    by the number of pixels inside), for (N, 1, H, W) on any device.

    Separable running sums: O(1) per pixel whatever the radius. They run in float64 because a
    float32 running sum over a row loses the precision the guided filter's tiny ``eps2``
    (1e-6) needs in its variance.
    """
    h, w = images.shape[-2:]
    size = 2 * radius + 1
    running = F.pad(images.double(), (radius + 1, radius)).cumsum(dim=-1)
    # Columns are summed as rows of the transpose: a cumulative sum along the contiguous
    # last dimension is much faster on CPU than along a strided one.
    rows = (running[..., size:] - running[..., :w]).transpose(-1, -2)
    running = F.pad(rows, (radius + 1, radius)).cumsum(dim=-1)
    sums = (running[..., size:] - running[..., :h]).transpose(-1, -2).to(images.dtype)
    counts = _window_counts(h, radius, images.device)[:, None] * _window_counts(
        w, radius, images.device
    )[None, :]
    return sums * counts.reciprocal().to(images.dtype)


def _guided_filter(
    guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float
) -> torch.Tensor:
    """He et al.'s guided filter of ``source`` with a grey ``guide``, both (N, 1, H, W); the
    four box means of one filter run as one batch."""
    n = guide.shape[0]
    means = _box_mean(torch.cat([guide, source, guide * source, guide * guide]), radius)
    mean_i, mean_p, mean_ip, mean_ii = means.split(n)
    variance = (mean_ii - mean_i * mean_i).clamp_(min=0.0)
    slope = (mean_ip - mean_i * mean_p) / (variance + eps)
    offset = mean_p - slope * mean_i
    mean_slope, mean_offset = _box_mean(torch.cat([slope, offset]), radius).split(n)
    return mean_slope * guide + mean_offset


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


def _normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights summing to one per pixel over the sources (dim 1), as the paper prescribes.

    The guided filter can overshoot slightly below 0; negative weights are clipped so that a
    near-zero sum cannot blow a pixel up, and a tiny floor makes a pixel where every weight
    was clipped an equal mix.
    """
    weights = weights.clamp(min=0.0).add_(1e-12)
    return weights / weights.sum(dim=1, keepdim=True)


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
