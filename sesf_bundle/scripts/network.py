"""SESF-Fuse / DenseFuse-style auto-encoder for unsupervised fusion (Ma et al.; Raj et al. 2024).

Why this design: fusion needs features that describe local structure of any modality, not a
fused target, so the network is trained only to reconstruct single source images. The encoder
is one 3x3 convolution followed by a small dense block (each layer sees all earlier feature
maps), so its output keeps both fine edges and a few pixels of context; there is no
down-sampling, so features stay pixel-aligned with the source and any slice size works. At
fusion time only :meth:`SESFNet.encode` runs: the spatial frequency of its features is the
activity measure (see ``medfusion.methods.sesf``). The decoder exists for training.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_ch: int, out_ch: int, activation: bool = True) -> nn.Sequential:
    """3x3 convolution (replicated borders: any size, even 1x1) and optional ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode="replicate")]
    if activation:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DenseBlock(nn.Module):
    """``layers`` 3x3 convolutions, each fed the concatenation of the input and all earlier
    outputs; returns that concatenation (``in_ch + layers * growth`` channels)."""

    def __init__(self, in_ch: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_conv(in_ch + i * growth, growth) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x
        for layer in self.layers:
            features = torch.cat([features, layer(features)], dim=1)
        return features


class SESFNet(nn.Module):
    """Auto-encoder ``(N, 1, H, W) -> (N, 1, H, W)``; ``encode`` gives the deep features.

    Args:
        features: channels of the first convolution and growth of each dense layer.
        dense_layers: layers of the dense block (encoder output:
            ``features * (dense_layers + 1)`` channels).
    """

    def __init__(self, features: int = 16, dense_layers: int = 3) -> None:
        super().__init__()
        self.out_channels = features * (dense_layers + 1)
        self.encoder = nn.Sequential(
            _conv(1, features), DenseBlock(features, features, dense_layers)
        )
        width = self.out_channels
        self.decoder = nn.Sequential(
            _conv(width, width // 2),
            _conv(width // 2, width // 4),
            _conv(width // 4, 1, activation=False),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features ``(N, C, H, W)`` of single-channel images ``(N, 1, H, W)``."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"SESFNet encodes (N, 1, H, W) images, got {tuple(x.shape)}")
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` (training target: ``x`` itself)."""
        return self.decoder(self.encode(x))
