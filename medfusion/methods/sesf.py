"""The ``sesf`` fusion method: an unsupervised auto-encoder's features and a decision map.

After SESF-Fuse (Ma et al., Neural Computing and Applications 2021) as used for brain images by
Raj et al. (2024): the ``sesf_bundle/`` encoder (trained without targets, by reconstructing
single sources) turns each source into deep features; the activity of a source is the
**spatial frequency** of its features, averaged over blocks of ``2^i x 2^i`` pixels (the
paper's block size ``i``, ``block_exponent`` 0..6: smaller is more precise, larger faster); the
most active source wins the block. **Consistency verification** on the block grid (majority
filter, small-region removal) cleans the map, which is then repeated to full resolution and
made **soft with a guided filter** guided by the sources' mean; the fused slice is the
per-pixel weighted sum of the sources.

The decision procedure is written once, in the bundle's ``scripts/fusion.py`` (the bundle fuses
on its own too, without medfusion); this module loads that file from the shipped bundle, as
:mod:`medfusion.color` loads the cnn bundle's ``colour.py``. The network comes through
:mod:`medfusion.methods.bundle` (one path with ``cnn``), and its activity step (the bundle's
``FeatureEnergy``) runs through :mod:`medfusion.methods.backend` (plain torch unless
``MEDFUSION_BACKEND`` names another); ``block_exponent`` and the ``fusion``
settings are the bundle's ``configs/inference.json`` entries. The encoder runs in the memory
tile of :mod:`medfusion.methods.tiling` (the same as ``cnn``: whole slices in batches within the
budget, row strips with the encoder's receptive field as halo for huge slices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfusion.errors import ModelError
from medfusion.methods import backend, bundle, tiling
from medfusion.methods.sources import check_sources
from medfusion.resources import load_bundle_script, sesf_bundle_dir

DEFAULT_BUNDLE = sesf_bundle_dir()  # package data: medfusion/sesf_bundle (medfusion.resources)
# the one copy of the decision-map fusion (the classical gff loads the same file)
fusion = load_bundle_script(DEFAULT_BUNDLE, "scripts/fusion.py", "medfusion._sesf_fusion")
MIN_SIZE = fusion.MIN_SIZE
FUSION_DEFAULTS = fusion.DEFAULTS
# Working memory per source pixel: the float32 maps alive at the encoder's peak (the dense
# block's concatenations of 13..49 channels, the energy's padded copy and differences of the
# feature channels); measured 1.34 kB (peak RSS growth of a 1024^2 pair, torch, 2 threads), so
# 360 floats. The engine sizes its calls with the same number.
BYTES_PER_SOURCE_PIXEL = 4 * 360
majority_filter = fusion.majority_filter  # public helpers of this method (tests, inspection)
verify_consistency = fusion.verify_consistency
soft_weights = fusion.soft_weights


class SESFFusion:
    """Callable fusion method ``(B, K, H, W) -> (B, H, W)``: decision-map fusion of K >= 2
    sources with the SESF bundle's encoder as activity measure.

    Args:
        bundle_dir: bundle folder; default the shipped ``sesf_bundle/``.
        device: torch device for the network.
        block_exponent: decisions on ``2^i x 2^i`` pixel blocks, 0..6 (default: the bundle's
            ``block_exponent``).
        memory_budget_mb: working memory of one encoder call (default: the shared budget,
            ``MEDFUSION_MEMORY_BUDGET_MB``).
    """

    name = "sesf"
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
        overrides = {"block_exponent": None if block_exponent is None
                     else bundle.check_exponent(block_exponent)}
        parser, self.network = bundle.load_network(
            self.bundle_dir, self.device, "SESF", ("network_def", "block_exponent", "fusion"),
            overrides,
        )
        if not callable(getattr(self.network, "encode", None)):
            raise ModelError(f"the network of bundle {self.bundle_dir} has no encode() method")
        self.block_exponent = bundle.check_exponent(parser["block_exponent"])
        self.memory_budget_mb = (None if memory_budget_mb is None
                                 else tiling.check_budget(memory_budget_mb))
        try:
            self.settings = fusion.check_settings(bundle.parsed(parser, "fusion",
                                                                self.bundle_dir))
        except (TypeError, ValueError) as error:
            message = f"bundle {self.bundle_dir} has a bad 'fusion' entry: {error}"
            raise ModelError(message) from None
        encoder = getattr(self.network, "encoder", self.network)
        self.halo = fusion.receptive_radius(encoder)
        # the activity step's network (encode + feature energy, the bundle's FeatureEnergy)
        # through medfusion.methods.backend, plain torch unless MEDFUSION_BACKEND names another:
        # ONNX Runtime runs the encoder alone 1.6x faster, but not the method's tiled calls of
        # encoder and energy (8 x 256^2 images: 346-360 ms against torch's 252-273; 2 x 512^2:
        # 312-381 against 306-354; session 21), so `auto`'s start-up probe (~1.2 s) would buy
        # nothing here
        self.energy_network = backend.accelerate(fusion.FeatureEnergy(self.network).eval(),
                                                 self.device, channels=1, default="torch")

    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """Feature energy (N, 1, H, W) of (N, 1, H, W) images, in the shared memory tile."""
        return tiling.run_tiled(self.energy_network, images, BYTES_PER_SOURCE_PIXEL, self.halo,
                                budget_mb=self.memory_budget_mb)

    def tile(self, sources: int, height: int, width: int) -> tuple[int, int]:
        """``(images per encoder call, rows per strip)`` of :meth:`energy` for a slice of
        ``sources`` sources: the encoder sees each source as its own one-channel image, so the
        tile does not depend on ``sources`` (kept for the same signature as ``cnn``)."""
        del sources
        return tiling.tile(1, height, width, BYTES_PER_SOURCE_PIXEL, self.halo,
                           budget_mb=self.memory_budget_mb)

    def decide(self, batch: torch.Tensor) -> Any:
        """The whole decision (``fusion.Decision``: fused, winners 1..K, hard block labels
        0..K-1 before the soft step) of a (B, K, H, W) batch, on the method's device."""
        check_sources(batch, "sesf")
        sources = batch.to(self.device, torch.float32)
        with torch.inference_mode():
            return fusion.decision_fusion(sources, self.energy, self.block_exponent,
                                          self.settings)

    def fuse_with_decision(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused (B, H, W), labels (B, H, W) uint8)`` on the batch's device.

        ``labels`` is the decision map for inspection: 1..K, the source (1 = reference) with the
        largest soft weight at each pixel.
        """
        decision = self.decide(batch)
        return decision.fused.to(batch.device), decision.winners.to(batch.device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, K, H, W)`` float sources in [0, 1] into ``(B, H, W)`` on the same device."""
        return self.fuse_with_decision(batch)[0]




def build_method(device: str | torch.device = "cpu", **options: Any) -> SESFFusion:
    """Registry entry point (``medfusion.methods.get_method("sesf", ...)``)."""
    return SESFFusion(device=device, **options)
