"""Decision-map fusion of the SESF bundle: the one copy, used by the bundle and by ``medfusion``.

Why here: the bundle used on its own (``python -m monai.bundle run --config_file
configs/inference.json``, without ``medfusion``) must fuse exactly as ``medfusion fuse --method
sesf`` does, so the decision procedure lives in the bundle and the core loads this very file
(``medfusion.methods.sesf``, like ``medfusion.color`` loads the cnn bundle's ``colour.py``). The
box mean and guided filter it needs are MedFusion's only ones: the core's ``gff`` method loads
them from here too (``medfusion.methods.classical``), so there is one guided filter in the
project. Torch, NumPy and SciPy only; no import of ``medfusion`` or of the bundle's other code.

Steps (after SESF-Fuse, Ma et al. 2021; Raj et al. 2024), :func:`decision_fusion`:

1. activity of each source: the spatial frequency of its deep features in a (2r+1)^2 window
   (:func:`feature_energy`, :func:`spatial_frequency`);
2. **block size** ``2^i`` (the paper's block exponent ``i``): the activity is averaged over
   ``2^i x 2^i`` blocks (:func:`block_pool`) and the decision is made per block: smaller ``i``
   is more precise, larger is faster;
3. the most active source wins each block (ties: the first, the reference);
4. **consistency verification** on the block grid: a majority filter, then regions smaller than
   ``min_region`` of the grid take the label of the nearest kept block
   (:func:`verify_consistency`);
5. the block labels are repeated (nearest) to full resolution and made **soft with a guided
   filter** guided by the sources' mean (:func:`soft_weights`): boundaries follow image edges;
6. fused = sum of weight x source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIZE = 8  # smaller slices are padded (replicated borders) to this size and cropped back
DEFAULTS = {  # the shipped settings (configs/inference.json "fusion")
    "sf_radius": 2,  # spatial-frequency window: (2r+1)^2 pixels
    "majority_radius": 1,  # mode filter of the label map, in blocks
    "min_region": 0.001,  # regions under this fraction of the block grid are removed
    "guided_radius": 4,  # soft map: guided filter of the labels, in pixels
    "guided_eps": 0.01,
}


class Decision(NamedTuple):
    """Result of :func:`decision_fusion`, all on the sources' device.

    ``fused`` (B, H, W); ``winners`` (B, H, W) uint8 1..K: the source of largest soft weight;
    ``hard`` (B, H, W) int64 0..K-1: the verified block decision before the soft step.
    """

    fused: torch.Tensor
    winners: torch.Tensor
    hard: torch.Tensor


# ---------------------------------------------------------------------- filters (shared with gff)
def window_counts(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """How many pixels of a line of ``size`` fall in the window centred on each pixel."""
    index = torch.arange(size, device=device)
    return ((index + radius).clamp(max=size - 1) - (index - radius).clamp(min=0) + 1).double()


def box_mean(images: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window clipped to the image (He et al.'s border handling: divide
    by the number of pixels inside), for (N, 1, H, W) on any device.

    Separable running sums: O(1) per pixel whatever the radius. They run in float64 because a
    float32 running sum over a row loses the precision the guided filter's tiny ``eps``
    (1e-6 in gff) needs in its variance.
    """
    h, w = images.shape[-2:]
    size = 2 * radius + 1
    running = F.pad(images.double(), (radius + 1, radius)).cumsum(dim=-1)
    # Columns are summed as rows of the transpose: a cumulative sum along the contiguous
    # last dimension is much faster on CPU than along a strided one.
    rows = (running[..., size:] - running[..., :w]).transpose(-1, -2)
    running = F.pad(rows, (radius + 1, radius)).cumsum(dim=-1)
    sums = (running[..., size:] - running[..., :h]).transpose(-1, -2).to(images.dtype)
    counts = window_counts(h, radius, images.device)[:, None] * window_counts(
        w, radius, images.device
    )[None, :]
    return sums * counts.reciprocal().to(images.dtype)


def guided_filter(
    guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float
) -> torch.Tensor:
    """He et al.'s guided filter of ``source`` with a grey ``guide``, both (N, 1, H, W); the
    four box means of one filter run as one batch."""
    n = guide.shape[0]
    means = box_mean(torch.cat([guide, source, guide * source, guide * guide]), radius)
    mean_i, mean_p, mean_ip, mean_ii = means.split(n)
    variance = (mean_ii - mean_i * mean_i).clamp_(min=0.0)
    slope = (mean_ip - mean_i * mean_p) / (variance + eps)
    offset = mean_p - slope * mean_i
    mean_slope, mean_offset = box_mean(torch.cat([slope, offset]), radius).split(n)
    return mean_slope * guide + mean_offset


def normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """Weights summing to one per pixel over the sources (dim 1).

    The guided filter can overshoot slightly below 0; negative weights are clipped so that a
    near-zero sum cannot blow a pixel up, and a tiny floor makes a pixel where every weight
    was clipped an equal mix.
    """
    weights = weights.clamp(min=0.0).add_(1e-12)
    return weights / weights.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------- activity
def feature_energy(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) deep features -> (N, 1, H, W): squared row + column differences summed over
    channels (the spatial frequency's inner sum; replicated first row and column)."""
    padded = F.pad(features, (1, 0, 1, 0), mode="replicate")
    rows = padded[..., 1:, 1:] - padded[..., 1:, :-1]
    columns = padded[..., 1:, 1:] - padded[..., :-1, 1:]
    return (rows * rows + columns * columns).sum(dim=1, keepdim=True)


class FeatureEnergy(torch.nn.Module):
    """A network's ``encode`` followed by :func:`feature_energy`: (N, 1, H, W) images to their
    (N, 1, H, W) energies, as one module: what the activity step runs (the bundle's inference
    and ``medfusion``'s sesf method), and what an inference backend can export as one graph."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return feature_energy(self.network.encode(images))


def receptive_radius(module: torch.nn.Module) -> int:
    """Rows of context one output pixel of ``module`` (a chain of convolutions) may depend on,
    plus the one row of :func:`feature_energy`'s difference: the halo a row strip needs to equal
    the whole slice. Counts every convolution (an upper bound for dense blocks)."""
    radius = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            radius += (layer.kernel_size[0] - 1) // 2 * layer.dilation[0]
    return radius + 1


def spatial_frequency(energy: torch.Tensor, radius: int) -> torch.Tensor:
    """Spatial frequency (N, 1, H, W): square root of the energy's (2r+1)^2 window mean."""
    return box_mean(energy, int(radius)).clamp_(min=0.0).sqrt_()


def block_pool(activity: torch.Tensor, exponent: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, ceil(H / 2^i), ceil(W / 2^i)): the mean over each ``2^i`` block
    (the last row and column of blocks average only the pixels inside the image)."""
    if exponent <= 0:
        return activity
    size = 2**exponent
    h, w = activity.shape[-2:]
    pad = (0, -w % size, 0, -h % size)
    sums = F.avg_pool2d(F.pad(activity, pad), size)
    inside = F.avg_pool2d(F.pad(torch.ones_like(activity[:1, :1]), pad), size)
    return sums / inside


def to_pixels(labels: torch.Tensor, exponent: int, height: int, width: int) -> torch.Tensor:
    """(B, h, w) block labels -> (B, height, width): each block's label on its pixels."""
    if exponent > 0:
        size = 2**exponent
        labels = labels.repeat_interleave(size, dim=-2).repeat_interleave(size, dim=-1)
    return labels[..., :height, :width]


# ---------------------------------------------------------------------- decision map
def majority_filter(labels: torch.Tensor, sources: int, radius: int) -> torch.Tensor:
    """(B, H, W) labels -> the most frequent label in each (2r+1)^2 window (lowest on ties)."""
    if radius <= 0:
        return labels
    b, h, w = labels.shape
    one_hot = F.one_hot(labels.long(), sources).permute(0, 3, 1, 2).float()
    votes = box_mean(one_hot.reshape(b * sources, 1, h, w), radius).reshape(b, sources, h, w)
    return votes.argmax(dim=1)


def verify_consistency(
    labels: np.ndarray, sources: int, majority_radius: int, min_region: float
) -> np.ndarray:
    """Clean (B, H, W) label maps: majority filter, then every connected region of one label
    smaller than ``min_region`` of the map's area takes the label of the nearest kept pixel
    (for two sources: small islands flip to the surrounding source). Returns int64 labels."""
    from scipy import ndimage

    cleaned = majority_filter(torch.from_numpy(labels), sources, majority_radius).numpy()
    out = np.empty_like(cleaned)
    for index, plane in enumerate(cleaned):
        min_area = min_region * plane.size
        small = np.zeros(plane.shape, dtype=bool)
        for source in range(sources):
            regions, count = ndimage.label(plane == source)
            if count == 0:
                continue
            sizes = np.bincount(regions.ravel())
            too_small = sizes < min_area
            too_small[0] = False
            small |= too_small[regions]
        if small.any() and not small.all():
            _, (rows, cols) = ndimage.distance_transform_edt(small, return_indices=True)
            plane = plane[rows, cols]
        out[index] = plane
    return out


def soft_weights(
    labels: torch.Tensor, sources: int, guide: torch.Tensor, radius: int, eps: float
) -> torch.Tensor:
    """(B, K, H, W) weights summing to one: each source's binary map guided-filtered with the
    sources' mean (B, 1, H, W) as guide (the filter is linear, so one guide keeps the sum)."""
    b, h, w = labels.shape
    one_hot = F.one_hot(labels.long(), sources).permute(0, 3, 1, 2).to(guide.dtype)
    guides = guide.expand(b, sources, h, w).reshape(b * sources, 1, h, w)
    filtered = guided_filter(guides, one_hot.reshape(b * sources, 1, h, w), radius, eps)
    return normalise_weights(filtered.reshape(b, sources, h, w))


def check_settings(settings: Mapping[str, Any] | None) -> dict[str, float]:
    """The ``fusion`` settings with defaults filled in; ValueError for unknown or non-numeric."""
    settings = dict(settings or {})
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown fusion setting(s) {sorted(unknown)}; "
                         f"known: {', '.join(DEFAULTS)}")
    try:
        return {key: float(settings.get(key, value)) for key, value in DEFAULTS.items()}
    except (TypeError, ValueError):
        raise ValueError(f"non-numeric fusion setting in {settings}") from None


def decision_fusion(
    sources: torch.Tensor,
    energy: Callable[[torch.Tensor], torch.Tensor],
    block_exponent: int,
    settings: Mapping[str, float],
) -> Decision:
    """Fuse (B, K, H, W) float sources in [0, 1] through a verified block decision map.

    ``energy`` maps (N, 1, H, W) images to their (N, 1, H, W) :func:`feature_energy` (the
    encoder, possibly tiled); ``settings`` as :func:`check_settings` returns them.
    """
    b, k, h, w = sources.shape
    padded = F.pad(sources, (0, max(0, MIN_SIZE - w), 0, max(0, MIN_SIZE - h)), mode="replicate")
    ph, pw = padded.shape[-2:]
    images = padded.reshape(b * k, 1, ph, pw)
    activity = spatial_frequency(energy(images), int(settings["sf_radius"]))
    blocks = block_pool(activity, block_exponent)
    blocks = blocks.reshape(b, k, *blocks.shape[-2:])
    labels = verify_consistency(blocks.argmax(dim=1).cpu().numpy(), k,
                                int(settings["majority_radius"]), float(settings["min_region"]))
    hard = to_pixels(torch.from_numpy(labels).to(sources.device), block_exponent, ph, pw)
    weights = soft_weights(hard, k, padded.mean(dim=1, keepdim=True),
                           int(settings["guided_radius"]), float(settings["guided_eps"]))
    fused = (weights * padded).sum(dim=1)[:, :h, :w].clamp_(0.0, 1.0)
    winners = weights[:, :, :h, :w].argmax(dim=1).to(torch.uint8) + 1
    return Decision(fused, winners, hard[:, :h, :w])
