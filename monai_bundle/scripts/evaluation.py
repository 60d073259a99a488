"""Evaluation metrics of the bundle that need nothing beyond MONAI (no ``medfusion``).

``configs/evaluate.json`` reports, on the validation groups: Q^{AB/F} and VIF (the torch
functions of ``scripts/losses.py``, the same ones training validates with) and the SSIM of the
fused image against each source, averaged over the sources, computed by MONAI's own
``SSIMMetric`` (Gaussian window 11, sigma 1.5, data range 1). The full table of 24 fusion metrics
is ``medfusion metrics`` / ``medfusion benchmark`` of the MedFusion package.
"""

from __future__ import annotations

import torch

from scripts.validation import _MeanMetric


class SourceSSIMMetric(_MeanMetric):
    """Mean over sources of MONAI's SSIM between the fused image and each source, in [-1, 1]."""

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        from monai.metrics import SSIMMetric

        ssim = SSIMMetric(spatial_dims=2, data_range=1.0)
        per_source = [ssim(pred, image[:, k:k + 1]).reshape(-1) for k in range(image.shape[1])]
        return torch.stack(per_source).mean(dim=0).tolist()
