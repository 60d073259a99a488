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


def test_targets_keep_both_sources_then_the_best_edges(losses, ct_mri) -> None:
    from scripts.targets import REFERENCE_ONLY, SHARE_BAR_RULES, TOLERANCE, choose_target

    rule, pixels, scores = choose_target(ct_mri[0].numpy())
    assert pixels.dtype == np.uint8 and pixels.shape == (256, 256)
    assert {"max", "gff", "laplacian", "average", "edge_selection_0"} <= set(scores)
    bar = max(scores[name]["QSF_MIN"] for name in SHARE_BAR_RULES)
    assert scores[rule]["QSF_MIN"] >= bar - TOLERANCE  # keeps the weaker source as max does
    assert rule not in REFERENCE_ONLY  # max is the bar, never the target
    eligible = [name for name, v in scores.items()
                if v["QSF_MIN"] >= bar - TOLERANCE and name not in REFERENCE_ONLY]
    best = max(scores[n]["QABF"] + scores[n]["VIF"] / 2 for n in eligible)
    assert scores[rule]["QABF"] + scores[rule]["VIF"] / 2 == best
    ineligible = [name for name in scores if name not in eligible]
    assert all("QABF" not in scores[name] for name in ineligible)


def test_edge_selection_keeps_each_sources_edges_whole(losses) -> None:
    from scripts.targets import _forward_gradients, _integrate, edge_selection_fusion

    rng = np.random.default_rng(0)
    image = rng.random((64, 64))
    gx, gy = _forward_gradients(image)
    rebuilt = _integrate(gx, gy)  # an image's own gradients give it back, up to its mean
    assert np.abs(rebuilt + image.mean() - image).max() < 1e-9
    # source A has stripes on the left only, source B rings on the right only, each on its own
    # grey level: the fusion must carry both patterns with their full contrast
    y, x = np.mgrid[0:128, 0:128].astype(np.float64)
    a = np.full((128, 128), 0.3)
    a[:, :56] += 0.2 * np.sin(x[:, :56] / 2.0)
    b = np.full((128, 128), 0.6)
    b[:, 72:] += 0.2 * np.sin(np.hypot(x - 100, y - 64)[:, 72:] / 2.0)
    fused = edge_selection_fusion(np.stack([a, b]), 0.0)
    assert fused.shape == a.shape and 0.0 <= fused.min() and fused.max() <= 1.0
    for source, part in ((a, np.s_[8:-8, 8:48]), (b, np.s_[8:-8, 80:-8])):
        sx, sy = (g[part].ravel() for g in _forward_gradients(source))
        fx, fy = (g[part].ravel() for g in _forward_gradients(fused))
        assert np.corrcoef(np.r_[sx, sy], np.r_[fx, fy])[0, 1] > 0.99
        assert np.std(fused[part]) == pytest.approx(np.std(source[part]), rel=0.1)
