"""K-source fusion CNN (Li et al. 2021 style supervised fusion, generalised to K >= 2 inputs).

Why this design: a weight-shared encoder sees every source the same way, features are pooled
across sources by max and mean (order-free, so 2, 3 or more modalities work with one set of
weights), and the decoder predicts one soft weight map per source plus a small residual detail
term. The fused image is ``sum_k w_k * x_k + r`` clamped to [0, 1]: it stays close to the
sources' intensities while the residual can sharpen edges. Fully convolutional, so any slice
size works; about 4 k parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_ch: int, out_ch: int, dilation: int = 1) -> nn.Sequential:
    """3x3 convolution (same padding) followed by LeakyReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, padding_mode="reflect"),
        nn.LeakyReLU(0.1, inplace=True),
    )


class FusionNet(nn.Module):
    """Fuse ``(B, K, H, W)`` co-registered single-channel sources into ``(B, 1, H, W)``.

    Args:
        features: channels of the per-source encoder.
        dilations: dilation of each encoder 3x3 layer (sets the receptive field).
        min_sources: inputs with fewer channels are rejected (fusion needs at least two).
        max_prior: initial weight of each source's intensity in its logit (soft maximum).
    """

    def __init__(
        self,
        features: int = 12,
        dilations: tuple[int, ...] = (1, 2, 4),
        min_sources: int = 2,
        max_prior: float = 8.0,
    ) -> None:
        super().__init__()
        self.min_sources = int(min_sources)
        # logit_k += max_prior * x_k: at initialisation the weights pick the brighter source
        # (a soft pixel maximum, a strong baseline); training learns where to deviate from it
        self.max_prior = nn.Parameter(torch.tensor(float(max_prior)))
        layers: list[nn.Module] = []
        in_ch = 1
        for d in dilations:
            layers.append(_conv(in_ch, features, d))
            in_ch = features
        self.encoder = nn.Sequential(*layers)
        # per-source weight logits from (own features, max over sources, mean over sources)
        self.weight_head = nn.Sequential(
            nn.Conv2d(3 * features, features, 1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(features, 1, 3, padding=1, padding_mode="reflect"),
        )
        # residual detail from the pooled features and the sources' max / mean intensity
        self.detail_head = nn.Sequential(
            nn.Conv2d(2 * features + 2, features, 1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(features, 1, 3, padding=1, padding_mode="reflect"),
        )
        nn.init.zeros_(self.detail_head[-1].weight)  # start as a pure weighted selection
        nn.init.zeros_(self.detail_head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fused image ``(B, 1, H, W)`` in [0, 1]."""
        if x.dim() != 4 or x.shape[1] < self.min_sources:
            raise ValueError(
                f"FusionNet expects (B, K>={self.min_sources}, H, W) input, got {x.shape}"
            )
        b, k, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        feats = self.encoder(x.reshape(b * k, 1, h, w)).reshape(b, k, -1, h, w)
        f_max = feats.amax(dim=1)
        f_mean = feats.mean(dim=1)
        pooled = torch.cat([f_max, f_mean], dim=1)
        per_source = torch.cat(
            [feats, pooled.unsqueeze(1).expand(-1, k, -1, -1, -1)], dim=2
        ).reshape(b * k, -1, h, w)
        logits = self.weight_head(per_source).reshape(b, k, h, w) + self.max_prior * x
        weights = torch.softmax(logits, dim=1)
        base = (weights * x).sum(dim=1, keepdim=True)
        stats = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        detail = self.detail_head(torch.cat([pooled, stats], dim=1))
        return (base + detail).clamp(0.0, 1.0)
