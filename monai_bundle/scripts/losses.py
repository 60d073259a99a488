"""Training loss of the fusion CNN: supervised term when a target exists, target-free terms always.

The label tensor packs ``[sources (K), target (1), has_target (1)]`` along the channel axis (see
``scripts.transforms.PackFusionLabeld``) so MONAI's default ``prepare_batch`` and
``SupervisedTrainer`` work unchanged. Terms (weights come from ``train.json``):

- ``l1`` / ``ssim``: supervised L1 and 1-SSIM to the target, only on samples that carry one;
- ``source_ssim``: 1 - mean SSIM to each source (keeps each source's structure);
- ``gradient``: L1 between |grad F| and max_k |grad x_k| (keeps the strongest edges);
- ``intensity``: L1 between F and max_k x_k (keeps salient bright structures, e.g. PET uptake);
- ``edge``: 1 - a differentiable Q^{AB/F} (Xydeas & Petrovic edge preservation);
- ``weaker_edge``: 1 - a soft minimum over sources of Q^{S/F} (the weaker source's share of
  its edges that survives; keeps both sources, not only the one with the strongest edges);
- ``vif``: 1 - differentiable pixel-domain VIF (summed over sources) / K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical Sobel responses of ``(N, 1, H, W)`` images (replicate border)."""
    kx = _SOBEL_X.to(x).view(1, 1, 3, 3)
    ky = _SOBEL_X.t().to(x).reshape(1, 1, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(xp, kx), F.conv2d(xp, ky)


def _gaussian_1d(size: int, sigma: float, ref: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=ref.dtype, device=ref.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur_valid(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of ``(N, C, H, W)`` keeping the fully covered ('valid') region."""
    g = _gaussian_1d(size, sigma, x)
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def ssim_map(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of ``(N, 1, H, W)`` images in [0, 1] (Gaussian window, valid region)."""
    c1, c2 = 0.01**2, 0.03**2
    stats = _blur_valid(torch.cat([a, b, a * a, b * b, a * b], dim=1), size, sigma)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.unbind(dim=1)
    saa, sbb, sab = e_aa - mu_a**2, e_bb - mu_b**2, e_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return (num / den).unsqueeze(1)


def visual_fidelity(fused: torch.Tensor, sources: torch.Tensor, nsq: float = 2.0) -> torch.Tensor:
    """Differentiable pixel-domain multiscale VIF (Sheikh & Bovik) summed over sources -> ``(B,)``.

    Four scales (Gaussian windows 17/9/5/3), noise variance ``nsq`` on the 0-255 scale; the
    inputs in [0, 1] are scaled to 0-255 so the constants match the published definition.
    """
    eps = 1e-10
    total = torch.zeros(fused.shape[0], device=fused.device, dtype=fused.dtype)
    for i in range(sources.shape[1]):
        ref, dist = sources[:, i : i + 1] * 255.0, fused * 255.0
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for scale in range(1, 5):
            size = 2 ** (5 - scale) + 1
            if scale > 1:
                pair = _blur_valid(torch.cat([ref, dist], dim=1), size, size / 5.0)
                ref, dist = pair[:, :1, ::2, ::2], pair[:, 1:, ::2, ::2]
            if min(ref.shape[-2:]) < size:
                break
            stats = _blur_valid(
                torch.cat([ref, dist, ref * ref, dist * dist, ref * dist], dim=1), size, size / 5.0
            )
            mu1, mu2, e11, e22, e12 = stats.split(1, dim=1)
            s1 = (e11 - mu1**2).clamp_min(0.0)
            s2 = (e22 - mu2**2).clamp_min(0.0)
            s12 = e12 - mu1 * mu2
            g = s12 / (s1 + eps)
            sv = s2 - g * s12
            flat_ref = s1 < eps
            g = torch.where(flat_ref, torch.zeros_like(g), g)
            sv = torch.where(flat_ref, s2, sv)
            s1 = torch.where(flat_ref, torch.zeros_like(s1), s1)
            flat_dist = s2 < eps
            g = torch.where(flat_dist, torch.zeros_like(g), g)
            sv = torch.where(flat_dist, torch.zeros_like(sv), sv)
            negative = g < 0
            sv = torch.where(negative, s2, sv)
            g = torch.where(negative, torch.zeros_like(g), g)
            sv = sv.clamp_min(eps)
            num = num + torch.log10(1 + g * g * s1 / (sv + nsq)).sum(dim=(1, 2, 3))
            den = den + torch.log10(1 + s1 / nsq).sum(dim=(1, 2, 3))
        total = total + num / den.clamp_min(eps)
    return total


def edge_preservation(
    fused: torch.Tensor, sources: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Differentiable Q^{AB/F} per sample: ``fused (B,1,H,W)``, ``sources (B,K,H,W)`` -> ``(B,)``.

    Same sigmoid constants as Xydeas & Petrovic (2000); the strength ratio uses a small epsilon
    so the gradient exists on flat regions.
    """
    num, den = _edge_terms(fused, sources, eps)
    return num.sum(dim=1) / den.sum(dim=1).clamp_min(eps)


def per_source_edge_preservation(
    fused: torch.Tensor, sources: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Differentiable Q^{S/F} per sample and source -> ``(B, K)`` (see
    ``medfusion.metrics.per_source``): edge preservation against one source, weighted by it."""
    num, den = _edge_terms(fused, sources, eps)
    return num / den.clamp_min(eps)


def _edge_terms(
    fused: torch.Tensor, sources: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source numerator and denominator ``(B, K)`` of the Q^{AB/F} sums."""
    b, k, h, w = sources.shape
    fx, fy = sobel(fused)
    g_f = torch.sqrt(fx**2 + fy**2 + eps)
    a_f = torch.atan(fy / (fx + eps))
    nums, dens = [], []
    for i in range(k):
        sx, sy = sobel(sources[:, i : i + 1])
        g_s = torch.sqrt(sx**2 + sy**2 + eps)
        a_s = torch.atan(sy / (sx + eps))
        ratio = torch.minimum(g_s, g_f) / torch.maximum(g_s, g_f)
        orient = 1 - (a_s - a_f).abs() / (math.pi / 2)
        q_g = 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5)))
        q_a = 0.9879 / (1 + torch.exp(-22 * (orient - 0.8)))
        weight = g_s - math.sqrt(eps)
        nums.append((q_g * q_a * weight).sum(dim=(1, 2, 3)))
        dens.append(weight.sum(dim=(1, 2, 3)))
    return torch.stack(nums, dim=1), torch.stack(dens, dim=1)


class FusionLoss(nn.Module):
    """Weighted sum of the supervised and target-free fusion terms (see module docstring)."""

    def __init__(
        self,
        l1: float = 1.0,
        ssim: float = 1.0,
        source_ssim: float = 1.0,
        gradient: float = 10.0,
        intensity: float = 1.0,
        edge: float = 1.0,
        vif: float = 0.0,
        weaker_edge: float = 0.0,
        softmin_temperature: float = 0.02,
    ) -> None:
        super().__init__()
        self.w = {
            "l1": l1,
            "ssim": ssim,
            "source_ssim": source_ssim,
            "gradient": gradient,
            "intensity": intensity,
            "edge": edge,
            "vif": vif,
            "weaker_edge": weaker_edge,
        }
        self.softmin_temperature = float(softmin_temperature)
        self.last_terms: dict[str, float] = {}

    def forward(self, fused: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``fused (B,1,H,W)``; ``label (B, K+2, H, W)`` = sources, target, has-target mask."""
        sources, target = label[:, :-2], label[:, -2:-1]
        has_target = label[:, -1].flatten(1).amax(dim=1)
        k = sources.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if self.w["l1"] or self.w["ssim"]:
            n = has_target.sum().clamp_min(1.0)
            l1 = (fused - target).abs().mean(dim=(1, 2, 3))
            ss = 1 - ssim_map(fused, target).mean(dim=(1, 2, 3))
            terms["l1"] = (l1 * has_target).sum() / n
            terms["ssim"] = (ss * has_target).sum() / n
        if self.w["source_ssim"]:
            per = [ssim_map(fused, sources[:, i : i + 1]).mean() for i in range(k)]
            terms["source_ssim"] = 1 - torch.stack(per).mean()
        if self.w["gradient"]:
            fx, fy = sobel(fused)
            g_f = fx.abs() + fy.abs()
            g_s = []
            for i in range(k):
                sx, sy = sobel(sources[:, i : i + 1])
                g_s.append(sx.abs() + sy.abs())
            terms["gradient"] = (g_f - torch.stack(g_s).amax(dim=0)).abs().mean()
        if self.w["intensity"]:
            terms["intensity"] = (fused - sources.amax(dim=1, keepdim=True)).abs().mean()
        if self.w["edge"] or self.w["weaker_edge"]:
            num, den = _edge_terms(fused, sources, 1e-6)
            terms["edge"] = 1 - (num.sum(dim=1) / den.sum(dim=1).clamp_min(1e-6)).mean()
            if self.w["weaker_edge"]:
                share = num / den.clamp_min(1e-6)
                t = self.softmin_temperature
                soft_min = -t * torch.logsumexp(-share / t, dim=1) + t * math.log(k)
                terms["weaker_edge"] = 1 - soft_min.mean()
        if self.w["vif"]:
            terms["vif"] = 1 - visual_fidelity(fused, sources).mean() / k
        total = sum(self.w[name] * value for name, value in terms.items())
        self.last_terms = {name: float(value.detach()) for name, value in terms.items()}
        return total
