"""Reconstruction loss of the SESF auto-encoder: pixel MSE + weight * (1 - SSIM).

The SSIM term (MONAI's ``SSIMLoss``, 7x7 windows) keeps local structure, which is what the
encoder's features must describe for the spatial-frequency activity; MSE keeps intensities.
"""

from __future__ import annotations

import torch
from monai.losses import SSIMLoss
from torch import nn


class ReconstructionLoss(nn.Module):
    """``mse * MSE(pred, target) + ssim * (1 - SSIM(pred, target))`` on images in [0, 1]."""

    def __init__(self, mse: float = 1.0, ssim: float = 1.0, win_size: int = 7) -> None:
        super().__init__()
        self.mse_weight, self.ssim_weight = float(mse), float(ssim)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=win_size)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.mse_weight * torch.mean((pred - target) ** 2)
        if self.ssim_weight:
            loss = loss + self.ssim_weight * self.ssim(pred, target)
        return loss
