"""The ``cnn`` fusion method: the MONAI bundle's network, loaded from the bundle's config.

There is no second copy of the network here: the bundle's ``configs/inference.json`` defines
``network_def`` (its ``block_exponent`` is the paper's block size ``i``: the network decides on
blocks of ``2^i x 2^i`` pixels) and ``models/model.pt`` is read with
``torch.load(weights_only=True)``. A plain config is built by importing the one network class
(:func:`medfusion.methods.bundle.plain_config`: no MONAI import at start-up), any other through
``monai.bundle.ConfigParser``. The network runs through :mod:`medfusion.methods.backend` (ONNX
Runtime when installed, checked against torch). Memory is bounded by a separate *tile*: slices
run whole, in batches, as long as the estimated working memory fits ``memory_budget_mb``; larger
inputs run in row strips with a halo (the same result). Every problem with the bundle becomes a
one-line :class:`~medfusion.errors.ModelError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfusion.errors import InputError, ModelError
from medfusion.methods import backend, bundle
from medfusion.methods.bundle import CONFIG, WEIGHTS, use_bundle_scripts  # noqa: F401 (public)
from medfusion.resources import bundle_dir as shipped_bundle_dir

DEFAULT_BUNDLE = shipped_bundle_dir()  # package data: medfusion/bundle (see medfusion.resources)
MIN_SOURCES = 2
MIN_SIDE = 16  # the network's reflect padding (dilation up to 4) needs slices wider than this


def pad_to_network_minimum(batch: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad a (B, K, H, W) batch whose H or W is below :data:`MIN_SIDE` (2x2 images,
    1xN rows, slices of a 3-slice volume across its short axis), so the network's reflect
    padding works; returns the padded batch and the (H, W) to crop the result back to."""
    height, width = int(batch.shape[-2]), int(batch.shape[-1])
    pad_h, pad_w = max(0, MIN_SIDE - height), max(0, MIN_SIDE - width)
    if pad_h or pad_w:
        batch = torch.nn.functional.pad(batch, (0, pad_w, 0, pad_h), mode="replicate")
    return batch, (height, width)


MAX_BLOCK_EXPONENT = 6
# working memory of the network per source pixel (float32 maps alive at the peak; measured
# 46-56 B with torch on 512^2 and 1024^2 batches, see Testing/tests/test_engine_memory.py) and
# the halo of a row strip in blocks (the block CNN's receptive field plus the upsampling)
BYTES_PER_SOURCE_PIXEL = 4 * 14
HALO_BLOCKS = 8


def _check_exponent(value: Any) -> int:
    try:
        exponent = int(value)
    except (TypeError, ValueError):
        raise InputError(f"block exponent must be an integer 0..{MAX_BLOCK_EXPONENT}, "
                         f"got {value!r}") from None
    if exponent != value and str(value).strip() != str(exponent):
        raise InputError(f"block exponent must be an integer 0..{MAX_BLOCK_EXPONENT}, "
                         f"got {value!r}")
    if not 0 <= exponent <= MAX_BLOCK_EXPONENT:
        raise InputError(f"block exponent must be in 0..{MAX_BLOCK_EXPONENT} (blocks of "
                         f"1..{2**MAX_BLOCK_EXPONENT} pixels), got {exponent}")
    return exponent


def _check_budget(value: Any) -> float:
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise InputError(f"memory budget must be a number of MB, got {value!r}") from None
    if not budget > 0:
        raise InputError(f"memory budget must be positive, got {value!r} MB")
    return budget


class CNNFusion:
    """Callable fusion method ``(B, K, H, W) -> (B, H, W)`` backed by the bundle's CNN.

    Args:
        bundle_dir: bundle folder (``configs/inference.json``, ``models/model.pt``); default
            the shipped ``monai_bundle/``.
        device: torch device for the network.
        block_exponent: the paper's block size ``i`` (blocks of ``2^i x 2^i`` pixels, 0..6):
            smaller is more precise and slower; default the bundle's ``block_exponent``.
        memory_budget_mb: working memory allowed per network call; sets the memory tile
            (slices per call, row strips for huge slices); default the bundle's value.
    """

    name = "cnn"
    # peak working memory per source pixel, read by the engine to size its method calls
    bytes_per_source_pixel = BYTES_PER_SOURCE_PIXEL

    def __init__(
        self,
        bundle_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        block_exponent: int | None = None,
        memory_budget_mb: float | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir if bundle_dir is not None else DEFAULT_BUNDLE).resolve()
        self.device = torch.device(device)
        config_file, weights_file = bundle.bundle_files(self.bundle_dir, "CNN")
        required = ("network_def", "block_exponent")
        overrides = {"block_exponent": None if block_exponent is None
                     else _check_exponent(block_exponent)}
        settings, network = bundle.build_network(self.bundle_dir, config_file, required, overrides)
        self.block_exponent = _check_exponent(settings["block_exponent"])
        budget = memory_budget_mb if memory_budget_mb is not None else settings.get(
            "memory_budget_mb", 512)
        self.memory_budget_mb = _check_budget(budget)
        self.module = bundle.load_weights(network, weights_file, "CNN").to(self.device).eval()
        # what __call__ runs: the module through the fastest checked backend (backend.py)
        self.network = backend.accelerate(self.module, self.device)

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
        inputs, (height, width) = pad_to_network_minimum(batch.to(self.device, torch.float32))
        with torch.inference_mode():
            fused = self._run_tiled(inputs)
        return fused[:, 0, :height, :width].clamp(0.0, 1.0).to(source_device)

    def tile(self, sources: int, height: int, width: int) -> tuple[int, int]:
        """The memory tile for slices of ``height x width`` with ``sources`` sources:
        ``(slices per network call, rows per strip)``; ordinary slices run whole."""
        per_slice = BYTES_PER_SOURCE_PIXEL * sources * height * width
        budget = self.memory_budget_mb * 2**20
        if per_slice <= budget:
            return max(1, int(budget // per_slice)), height
        align = max(2**self.block_exponent, 4)
        rows = int(budget // (BYTES_PER_SOURCE_PIXEL * sources * width)) - 2 * self._halo()
        return 1, max(align, rows // align * align)

    def _halo(self) -> int:
        return HALO_BLOCKS * max(2**self.block_exponent, 4)

    def _run_tiled(self, inputs: torch.Tensor) -> torch.Tensor:
        b, k, h, w = inputs.shape
        slices, rows = self.tile(k, h, w)
        if rows >= h:
            parts = [self.network(inputs[i : i + slices]) for i in range(0, b, slices)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        halo = self._halo()
        fused = inputs.new_empty((b, 1, h, w))
        for i in range(b):
            for top in range(0, h, rows):
                start, stop = max(0, top - halo), min(h, top + rows + halo)
                strip = self.network(inputs[i : i + 1, :, start:stop])
                fused[i : i + 1, :, top : top + rows] = strip[:, :, top - start : top - start
                                                              + min(rows, h - top)]
        return fused


def build_method(device: str | torch.device = "cpu", **options: Any) -> CNNFusion:
    """Registry entry point (``medfusion.methods.get_method("cnn", ...)``)."""
    return CNNFusion(device=device, **options)
