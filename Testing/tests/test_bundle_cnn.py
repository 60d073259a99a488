"""The ``cnn`` fusion method: the shipped bundle on real atlas pairs, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfusion import color
from medfusion.errors import InputError, ModelError
from medfusion.methods import backend, cnn, get_method, tiling

BUNDLE = Path(__file__).resolve().parents[2] / "monai_bundle"


def _luminance(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return color.luminance(rgb)  # the project's BT.601 Y, not a second copy of its weights


@pytest.fixture(scope="module")
def pet_mri(aanlib: Path) -> torch.Tensor:
    """One real PET-MRI validation pair as a (1, 2, 256, 256) batch (PET as luminance)."""
    name = "25020.png"
    planes = [_luminance(aanlib / "PET-MRI" / m / name) for m in ("MRI", "PET")]
    return torch.from_numpy(np.stack(planes))[None]


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped bundle to break in various ways."""
    copy = tmp_path / "bundle"
    for part in ("configs", "scripts", "models"):
        shutil.copytree(BUNDLE / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_cnn_fuses_a_real_pair_sensibly(pet_mri: torch.Tensor) -> None:
    import medfusion.metrics as fm

    method = get_method("cnn")
    fused = method(pet_mri)
    assert method.name == "cnn"
    assert fused.shape == (1, 256, 256) and fused.dtype == torch.float32
    assert 0.0 <= float(fused.min()) and float(fused.max()) <= 1.0
    f = fused[0].numpy() * 255.0
    mri, pet = (pet_mri[0, i].numpy() * 255.0 for i in range(2))
    assert np.corrcoef(f.ravel(), mri.ravel())[0, 1] > 0.9  # keeps the MRI anatomy
    uptake = pet > np.percentile(pet, 95)  # brightest PET uptake: brighter than the MRI there
    assert f[uptake].mean() > mri[uptake].mean() + 2.0
    maximum, average = np.maximum(mri, pet), (mri + pet) / 2
    # keeps both sources: far more of the weaker-kept source's edges than the pixel maximum
    assert fm.weaker_source_share(f, mri, pet) > fm.weaker_source_share(maximum, mri, pet) + 0.1
    assert fm.qabf(f, mri, pet) > fm.qabf(maximum, mri, pet) - 0.01  # about max's edges overall
    assert fm.qabf(f, mri, pet) > fm.qabf(average, mri, pet) + 0.1
    assert fm.vif(f, mri, pet) > fm.vif(maximum, mri, pet)


def test_block_exponent_is_an_option_and_checked(pet_mri: torch.Tensor) -> None:
    default = get_method("cnn")
    assert default.block_exponent == 3  # the bundle's inference.json
    fused = {i: get_method("cnn", block_exponent=i)(pet_mri) for i in range(5)}
    assert get_method("cnn", block_exponent=1).module.block_exponent == 1
    for i in range(4):
        # one set of weights: neighbouring block sizes fuse alike, but not identically
        difference = float((fused[i] - fused[i + 1]).abs().mean())
        assert 0.0 < difference < 0.03, (i, difference)
    assert torch.equal(default(pet_mri), fused[3])
    for bad in (7, -1, 1.5, "x"):
        with pytest.raises(InputError, match="block exponent"):
            get_method("cnn", block_exponent=bad)


def test_memory_tile_runs_ordinary_slices_whole_and_strips_are_exact(
    pet_mri: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one backend for both methods: under ``auto`` a strip and a whole slice are call classes
    # of their own, each timed apart, and may run on different backends (within 1e-4, below)
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    method = get_method("cnn")
    assert method.tile(2, 512, 512)[1] == 512  # a 512^2 pair runs whole by default
    # several slices per network call: as many as the budget holds on a GPU, on a CPU no more
    # than the cache tile (its temporaries stay in cache)
    assert method.tile(2, 256, 256)[0] == cnn.CPU_PIXELS_PER_CALL // (2 * 256 * 256) == 8
    assert tiling.tile(2, 256, 256, cnn.BYTES_PER_SOURCE_PIXEL, 32, 8)[0] > 16
    small = get_method("cnn", memory_budget_mb=2)
    slices, rows = small.tile(2, 256, 256)
    assert slices == 1 and rows < 256  # 2 MB cannot hold a 256^2 pair: row strips
    batch = torch.cat([pet_mri, pet_mri.flip(-1)])
    assert torch.allclose(small(batch), method(batch), atol=1e-5)
    monkeypatch.delenv(backend.BACKEND_ENV)
    chosen = get_method("cnn", memory_budget_mb=2)(batch), get_method("cnn")(batch)
    # each chosen backend matches the module within TOLERANCE (checked when it is chosen)
    assert torch.allclose(*chosen, atol=2 * backend.TOLERANCE)
    with pytest.raises(InputError, match="memory budget"):
        get_method("cnn", memory_budget_mb=0)


@pytest.mark.parametrize("size", [(2, 2), (1, 256), (37, 50)])
def test_tiny_and_odd_slices_fuse(size: tuple[int, int]) -> None:
    for exponent in (0, 3, 6):
        fused = get_method("cnn", block_exponent=exponent)(torch.rand(1, 2, *size))
        assert fused.shape == (1, *size) and torch.isfinite(fused).all()


def test_three_sources_work(pet_mri: torch.Tensor) -> None:
    batch = torch.cat([pet_mri, pet_mri[:, :1].flip(-1)], dim=1)
    fused = get_method("cnn")(batch)
    assert fused.shape == (1, 256, 256)


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 64, 64), (1, 3, 1, 64, 64)])
def test_wrong_channels_or_shape_is_a_model_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match="sources|batch"):
        get_method("cnn")(torch.rand(shape))


def test_missing_bundle_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        get_method("cnn", bundle_dir=tmp_path / "nowhere")


def test_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a MONAI bundle"):
        get_method("cnn", bundle_dir=tmp_path)


def test_bundle_without_weights(bundle_copy: Path) -> None:
    (bundle_copy / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match="no trained weights"):
        get_method("cnn", bundle_dir=bundle_copy)


def test_weights_of_another_network(bundle_copy: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(2, 1, 3))
    torch.save(other.state_dict(), bundle_copy / "models" / "model.pt")
    with pytest.raises(ModelError, match="do not match"):
        get_method("cnn", bundle_dir=bundle_copy)


def test_corrupt_weights_file(bundle_copy: Path) -> None:
    (bundle_copy / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read CNN weights"):
        get_method("cnn", bundle_dir=bundle_copy)


def test_weights_for_a_wider_network(bundle_copy: Path) -> None:
    config = bundle_copy / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"features": 24', '"features": 16'))
    with pytest.raises(ModelError, match="do not match"):
        get_method("cnn", bundle_dir=bundle_copy)


def test_copy_of_bundle_loads_its_own_code(bundle_copy: Path, pet_mri: torch.Tensor) -> None:
    method = get_method("cnn", bundle_dir=bundle_copy)
    shipped = get_method("cnn")
    assert torch.allclose(method(pet_mri), shipped(pet_mri), atol=1e-5)
