"""Classical fusion methods through the registry's batch interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.errors import InputError, ModelError
from medfusion.io.images import read_image, to_unit_range
from medfusion.methods import available_methods, get_method, resolve_device
from medfusion.methods.classical import LaplacianPyramidFusion


def _atlas_batch(aanlib: Path) -> torch.Tensor:
    """(1, 2, 256, 256): real CT and MRI of one atlas slice."""
    ct = to_unit_range(read_image(aanlib / "CT-MRI" / "CT" / "28011.png"))
    mri = to_unit_range(read_image(aanlib / "CT-MRI" / "MRI" / "28011.png"))
    return torch.from_numpy(np.stack([ct, mri]))[None]


def test_registry_lists_and_builds() -> None:
    assert available_methods() == ["cnn", "average", "max", "laplacian"]
    for name in ("average", "max", "laplacian"):
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
