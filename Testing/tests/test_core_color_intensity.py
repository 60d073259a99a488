"""YCbCr conversion, chroma merging and intensity normalisation policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfusion import color, intensity
from medfusion.errors import InputError
from medfusion.io.images import read_image, to_unit_range


def test_ycbcr_round_trip_on_real_pet(aanlib: Path) -> None:
    rgb = to_unit_range(read_image(aanlib / "PET-MRI" / "PET" / "25030.png"))
    ycbcr = color.rgb_to_ycbcr(rgb)
    assert ycbcr.min() >= -1e-6 and ycbcr.max() <= 1 + 1e-6
    assert np.allclose(color.ycbcr_to_rgb(ycbcr), rgb, atol=1e-5)
    assert np.allclose(color.luminance(rgb), ycbcr[..., 0], atol=1e-6)


def test_luminance_has_the_same_bits_whatever_the_memory_layout(aanlib: Path) -> None:
    """The benchmark's workers and the caller must get one luminance: no BLAS-order rounding."""
    rgb = to_unit_range(read_image(aanlib / "PET-MRI" / "PET" / "25038.png"))
    expected = color.rgb_to_ycbcr(rgb)[..., 0]
    layouts = {
        "contiguous": rgb,
        "fortran": np.asfortranarray(rgb),
        "strided": np.pad(rgb, ((0, 0), (0, 0), (0, 1)))[..., :3],
        "transposed twice": np.ascontiguousarray(rgb.transpose(1, 0, 2)).transpose(1, 0, 2),
    }
    for name, view in layouts.items():
        assert np.array_equal(color.luminance(view), expected), name
        assert np.array_equal(color.rgb_to_ycbcr(view)[..., 0], expected), name
    # and the fixed-order sum is the BT.601 formula in float32
    red, green, blue = (rgb[..., c] for c in range(3))
    formula = red * np.float32(0.299) + green * np.float32(0.587) + blue * np.float32(0.114)
    assert np.array_equal(expected, formula)


def test_grey_has_neutral_chroma() -> None:
    grey = np.full((2, 2, 3), 0.3, dtype=np.float32)
    ycbcr = color.rgb_to_ycbcr(grey)
    assert np.allclose(ycbcr[..., 0], 0.3, atol=1e-6) and np.allclose(ycbcr[..., 1:], 0.5)
    assert not color.is_colour(grey)
    assert color.is_colour(np.dstack([grey[..., 0], grey[..., 1], grey[..., 2] + 0.1]))


def test_merge_chroma_follows_the_saturated_input() -> None:
    red = np.zeros((1, 2, 2), np.float32)
    red[0, 0] = (0.3, 0.9)  # strongly coloured at pixel 0
    red[0, 1] = (0.5, 0.5)  # neutral at pixel 1
    blue = np.zeros((1, 2, 2), np.float32)
    blue[0, 0] = (0.52, 0.5)
    blue[0, 1] = (0.9, 0.4)
    merged = color.merge_chroma([red, blue])
    assert np.allclose(merged[0, 1], blue[0, 1])  # only blue is coloured there
    assert abs(merged[0, 0, 1] - 0.9) < 0.05  # red dominates where it is saturated
    assert np.array_equal(color.merge_chroma([red]), red)


def test_percentile_is_robust_to_a_hot_spot() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(100, 10, size=(50, 50, 50)).astype(np.float32)
    values[0, 0, 0] = 1e6
    norm = intensity.fit_normaliser(values, "percentile")
    assert 60 < norm.low < 80 and 120 < norm.high < 140
    out = norm(values)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    minmax = intensity.fit_normaliser(values, "minmax")
    assert minmax.high == 1e6


def test_ct_window_and_parse() -> None:
    assert intensity.parse_ct_window("40,80") == (40.0, 80.0)
    norm = intensity.fit_normaliser(np.array([-1000, 0, 40, 80, 3000], np.int16), "ct-window",
                                    ct_window=(40, 80))
    assert norm(np.array([0, 40, 80])).tolist() == [0.0, 0.5, 1.0]
    for bad in ("40", "a,b", "40,0", "nan,80", "40,inf", "-inf,80"):
        with pytest.raises(InputError):
            intensity.parse_ct_window(bad)
    # a window that holds none of the CT's values would make it constant: refused
    ct = np.array([-1000, -500, 0, 60], np.int16)
    for window in ((5000, 10), (-3000, 100), (100, 80)):
        with pytest.raises(InputError, match="holds none of"):
            intensity.fit_normaliser(ct, "ct-window", ct_window=window)
    assert intensity.fit_normaliser(ct, "ct-window", ct_window=(40, 80)).high == 80.0


def test_none_refuses_values_it_would_clip() -> None:
    """'none' takes [0, 1] values as they are; a volume in HU (or any other range) would be
    clipped to a few percent of its voxels, so it is an error, not a silent clip."""
    with pytest.raises(InputError, match="from -1000 to 40.*'none'"):
        intensity.fit_normaliser(np.array([-1000.0, 0.0, 40.0]), "none", label="ct.nii")
    with pytest.raises(InputError, match="would clip"):
        intensity.fit_normaliser(np.array([0.0, 0.5, 1.2]), "none")
    norm = intensity.fit_normaliser(np.array([-0.004, 0.5, 1.004]), "none")  # overshoot
    assert norm(np.array([-0.004, 1.004])).tolist() == [0.0, 1.0]


def test_constant_and_non_finite_inputs_are_refused() -> None:
    with pytest.raises(InputError, match="all zero"):
        intensity.fit_normaliser(np.zeros((4, 4)), "percentile", label="blank.png")
    with pytest.raises(InputError, match="constant"):
        intensity.fit_normaliser(np.full((4, 4), 3.0), "minmax")
    values = np.ones((10, 10), np.float32)
    values[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        intensity.check_finite(values, "x.nii")
    intensity.check_finite(np.ones((3, 3), np.int16), "ints cannot hold NaN")


def test_policies_for_expands_and_validates() -> None:
    assert intensity.policies_for(3, "minmax") == ["minmax"] * 3
    assert intensity.policies_for(2, "ct-window,percentile", (40, 80)) == ["ct-window",
                                                                            "percentile"]
    with pytest.raises(InputError, match="one per input"):
        intensity.policies_for(3, "minmax,none")
    with pytest.raises(InputError, match="needs a window"):
        intensity.policies_for(2, "ct-window")
    with pytest.raises(InputError, match="unknown normalisation"):
        intensity.policies_for(2, "zscore")
