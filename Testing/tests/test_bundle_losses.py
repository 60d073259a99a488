"""The bundle's differentiable loss terms agree with ``medfusion.metrics`` on a real pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medfusion.metrics as fm

BUNDLE = Path(__file__).resolve().parents[2] / "monai_bundle"


@pytest.fixture(scope="module")
def losses():
    from medfusion.methods.cnn import use_bundle_scripts

    use_bundle_scripts(BUNDLE)  # the shipped bundle's ``scripts``, not another bundle's copy
    from scripts import losses as module

    return module


@pytest.fixture(scope="module")
def ct_mri(aanlib: Path) -> torch.Tensor:
    planes = [
        np.asarray(Image.open(aanlib / "CT-MRI" / m / "2010.png").convert("L"), np.float32) / 255
        for m in ("MRI", "CT")
    ]
    return torch.from_numpy(np.stack(planes))[None]


def test_torch_qabf_and_vif_match_the_metrics(losses, ct_mri: torch.Tensor) -> None:
    fused = ct_mri.amax(dim=1, keepdim=True)
    f, s = fused[0, 0].numpy() * 255, ct_mri[0].numpy() * 255
    assert losses.edge_preservation(fused, ct_mri).item() == pytest.approx(
        fm.qabf(f, *s, data_range=255.0), abs=2e-3
    )
    assert losses.visual_fidelity(fused, ct_mri).item() == pytest.approx(
        fm.vif(f, *s, data_range=255.0), abs=2e-3
    )


def test_loss_uses_the_target_only_when_present(losses, ct_mri: torch.Tensor) -> None:
    fused = ct_mri.mean(dim=1, keepdim=True).requires_grad_()
    target = ct_mri[:, :1]
    loss = losses.FusionLoss(l1=1, ssim=0, source_ssim=0, gradient=0, intensity=0, edge=0)
    without = torch.cat([ct_mri, target, torch.zeros_like(target)], dim=1)
    with_target = torch.cat([ct_mri, target, torch.ones_like(target)], dim=1)
    assert loss(fused, without).item() == 0.0
    value = loss(fused, with_target)
    assert value.item() == pytest.approx((fused - target).abs().mean().item(), rel=1e-5)
    value.backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_torch_per_source_share_matches_the_metric(losses, ct_mri: torch.Tensor) -> None:
    fused = ct_mri.amax(dim=1, keepdim=True)
    f, s = fused[0, 0].numpy() * 255, ct_mri[0].numpy() * 255
    torch_values = losses.per_source_edge_preservation(fused, ct_mri)[0].tolist()
    assert torch_values == pytest.approx(fm.per_source_qabf(f, *s), abs=3e-3)


def test_weaker_edge_term_rewards_keeping_both_sources(losses, ct_mri: torch.Tensor) -> None:
    loss = losses.FusionLoss(l1=0, ssim=0, source_ssim=0, gradient=0, intensity=0, edge=0,
                             weaker_edge=1)
    label = torch.cat([ct_mri, torch.zeros_like(ct_mri[:, :2])], dim=1)
    only_mri = loss(ct_mri[:, :1].clone(), label).item()
    both = loss(ct_mri.amax(dim=1, keepdim=True), label).item()
    assert both < only_mri  # a copy of one source loses the other's edges
    share = losses.per_source_edge_preservation(ct_mri[:, :1], ct_mri).amin(dim=1).item()
    assert only_mri == pytest.approx(1 - share, abs=0.02)  # soft minimum ~ the minimum


def test_targets_keep_the_candidate_with_the_best_weaker_share(losses, ct_mri) -> None:
    from scripts.targets import TOLERANCE, choose_target

    rule, pixels, scores = choose_target(ct_mri[0].numpy())
    assert pixels.dtype == np.uint8 and pixels.shape == (256, 256)
    best = max(v["QSF_MIN"] for v in scores.values())
    assert scores[rule]["QSF_MIN"] >= best - TOLERANCE
    assert {"max", "gff", "laplacian", "average"} <= set(scores)
