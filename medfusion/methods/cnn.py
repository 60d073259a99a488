"""The ``cnn`` fusion method: the MONAI bundle's network, loaded from the bundle's config.

There is no second copy of the network here: the bundle's ``configs/inference.json`` defines
``network_def`` (its ``block_exponent`` is the paper's block size ``i``: the network decides on
blocks of ``2^i x 2^i`` pixels) and ``models/model.pt`` is read with
``torch.load(weights_only=True)``. A plain config is built by importing the one network class
(:func:`medfusion.methods.bundle.plain_config`: no MONAI import at start-up), any other through
``monai.bundle.ConfigParser``. The network runs through :mod:`medfusion.methods.backend` (ONNX
Runtime when installed, checked against torch). Memory is bounded by the shared *tile* of
:mod:`medfusion.methods.tiling` (one budget with the engine, ``MEDFUSION_MEMORY_BUDGET_MB``):
slices run whole, in batches, as long as the estimated working memory fits; larger slices run in
row strips with a halo (the same result). Every problem with the bundle becomes a one-line
:class:`~medfusion.errors.ModelError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfusion.errors import ModelError
from medfusion.methods import backend, bundle, tiling
from medfusion.methods.bundle import CONFIG, WEIGHTS, use_bundle_scripts  # noqa: F401 (public)
from medfusion.methods.sources import check_sources
from medfusion.resources import bundle_dir as shipped_bundle_dir

DEFAULT_BUNDLE = shipped_bundle_dir()  # package data: medfusion/bundle (see medfusion.resources)
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


# working memory of the network per source pixel (float32 maps alive at the peak: about 12 plus
# K for K sources, the pairwise softmax holding K^2 maps; measured with torch on 2 x K x 512^2
# batches: 57 B for K = 2, 64 for 4, 76 for 6, see Testing/tests/test_engine_memory.py; this
# covers K <= 8 within the test's 25 %) and the halo of a row strip in blocks (the block CNN's
# receptive field plus the upsampling)
BYTES_PER_SOURCE_PIXEL = 4 * 16
HALO_BLOCKS = 8
# source pixels per network call on CPU (the cache tile): the network's full-resolution
# temporaries of about 2^20 input pixels stay in this CPU's caches; 512^2 pairs ran at 9.3-11.8
# ms per slice in calls of 1-2 slices against 10.4-27.5 in calls of 8 and 20-24 in calls of 16
# (Testing/benchmarks/bench_flops.py --batches 1,2,4,8,16 --repeat 9, load 1.5); on a GPU calls
# are as large as the memory budget allows
CPU_PIXELS_PER_CALL = 1 << 20


class CNNFusion:
    """Callable fusion method ``(B, K, H, W) -> (B, H, W)`` backed by the bundle's CNN.

    Args:
        bundle_dir: bundle folder (``configs/inference.json``, ``models/model.pt``); default
            the shipped ``monai_bundle/``.
        device: torch device for the network.
        block_exponent: the paper's block size ``i`` (blocks of ``2^i x 2^i`` pixels, 0..6):
            smaller is more precise and slower; default the bundle's ``block_exponent``.
        memory_budget_mb: working memory allowed per network call; sets the memory tile
            (slices per call, row strips for huge slices); default the one budget of
            :func:`medfusion.methods.tiling.memory_budget_mb` (``MEDFUSION_MEMORY_BUDGET_MB``).
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
                     else bundle.check_exponent(block_exponent)}
        settings, network = bundle.build_network(self.bundle_dir, config_file, required, overrides)
        self.block_exponent = bundle.check_exponent(settings["block_exponent"])
        # None: the shared budget, read at each call (tiling.memory_budget_mb)
        self.memory_budget_mb = (None if memory_budget_mb is None
                                 else tiling.check_budget(memory_budget_mb))
        self.module = bundle.load_weights(network, weights_file, "CNN").to(self.device).eval()
        self._check_fuses()
        # what __call__ runs: the module through the fastest checked backend (backend.py)
        self.network = backend.accelerate(self.module, self.device)

    def _check_fuses(self) -> None:
        """ModelError unless the bundle's network fuses two sources into one image (the sesf
        bundle's auto-encoder, given as ``--bundle``, failed with a traceback at the first
        slice)."""
        side = 2 ** bundle.MAX_BLOCK_EXPONENT  # a multiple of every block size
        probe = torch.zeros(1, 2, side, side, device=self.device)
        try:
            with torch.inference_mode():
                shape = tuple(self.module(probe).shape)
        except Exception as error:  # any failure of a foreign network: say what it is
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise ModelError(f"the network of bundle {self.bundle_dir} does not fuse sources "
                             f"({reason}); is it a cnn bundle? (the sesf bundle goes with "
                             "--method sesf)") from None
        if shape != (1, 1, side, side):
            raise ModelError(f"the network of bundle {self.bundle_dir} turns 2 sources of "
                             f"{side}x{side} into {shape}, not one fused image; is it a cnn "
                             "bundle?")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, K, H, W)`` float sources in [0, 1] into ``(B, H, W)`` on the same device."""
        check_sources(batch, "the CNN")
        source_device = batch.device
        inputs, (height, width) = pad_to_network_minimum(batch.to(self.device, torch.float32))
        with torch.inference_mode():
            fused = self._run_tiled(inputs)[:, 0, :height, :width]
            if not getattr(self.module, "output_in_unit_range", False):
                fused = fused.clamp(0.0, 1.0)  # a bundle's own network may not bound its output
        return fused.to(source_device)

    def tile(self, sources: int, height: int, width: int) -> tuple[int, int]:
        """The memory tile for slices of ``height x width`` with ``sources`` sources:
        ``(slices per network call, rows per strip)``; ordinary slices run whole."""
        return tiling.tile(sources, height, width, BYTES_PER_SOURCE_PIXEL, self._halo(),
                           self._align(), self.memory_budget_mb, self._pixels_per_call())

    def _align(self) -> int:
        return max(2**self.block_exponent, 4)

    def _pixels_per_call(self) -> int | None:
        return CPU_PIXELS_PER_CALL if self.device.type == "cpu" else None

    def _halo(self) -> int:
        return HALO_BLOCKS * self._align()

    def _run_tiled(self, inputs: torch.Tensor) -> torch.Tensor:
        return tiling.run_tiled(self.network, inputs, BYTES_PER_SOURCE_PIXEL, self._halo(),
                                self._align(), self.memory_budget_mb, self._pixels_per_call())


def build_method(device: str | torch.device = "cpu", **options: Any) -> CNNFusion:
    """Registry entry point (``medfusion.methods.get_method("cnn", ...)``)."""
    return CNNFusion(device=device, **options)
