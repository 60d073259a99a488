"""Seeded perturbations of the robustness study, checked on a real atlas image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfusion.errors import InputError
from medfusion.io.images import read_image, to_unit_range
from medfusion.report.perturb import (
    DEFAULT_LEVELS,
    applies_to,
    parse_perturbations,
    perturb,
    perturbation_rng,
)


@pytest.fixture(scope="module")
def mri(aanlib: Path) -> np.ndarray:
    return to_unit_range(read_image(aanlib / "PET-MRI" / "MRI" / "25038.png"))


@pytest.fixture(scope="module")
def pet(aanlib: Path) -> np.ndarray:
    return to_unit_range(read_image(aanlib / "PET-MRI" / "PET" / "25038.png"))


@pytest.mark.parametrize("kind", ["gaussian", "rician", "poisson", "blur"])
def test_every_kind_is_seeded_bounded_and_changes_the_image(kind: str, mri: np.ndarray) -> None:
    level = DEFAULT_LEVELS[kind][1]
    first = perturb(mri, kind, level, perturbation_rng(0, "g", kind, level, 0))
    again = perturb(mri, kind, level, perturbation_rng(0, "g", kind, level, 0))
    other = perturb(mri, kind, level, perturbation_rng(1, "g", kind, level, 0))
    assert first.dtype == np.float32 and first.shape == mri.shape
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - mri).mean() > 1e-3
    if kind != "blur":
        assert not np.array_equal(first, other)
    np.testing.assert_array_equal(perturb(mri, kind, 0.0, perturbation_rng(0)), mri)


def test_noise_strength_follows_the_level(mri: np.ndarray) -> None:
    grey = np.full((128, 128), 0.5, np.float32)
    noisy = perturb(grey, "gaussian", 0.05, perturbation_rng(3))
    assert noisy.std() == pytest.approx(0.05, rel=0.05)
    # Poisson: relative noise at full intensity is the level (N = 1 / level^2 counts)
    white = np.ones((128, 128), np.float32) * 0.8
    counts = perturb(white, "poisson", 0.1, perturbation_rng(3))
    assert counts.std() == pytest.approx(0.1 * np.sqrt(0.8), rel=0.05)
    # Rician noise lifts the dark background (magnitude of complex noise is never negative)
    dark = mri < 0.01
    rician = perturb(mri, "rician", 0.05, perturbation_rng(3))
    assert rician[dark].mean() == pytest.approx(0.05 * np.sqrt(np.pi / 2), rel=0.1)
    # More blur -> smoother image (less high-frequency energy)
    gradient = [
        np.abs(np.diff(perturb(mri, "blur", s, perturbation_rng(0)), axis=1)).mean()
        for s in (0.5, 1.0, 2.0)
    ]
    assert gradient[0] > gradient[1] > gradient[2]


def test_colour_blur_never_mixes_channels(pet: np.ndarray) -> None:
    blurred = perturb(pet, "blur", 1.0, perturbation_rng(0))
    assert blurred.shape == pet.shape
    # a uniform-colour image stays exactly its colour: no bleeding across the channel axis
    flat = np.broadcast_to(np.array([0.9, 0.2, 0.1], np.float32), (32, 32, 3))
    np.testing.assert_allclose(perturb(flat, "blur", 2.0, perturbation_rng(0)), flat, atol=1e-6)


def test_kinds_target_their_modalities() -> None:
    assert applies_to("rician", "MRI") and not applies_to("rician", "CT")
    assert applies_to("poisson", "PET") and applies_to("poisson", "SPECT")
    assert not applies_to("poisson", "MRI")
    assert applies_to("gaussian", "CT") and applies_to("blur", "SPECT")


def test_parse_perturbations() -> None:
    specs = parse_perturbations(["gaussian", "blur:2:1"])
    assert [(s.kind, s.levels) for s in specs] == [
        ("gaussian", DEFAULT_LEVELS["gaussian"]),
        ("blur", (1.0, 2.0)),
    ]
    with pytest.raises(InputError, match="unknown perturbation 'salt'"):
        parse_perturbations(["salt"])
    with pytest.raises(InputError, match="must be > 0"):
        parse_perturbations(["blur:0"])
    with pytest.raises(InputError, match="bad perturbation level"):
        parse_perturbations(["blur:x"])
