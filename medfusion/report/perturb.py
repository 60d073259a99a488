"""Seeded input perturbations for the robustness study.

Each perturbation kind models a real disturbance of one family of sources, applied to images in
``[0, 1]`` (2D grey ``(H, W)``, colour ``(H, W, 3)`` with independent noise per channel, or 3D
volumes) and clipped back to ``[0, 1]``:

- ``gaussian``: additive white Gaussian noise of standard deviation ``level`` (all sources);
- ``rician``: magnitude-MRI noise, ``|x + n1 + i n2|`` with ``n1, n2 ~ N(0, level)`` (MRI sources);
- ``poisson``: photon-count noise of PET/SPECT, ``Poisson(x * N) / N`` with ``N = 1 / level**2``
  counts at full intensity, so ``level`` is the relative noise at full intensity (PET/SPECT);
- ``blur``: Gaussian blur of standard deviation ``level`` pixels along every spatial axis
  (all sources).

A kind that fits none of a group's modalities (Poisson on CT-MRI) leaves that group out of that
kind's curve. Randomness comes from :func:`perturbation_rng`, keyed by the seed and the group,
so a run is reproducible and independent of the order work is done in.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medfusion.errors import InputError

MRI_MODALITIES = ("MRI", "MR", "T1", "T1C", "T1CE", "T2", "PD", "FLAIR", "EPI", "DWI", "ADC")
EMISSION_MODALITIES = ("PET", "SPECT", "NM")
KINDS = ("gaussian", "rician", "poisson", "blur")
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian": (0.02, 0.05, 0.1),
    "rician": (0.02, 0.05, 0.1),
    "poisson": (0.05, 0.1, 0.2),
    "blur": (0.5, 1.0, 2.0),
}
LEVEL_UNITS = {
    "gaussian": "noise std (fraction of range)",
    "rician": "noise std (fraction of range)",
    "poisson": "relative noise at full intensity",
    "blur": "blur std (pixels)",
}


@dataclass(frozen=True)
class PerturbationSpec:
    """One perturbation kind and the levels to test (0, the clean input, is implied)."""

    kind: str
    levels: tuple[float, ...]


def parse_perturbations(tokens: Sequence[str]) -> list[PerturbationSpec]:
    """Parse ``KIND[:LEVEL[:LEVEL...]]`` tokens (default levels when none are given).

    ``["gaussian", "blur:1:2"]`` -> gaussian at its default levels, blur at 1 and 2 pixels.
    """
    specs = []
    for token in tokens:
        kind, *raw_levels = token.strip().split(":")
        kind = kind.lower()
        if kind not in KINDS:
            raise InputError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}")
        try:
            levels = tuple(float(v) for v in raw_levels if v) or DEFAULT_LEVELS[kind]
        except ValueError as error:
            raise InputError(f"bad perturbation level in {token!r}: {error}") from error
        if any(level <= 0 for level in levels):
            raise InputError(f"perturbation levels must be > 0 in {token!r}")
        specs.append(PerturbationSpec(kind, tuple(sorted(set(levels)))))
    return specs


def applies_to(kind: str, modality: str) -> bool:
    """Whether a perturbation kind models a disturbance of this modality's images."""
    name = modality.upper()
    if kind == "rician":
        return name in MRI_MODALITIES
    if kind == "poisson":
        return name in EMISSION_MODALITIES
    return True


def perturbation_rng(seed: int, *keys: str | int | float) -> np.random.Generator:
    """A generator determined by the seed and the keys (group label, kind, level, source)."""
    entropy = [int(seed)] + [zlib.crc32(str(key).encode()) for key in keys]
    return np.random.default_rng(entropy)


def _spatial_sigma(image: np.ndarray, sigma: float, colour: bool) -> tuple[float, ...]:
    """Blur only along spatial axes (never across colour channels)."""
    return (sigma,) * (image.ndim - 1) + (0.0,) if colour else (sigma,) * image.ndim


def perturb(
    image: np.ndarray,
    kind: str,
    level: float,
    rng: np.random.Generator,
    colour: bool | None = None,
) -> np.ndarray:
    """Return a perturbed float32 copy of ``image`` (values in ``[0, 1]``).

    ``colour`` marks a trailing RGB axis (default: a 2D image whose last axis has 3 channels).
    """
    x = np.asarray(image, dtype=np.float64)
    if colour is None:
        colour = x.ndim == 3 and x.shape[-1] == 3
    if level <= 0:
        return x.astype(np.float32)
    if kind == "gaussian":
        out = x + rng.normal(0.0, level, size=x.shape)
    elif kind == "rician":
        out = np.hypot(x + rng.normal(0.0, level, x.shape), rng.normal(0.0, level, x.shape))
    elif kind == "poisson":
        counts = 1.0 / level**2
        out = rng.poisson(np.clip(x, 0.0, 1.0) * counts) / counts
    elif kind == "blur":
        out = ndimage.gaussian_filter(x, _spatial_sigma(x, level, colour), mode="nearest")
    else:
        raise InputError(f"unknown perturbation {kind!r}; choose from {', '.join(KINDS)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)
