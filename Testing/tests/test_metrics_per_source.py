"""Per-source edge preservation Q^{S/F} and the weaker source's share, against a slow direct
transcription of Xydeas & Petrovic's definition (pixel loops, no shared code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import medfusion.metrics as M


def _sobel_direct(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel strength and orientation by explicit 3x3 sums, zero outside the image."""
    h, w = image.shape
    padded = np.zeros((h + 2, w + 2))
    padded[1:-1, 1:-1] = image
    strength = np.zeros((h, w))
    angle = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            p = padded[r : r + 3, c : c + 3]
            # x: left minus right column; y: lower minus upper row (VIFB's h3 and h1)
            sx = (p[0, 0] + 2 * p[1, 0] + p[2, 0]) - (p[0, 2] + 2 * p[1, 2] + p[2, 2])
            sy = (p[2, 0] + 2 * p[2, 1] + p[2, 2]) - (p[0, 0] + 2 * p[0, 1] + p[0, 2])
            strength[r, c] = math.hypot(sx, sy)
            angle[r, c] = math.pi / 2 if sx == 0 else math.atan(sy / sx)
    return strength, angle


def _q_source_direct(fused: np.ndarray, source: np.ndarray) -> float:
    g_f, a_f = _sobel_direct(fused)
    g_s, a_s = _sobel_direct(source)
    num = den = 0.0
    for r in range(fused.shape[0]):
        for c in range(fused.shape[1]):
            gs, gf = g_s[r, c], g_f[r, c]
            ratio = 1.0 if gs == gf == 0 else min(gs, gf) / max(gs, gf)
            orient = 1 - abs(a_s[r, c] - a_f[r, c]) / (math.pi / 2)
            qg = 0.9994 / (1 + math.exp(-15 * (ratio - 0.5)))
            qa = 0.9879 / (1 + math.exp(-22 * (orient - 0.8)))
            num += qg * qa * gs
            den += gs
    return num / den


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    a = np.zeros((14, 15))
    a[:, 7:] = 200.0  # a vertical edge
    b = np.zeros((14, 15))
    b[5:, :] = 120.0  # a horizontal edge
    a += rng.normal(0, 3, a.shape)
    b += rng.normal(0, 3, b.shape)
    fused = np.maximum(a, b) + rng.normal(0, 2, a.shape)
    return fused, a, b


def test_per_source_values_match_the_direct_transcription(images) -> None:
    fused, a, b = images
    values = M.per_source_qabf(fused, a, b)
    expected = [_q_source_direct(fused, a), _q_source_direct(fused, b)]
    np.testing.assert_allclose(values, expected, rtol=1e-10)
    assert M.weaker_source_share(fused, a, b) == pytest.approx(min(expected), rel=1e-10)
    assert M.stronger_source_share(fused, a, b) == pytest.approx(max(expected), rel=1e-10)


def test_qabf_is_the_strength_weighted_mean_of_the_per_source_values(images) -> None:
    fused, a, b = images
    q_a, q_b = M.per_source_qabf(fused, a, b)
    w_a, w_b = _sobel_direct(a)[0].sum(), _sobel_direct(b)[0].sum()
    assert M.qabf(fused, a, b) == pytest.approx((q_a * w_a + q_b * w_b) / (w_a + w_b), rel=1e-10)


def test_weaker_share_exposes_a_fusion_that_drops_one_source(images) -> None:
    _, a, b = images
    copy_a = a.copy()
    assert M.per_source_qabf(copy_a, a, b)[0] > 0.9  # source a kept whole
    assert M.weaker_source_share(copy_a, a, b) < 0.3  # source b's edge is gone
    assert M.weaker_source_share(np.maximum(a, b), a, b) > M.weaker_source_share(copy_a, a, b)


def test_three_sources_scale_invariance_and_table(images) -> None:
    fused, a, b = images
    c = a.T[:14, :15] if a.shape[0] >= 15 else np.rot90(a, 2).copy()
    three = M.per_source_qabf(fused, a, b, c)
    assert len(three) == 3
    assert M.weaker_source_share(fused, a, b, c) == pytest.approx(min(three))
    unit = M.per_source_qabf(fused / 255, a / 255, b / 255, c / 255, data_range=1.0)
    np.testing.assert_allclose(unit, three, rtol=1e-10)
    table = M.compute_metrics(fused, [a, b], names=["QSF_MIN", "QSF_MAX", "QABF"])
    assert table["QSF_MIN"] == pytest.approx(min(M.per_source_qabf(fused, a, b)))
    assert table["QSF_MAX"] == pytest.approx(max(M.per_source_qabf(fused, a, b)))
    assert "QSF_MIN" in M.available_metrics() and M.direction("min_qsf") == "higher"


def test_flat_source_is_undefined_not_an_error(images) -> None:
    fused, a, _ = images
    flat = np.zeros_like(a)  # zero padding: only an all-zero image has no Sobel edge
    with pytest.warns(M.MetricUndefinedWarning):
        values = M.per_source_qabf(fused, a, flat)
    assert math.isnan(values[1]) and values[0] == values[0]
    with pytest.warns(M.MetricUndefinedWarning):
        assert M.weaker_source_share(fused, a, flat) == values[0]
