"""The ``sesf`` fusion method: an unsupervised auto-encoder's features and a decision map.

After SESF-Fuse (Ma et al., Neural Computing and Applications 2021) as used for brain images by
Raj et al. (2024): the ``sesf_bundle/`` encoder (trained without targets, by reconstructing
single sources) turns each source into deep features; the activity of a source at a pixel is
the **spatial frequency** of its features in a small window; the most active source wins the
pixel. **Consistency verification** cleans that label map: a majority (mode) filter removes
speckle and connected regions smaller than a fraction of the slice are given to the
surrounding source. The labels are then made **soft with a guided filter** (He et al.) guided by
the sources' mean, so that region boundaries follow image edges and fade over a few pixels
instead of showing seams; the fused slice is the per-pixel weighted sum of the sources.

The network is loaded through :mod:`medfusion.methods.bundle` (one path with ``cnn``); the
fusion settings are the bundle's ``fusion`` entry of ``configs/inference.json``, and the
sliding window (``block_size``, ``overlap``) follows the same rules as ``cnn``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfusion.errors import ModelError
from medfusion.methods import bundle
from medfusion.methods.classical import _box_mean, _guided_filter, _normalise_weights
from medfusion.resources import sesf_bundle_dir

DEFAULT_BUNDLE = sesf_bundle_dir()  # package data: medfusion/sesf_bundle (medfusion.resources)
MIN_SOURCES = 2
MIN_SIZE = 8  # smaller slices are padded (replicated borders) to this size and cropped back
FEATURE_CHUNK = 8  # images encoded at once: bounds the deep-feature memory of a batch
FUSION_DEFAULTS = {  # the shipped bundle's settings (configs/inference.json "fusion")
    "sf_radius": 2,  # spatial-frequency window: (2r+1)^2 pixels
    "majority_radius": 1,  # mode filter of the label map
    "min_region": 0.001,  # regions under this fraction of the slice area are removed
    "guided_radius": 4,  # soft map: guided filter of the labels
    "guided_eps": 0.01,
}


class SESFFusion:
    """Callable fusion method ``(B, K, H, W) -> (B, H, W)``: decision-map fusion of K >= 2
    sources with the SESF bundle's encoder as activity measure.

    Args:
        bundle_dir: bundle folder; default the shipped ``sesf_bundle/``.
        device: torch device for the network.
        block_size, overlap: sliding window of the encoder (default: the bundle's).
    """

    name = "sesf"

    def __init__(
        self,
        bundle_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        block_size: int | None = None,
        overlap: float | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir if bundle_dir is not None else DEFAULT_BUNDLE).resolve()
        self.device = torch.device(device)
        required = ("network_def", "inferer", "block_size", "overlap", "fusion")
        overrides = {"block_size": block_size, "overlap": overlap}
        parser, self.network = bundle.load_network(
            self.bundle_dir, self.device, "SESF", required, overrides
        )
        if not callable(getattr(self.network, "encode", None)):
            raise ModelError(f"the network of bundle {self.bundle_dir} has no encode() method")
        self.block_size, self.overlap = bundle.check_block(parser["block_size"], parser["overlap"])
        parser["block_size"], parser["overlap"] = self.block_size, self.overlap
        self.inferer = bundle.parsed(parser, "inferer", self.bundle_dir)
        settings = bundle.parsed(parser, "fusion", self.bundle_dir)
        if not isinstance(settings, dict) or set(settings) - set(FUSION_DEFAULTS):
            raise ModelError(f"bundle {self.bundle_dir} has a 'fusion' entry other than a dict of "
                             f"{', '.join(FUSION_DEFAULTS)}")
        try:
            self.settings = {key: float(settings.get(key, value))
                             for key, value in FUSION_DEFAULTS.items()}
        except (TypeError, ValueError) as error:
            raise ModelError(f"non-numeric fusion setting in bundle {self.bundle_dir}") from error

    # ------------------------------------------------------------------ activity
    def _energy(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, 1, H, W): squared row + column differences of the deep features,
        summed over channels (the spatial frequency's inner sum)."""
        features = self.network.encode(images)
        padded = F.pad(features, (1, 0, 1, 0), mode="replicate")
        rows = padded[..., 1:, 1:] - padded[..., 1:, :-1]
        columns = padded[..., 1:, 1:] - padded[..., :-1, 1:]
        return (rows * rows + columns * columns).sum(dim=1, keepdim=True)

    def activity(self, images: torch.Tensor) -> torch.Tensor:
        """Spatial frequency of the deep features of (N, 1, H, W) images, (N, 1, H, W)."""
        energies = []
        for chunk in images.split(FEATURE_CHUNK):
            if max(chunk.shape[-2:]) <= self.block_size:
                energies.append(self._energy(chunk))
            else:
                energies.append(self.inferer(chunk, self._energy))
        energy = torch.cat(energies)
        return _box_mean(energy, int(self.settings["sf_radius"])).clamp_(min=0.0).sqrt_()

    # ------------------------------------------------------------------ decision map
    def fuse_with_decision(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused (B, H, W), labels (B, H, W) uint8)`` on the batch's device.

        ``labels`` is the decision map for inspection: 1..K, the source (1 = reference) with the
        largest soft weight at each pixel.
        """
        _check_batch(batch)
        source_device = batch.device
        sources = batch.to(self.device, torch.float32)
        b, k, h, w = sources.shape
        padded = F.pad(sources, (0, max(0, MIN_SIZE - w), 0, max(0, MIN_SIZE - h)),
                       mode="replicate")
        ph, pw = padded.shape[-2:]
        with torch.inference_mode():
            activity = self.activity(padded.reshape(b * k, 1, ph, pw)).reshape(b, k, ph, pw)
            labels = verify_consistency(
                activity.argmax(dim=1).cpu().numpy(), k,
                int(self.settings["majority_radius"]), float(self.settings["min_region"]),
            )
            hard = torch.from_numpy(labels).to(self.device)
            weights = soft_weights(hard, k, padded.mean(dim=1, keepdim=True),
                                   int(self.settings["guided_radius"]),
                                   float(self.settings["guided_eps"]))
            fused = (weights * padded).sum(dim=1)[:, :h, :w].clamp_(0.0, 1.0)
            winners = weights[:, :, :h, :w].argmax(dim=1).to(torch.uint8) + 1
        return fused.to(source_device), winners.to(source_device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, K, H, W)`` float sources in [0, 1] into ``(B, H, W)`` on the same device."""
        return self.fuse_with_decision(batch)[0]


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ModelError(f"sesf expects a (B, K, H, W) batch of sources, got {shape}")
    if batch.shape[1] < MIN_SOURCES:
        raise ModelError(
            f"sesf fuses {MIN_SOURCES} or more single-channel sources, got {batch.shape[1]} "
            "channel(s); colour inputs must enter as luminance"
        )


def majority_filter(labels: torch.Tensor, sources: int, radius: int) -> torch.Tensor:
    """(B, H, W) labels -> the most frequent label in each (2r+1)^2 window (lowest on ties)."""
    if radius <= 0:
        return labels
    b, h, w = labels.shape
    one_hot = F.one_hot(labels.long(), sources).permute(0, 3, 1, 2).float()
    votes = _box_mean(one_hot.reshape(b * sources, 1, h, w), radius).reshape(b, sources, h, w)
    return votes.argmax(dim=1)


def verify_consistency(
    labels: np.ndarray, sources: int, majority_radius: int, min_region: float
) -> np.ndarray:
    """Clean (B, H, W) label maps: majority filter, then every connected region of one label
    smaller than ``min_region`` of the slice area takes the label of the nearest kept pixel
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
    filtered = _guided_filter(guides, one_hot.reshape(b * sources, 1, h, w), radius, eps)
    return _normalise_weights(filtered.reshape(b, sources, h, w))


def build_method(device: str | torch.device = "cpu", **options: Any) -> SESFFusion:
    """Registry entry point (``medfusion.methods.get_method("sesf", ...)``)."""
    return SESFFusion(device=device, **options)
