"""The ``cnn`` fusion method: the MONAI bundle's network, loaded through ``monai.bundle``.

There is no second copy of the network here: the bundle's ``configs/inference.json`` defines
``network_def`` and ``inferer`` (a sliding window whose ``roi_size`` is the paper's block size
``i``), ``ConfigParser`` builds them, and ``models/model.pt`` is read with
``torch.load(weights_only=True)``. Every problem with the bundle becomes a one-line
:class:`~medfusion.errors.ModelError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfusion.errors import ModelError
from medfusion.methods import bundle
from medfusion.methods.bundle import CONFIG, WEIGHTS, use_bundle_scripts  # noqa: F401 (public)
from medfusion.methods.bundle import check_block as _check_block

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "monai_bundle"
MIN_SOURCES = 2


class CNNFusion:
    """Callable fusion method ``(B, K, H, W) -> (B, H, W)`` backed by the bundle's CNN.

    Args:
        bundle_dir: bundle folder (``configs/inference.json``, ``models/model.pt``); default
            the shipped ``monai_bundle/``.
        device: torch device for the network.
        block_size: sliding-window size ``i`` in pixels; default the bundle's ``block_size``.
        overlap: sliding-window overlap in [0, 1); default the bundle's ``overlap``.
    """

    name = "cnn"

    def __init__(
        self,
        bundle_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        block_size: int | None = None,
        overlap: float | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir if bundle_dir is not None else DEFAULT_BUNDLE).resolve()
        self.device = torch.device(device)
        config_file, weights_file = bundle.bundle_files(self.bundle_dir, "CNN")
        parser = self._parser(config_file, block_size, overlap)
        self.block_size, self.overlap = _check_block(parser["block_size"], parser["overlap"])
        parser["block_size"], parser["overlap"] = self.block_size, self.overlap
        network = bundle.parsed(parser, "network_def", self.bundle_dir)
        self.inferer = bundle.parsed(parser, "inferer", self.bundle_dir)
        self.network = bundle.load_weights(network, weights_file, "CNN").to(self.device).eval()

    def _parser(self, config_file: Path, block_size: int | None, overlap: float | None):
        required = ("network_def", "inferer", "block_size", "overlap")
        overrides = {"block_size": block_size, "overlap": overlap}
        return bundle.read_config(self.bundle_dir, config_file, required, overrides)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, K, H, W)`` float sources in [0, 1] into ``(B, H, W)`` on the same device."""
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ModelError(f"the CNN expects a (B, K, H, W) batch of sources, got {shape}")
        if batch.shape[1] < MIN_SOURCES:
            raise ModelError(
                f"the CNN fuses {MIN_SOURCES} or more single-channel sources, got "
                f"{batch.shape[1]} channel(s); colour inputs must enter as luminance"
            )
        source_device = batch.device
        inputs = batch.to(self.device, torch.float32)
        with torch.inference_mode():
            if max(inputs.shape[-2:]) <= self.block_size:
                # One window covers the slice: the sliding-window blend would only divide the
                # network's output by its own weights, so skip it (same result, ~25 % faster).
                fused = self.network(inputs)
            else:
                fused = self.inferer(inputs, self.network)
        return fused[:, 0].clamp(0.0, 1.0).to(source_device)


def build_method(device: str | torch.device = "cpu", **options: Any) -> CNNFusion:
    """Registry entry point (``medfusion.methods.get_method("cnn", ...)``)."""
    return CNNFusion(device=device, **options)
