"""The bundle's FusionNet itself: its fused-image formula and its gradients at every block size."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from medfusion.methods import get_method


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    """The shipped bundle's network, loaded as the cnn method loads it."""
    return get_method("cnn").module


def _softmax_form(x, base, logit, gain, max_prior):
    """The documented formula, written the plain way: F = sum_k w_k x_k + s_k (1 - w_k) d_k."""
    weights = torch.softmax(logit + max_prior * x, dim=1)
    share = torch.sigmoid(gain)
    detail = x - base
    return (weights * x + share * (1 - weights) * detail).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("sources", [2, 3, 5])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0, 200.0])
def test_combination_is_the_softmax_formula(network, sources: int, logit_scale: float) -> None:
    """The matrix-product form equals the softmax form, also where logits differ by hundreds
    (there the capped exponent must still give the selected source weight 1)."""
    combine = sys.modules[type(network).__module__].combine_sources
    generator = torch.Generator().manual_seed(sources)
    shape = (2, sources, 17, 23)
    x, base = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    logit = (torch.rand(shape, generator=generator) - 0.5) * logit_scale
    gain = torch.randn(shape, generator=generator) * 3
    prior = network.max_prior.detach()
    fused = combine(x, base, logit, gain, prior)
    assert fused.shape == (2, 1, 17, 23)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, _softmax_form(x, base, logit, gain, prior),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("exponent", range(7))
def test_gradients_are_finite_at_every_block_exponent(network, exponent: int) -> None:
    """Training can use any block exponent: at i = 0 (one pixel per block) the spread statistic
    once went through sqrt(0), whose gradient is NaN."""
    net = copy.deepcopy(network).train()
    sys.modules[type(net).__module__].set_block_exponent(net, exponent)
    x = torch.rand(2, 2, 64, 48, requires_grad=True)
    net(x).mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("scale", [2, 4, 8, 64])
def test_upsampling_is_torch_bilinear(network, scale: int) -> None:
    """The network's matrix-product upsampling gives torch's bilinear (align_corners=False)
    result, edges included, on odd sizes."""
    upsample = sys.modules[type(network).__module__].upsample_bilinear
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(scale))
    expected = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(upsample(x, scale), expected, atol=1e-6, rtol=0)
