"""Classical fusion methods through the registry's batch interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.errors import InputError, ModelError
from medfusion.io.images import read_image, to_unit_range
from medfusion.methods import available_methods, get_method, resolve_device
from medfusion.methods.classical import GuidedFilterFusion, LaplacianPyramidFusion
from medfusion.metrics import qabf


def _atlas_batch(aanlib: Path) -> torch.Tensor:
    """(1, 2, 256, 256): real CT and MRI of one atlas slice."""
    ct = to_unit_range(read_image(aanlib / "CT-MRI" / "CT" / "28011.png"))
    mri = to_unit_range(read_image(aanlib / "CT-MRI" / "MRI" / "28011.png"))
    return torch.from_numpy(np.stack([ct, mri]))[None]


def test_registry_lists_and_builds() -> None:
    assert available_methods() == ["cnn", "sesf", "average", "max", "laplacian", "gff"]
    for name in ("average", "max", "laplacian", "gff"):
        assert get_method(name).name == name
    with pytest.raises(InputError, match="unknown method"):
        get_method("wavelet")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device|unsupported device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_cnn_errors_suggest_laplacian(tmp_path: Path) -> None:
    try:
        get_method("cnn", bundle_dir=str(tmp_path / "no-bundle"))
    except ModelError as error:
        assert "--method laplacian" in str(error)
    else:  # a bundle at a missing path must not load
        pytest.fail("a missing bundle folder was accepted")


def test_average_and_max_are_pixelwise(aanlib: Path) -> None:
    batch = _atlas_batch(aanlib)
    assert torch.allclose(get_method("average")(batch), batch.mean(dim=1))
    assert torch.equal(get_method("max")(batch), batch.amax(dim=1))


@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (5, 7)])
def test_laplacian_reconstructs_identical_sources(shape) -> None:
    image = torch.rand(2, 1, *shape)
    fused = get_method("laplacian")(image.repeat(1, 3, 1, 1))
    assert fused.shape == (2, *shape)
    assert torch.allclose(fused, image[:, 0], atol=1e-5)


def test_laplacian_keeps_details_of_both_sources(aanlib: Path) -> None:
    batch = _atlas_batch(aanlib)
    laplacian = get_method("laplacian")(batch)[0]
    average = get_method("average")(batch)[0]

    def detail_energy(image: torch.Tensor) -> float:
        return float((image[1:, :] - image[:-1, :]).abs().mean()
                     + (image[:, 1:] - image[:, :-1]).abs().mean())

    # Max-abs detail selection keeps the sharper edges that averaging halves.
    assert detail_energy(laplacian) > 1.2 * detail_energy(average)
    assert 0.0 <= float(laplacian.min()) and float(laplacian.max()) <= 1.0


def test_laplacian_batch_equals_one_by_one(aanlib: Path) -> None:
    batch = torch.cat([_atlas_batch(aanlib), torch.rand(2, 2, 256, 256)])
    method = LaplacianPyramidFusion()
    together = method(batch)
    apart = torch.cat([method(batch[i : i + 1]) for i in range(batch.shape[0])])
    assert torch.allclose(together, apart, atol=1e-6)


def _gradient_energy(image: torch.Tensor) -> float:
    return float((image[1:, :] - image[:-1, :]).abs().mean()
                 + (image[:, 1:] - image[:, :-1]).abs().mean())


@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (5, 7)])
def test_gff_gives_back_identical_sources(shape) -> None:
    image = torch.rand(2, 1, *shape)
    fused = get_method("gff")(image.repeat(1, 3, 1, 1))
    assert fused.shape == (2, *shape)
    assert torch.allclose(fused, image[:, 0], atol=1e-5)


@pytest.mark.parametrize("textured_first", [True, False])
def test_gff_keeps_the_textured_source_beside_a_flat_one(aanlib: Path, textured_first) -> None:
    mri = _atlas_batch(aanlib)[0, 1]
    flat = torch.full_like(mri, 0.3)
    pair = (mri, flat) if textured_first else (flat, mri)
    fused = get_method("gff")(torch.stack(pair)[None])[0]
    # The flat source has no saliency, so the textured one's detail layer is kept whole.
    assert _gradient_energy(fused) == pytest.approx(_gradient_energy(mri), rel=0.1)
    assert _gradient_energy(fused) > 1.5 * _gradient_energy((mri + flat) / 2)


def test_gff_range_shape_and_batch_equals_one_by_one(aanlib: Path) -> None:
    batch = torch.cat([_atlas_batch(aanlib), torch.rand(1, 2, 256, 256)])
    method = GuidedFilterFusion()
    together = method(batch)
    assert together.shape == (2, 256, 256) and together.dtype == torch.float32
    assert 0.0 <= float(together.min()) and float(together.max()) <= 1.0
    apart = torch.cat([method(batch[i : i + 1]) for i in range(batch.shape[0])])
    assert torch.allclose(together, apart, atol=1e-5)


def test_gff_keeps_more_edges_than_averaging_on_a_ct_mri_pair(aanlib: Path) -> None:
    batch = _atlas_batch(aanlib)
    ct, mri = (batch[0, i].numpy() * 255 for i in range(2))

    def score(name: str) -> float:
        return qabf(get_method(name)(batch)[0].numpy() * 255, ct, mri)

    assert score("gff") > score("average") + 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_range_check_on_float32_bits_judges_as_the_float_values(dtype: torch.dtype) -> None:
    """check_sources reads a float32 batch's bits first (an int32 minimum and maximum): each
    value at and around the edges of [0, 1] within the tolerance, and NaN and infinities of
    both signs, is accepted or refused exactly as its float value says, in float32 and float64
    alike (float64 never takes the bit path)."""
    from medfusion.methods.sources import RANGE_TOLERANCE, check_sources

    top = np.float32(1.0 + RANGE_TOLERANCE)
    edges = [0.0, -0.0, 1.0, 1e-45, -1e-45, -RANGE_TOLERANCE, -2 * RANGE_TOLERANCE, float(top),
             float(np.nextafter(top, np.float32(2))), float(np.nextafter(top, np.float32(0))),
             1.5, float("nan"), -float("nan"), float("inf"), -float("inf")]
    for value in edges:
        batch = torch.full((1, 2, 3, 5), 0.5, dtype=dtype)
        batch[0, 1, 2, 4] = value
        stored = float(batch[0, 1, 2, 4])
        allowed = -RANGE_TOLERANCE <= stored <= 1.0 + RANGE_TOLERANCE
        if allowed:
            check_sources(batch, "the check")
            check_sources(batch.transpose(2, 3), "the check")  # strided views too
        else:
            with pytest.raises(ModelError, match="expects finite sources in"):
                check_sources(batch, "the check")
    if dtype == torch.float32:  # a view with torch's negative bit has no int32 view: floats
        values = torch.rand(1, 2, 3, 5, generator=torch.Generator().manual_seed(1))
        negated = torch.complex(values, -values).conj().imag
        assert negated.is_neg() and torch.equal(negated, values)
        check_sources(negated, "the check")
        with pytest.raises(ModelError, match="expects finite sources in"):
            check_sources(torch.complex(values, 0.5 - values).conj().imag, "the check")


@pytest.mark.parametrize("name", ["average", "max", "laplacian", "gff", "cnn", "sesf"])
def test_every_method_refuses_a_batch_it_would_fuse_wrongly(name: str) -> None:
    """From Python, a batch that is not (B, K >= 2, H, W) float sources in [0, 1] is an error
    for every method (it used to come back fused anyway: a (K, H, W) tensor averaged over the
    wrong axis, one NaN spread over a CNN's output, 0-255 values saturated to white)."""
    method = get_method(name, device="cpu")
    good = torch.rand(1, 2, 32, 32)
    assert method(good).shape == (1, 32, 32)
    nan = good.clone()
    nan[0, 0, 5, 5] = float("nan")
    bad = {"(K, H, W)": good[0], "5-D": good[None], "no sources": good[:, :0],
           "one source": good[:, :1], "no images": good[:0], "0-255": good * 255,
           "uint8": (good * 255).to(torch.uint8), "NaN": nan, "negative": good - 0.5}
    for what, batch in bad.items():
        with pytest.raises(ModelError, match=r"expects|fuses|empty") as caught:
            method(batch)
        assert "\n" not in str(caught.value), what
