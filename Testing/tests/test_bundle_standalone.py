"""The MONAI bundle on its own, as model-zoo users take it: ``monai_bundle/`` copied alone to
another folder and run with ``python -m monai.bundle`` in a fresh environment that has only the
packages its ``metadata.json`` lists (no ``medfusion``, no checkout on the path).

Inference fuses a user's datalist (colour PET with MRI, and a NIfTI pair on different grids) and
a paired folder; evaluation and a one-epoch training run on a small atlas-layout folder; bad
input ends with a clear message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bundle_errors import Outcome, assert_one_line_bundle_error, run_bad_inputs
from packaging_envs import (
    PythonEnv,
    assert_cannot_import_medfusion,
    copy_bundle_alone,
    fresh_env,
    package_layer,
)
from PIL import Image

pytestmark = pytest.mark.slow  # fresh environments and real installs: minutes

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "monai_bundle"
CROP = 48
LEFT_OUT = ("itk",)  # optional, large; the NIfTI volumes here are read by nibabel


def metadata_requirements() -> list[str]:
    """``name==version`` for MONAI and every required and extra package of metadata.json."""
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    packages = {"monai": meta["monai_version"], **meta["required_packages_version"],
                **meta["extra_packages_version"]}
    return [f"{name}=={version}" for name, version in packages.items() if name not in LEFT_OUT]


@pytest.fixture(scope="module")
def bundle_env(tmp_path_factory: pytest.TempPathFactory) -> PythonEnv:
    root = tmp_path_factory.mktemp("bundle-env")
    env = fresh_env(root / "venv", layers=[package_layer("bundle-deps", metadata_requirements())])
    assert_cannot_import_medfusion(env, root)
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle folder copied alone (what a user downloads), without local runs or caches."""
    return copy_bundle_alone(BUNDLE, tmp_path_factory.mktemp("elsewhere") / "medfusion_cnn_bundle")


def run_bundle(env: PythonEnv, bundle: Path, *args: str, timeout: float = 600):
    return env.run(["-m", "monai.bundle", "run", *args], cwd=bundle, timeout=timeout)


def _slab(path: Path, out: Path, z0: int, z1: int) -> Path:
    """A few axial slices of a real volume (SimpleITK keeps the physical position)."""
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:, :, z0:z1], str(out))
    return out


@pytest.fixture(scope="module")
def user_data(aanlib: Path, spm12: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: a PET-MRI pair (PET in colour), a CT-MRI pair, a T1 + SPECT NIfTI pair
    (SPECT on another grid, flipped x axis) and a datalist naming them relative to itself."""
    root = tmp_path_factory.mktemp("user")
    pet_name, ct_name = "25015.png", sorted((aanlib / "CT-MRI" / "CT").iterdir())[0].name
    for pair, modality, name in [("PET-MRI", "MRI", pet_name), ("PET-MRI", "PET", pet_name),
                                 ("CT-MRI", "MRI", ct_name), ("CT-MRI", "CT", ct_name)]:
        out = root / "images" / pair / modality / name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(aanlib / pair / modality / name, out)
    volumes = root / "volumes"
    volumes.mkdir()
    _slab(spm12 / "T1.nii", volumes / "t1.nii.gz", 40, 46)
    _slab(spm12 / "SPECT.nii", volumes / "spect.nii.gz", 38, 48)
    datalist = {"testing": [
        {"sources": [f"images/PET-MRI/MRI/{pet_name}", f"images/PET-MRI/PET/{pet_name}"],
         "name": "pet_mri.png"},
        {"sources": [f"images/CT-MRI/MRI/{ct_name}", f"images/CT-MRI/CT/{ct_name}"]},
        {"sources": ["volumes/t1.nii.gz", "volumes/spect.nii.gz"]},
    ]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def test_inference_on_a_user_datalist(bundle_env, bundle, user_data, tmp_path, aanlib):
    out = tmp_path / "fused"
    done = run_bundle(bundle_env, bundle, "--config_file", "configs/inference.json",
                      "--datalist", str(user_data / "datalist.json"), "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deprecated name" not in done.stderr  # metadata.json reads cleanly in MONAI
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["pet_mri.png", sorted((aanlib / "CT-MRI" / "CT").iterdir())[0].name, "t1.nii.gz"])

    # colour PET: the fused image is in colour and equals what the medfusion CLI writes
    pet_pair = [user_data / "images" / "PET-MRI" / m / "25015.png" for m in ("MRI", "PET")]
    cli_out = tmp_path / "cli.png"
    cli = subprocess.run([sys.executable, "-m", "medfusion", "fuse", *map(str, pet_pair),
                          "-o", str(cli_out)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    fused = np.asarray(Image.open(out / "pet_mri.png"))
    assert fused.shape == (256, 256, 3) and np.ptp(fused[..., 0] - fused[..., 2]) > 50
    assert np.abs(fused.astype(int) - np.asarray(Image.open(cli_out)).astype(int)).max() <= 1

    # the volume pair: fused on the reference's grid, whatever the other's grid
    reference = sitk.ReadImage(str(user_data / "volumes" / "t1.nii.gz"))
    result = sitk.ReadImage(str(out / "t1.nii.gz"))
    assert result.GetSize() == reference.GetSize()
    np.testing.assert_allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(result.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)
    voxels = sitk.GetArrayFromImage(result)
    assert voxels.dtype == np.float32 and 0.0 <= voxels.min() and voxels.max() <= 1.0
    t1 = sitk.GetArrayFromImage(reference).astype(np.float32)
    assert np.corrcoef(voxels.ravel(), t1.ravel())[0, 1] > 0.5
    # ... and it is the volume the medfusion CLI fuses from the same files: the same slices,
    # not their transposes (the network is not transpose-invariant: it differed by up to 0.5)
    cli_volume = tmp_path / "cli.nii.gz"
    cli = subprocess.run([sys.executable, "-m", "medfusion", "fuse",
                          str(user_data / "volumes" / "t1.nii.gz"),
                          str(user_data / "volumes" / "spect.nii.gz"), "-o", str(cli_volume),
                          "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    cli_voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(cli_volume)))
    assert np.abs(voxels - cli_voxels).max() < 1e-3


def test_inference_on_a_paired_folder(bundle_env, bundle, user_data, tmp_path):
    out = tmp_path / "fused"
    folder = user_data / "images" / "PET-MRI"  # PET-MRI/MRI/<name>, PET-MRI/PET/<name>
    done = run_bundle(bundle_env, bundle, "--config_file", "configs/inference.json",
                      "--dataset_dir", str(folder), "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    written = np.asarray(Image.open(out / "25015.png"))
    assert written.shape == (256, 256, 3)


BAD_INPUTS = [
    ("missing", "file not found"),
    ("malformed", "has no 'testing' list"),
    ("one modality", "needs two or more modality folders"),
    ("flag as block exponent", "block exponent must be an integer 0..6, got True"),
    # an all-black PET was fused into an image that looked like a success (medfusion refuses it)
    ("constant source", "black.png is all zero: there is nothing to fuse"),
    ("constant volume", "flat.nii.gz is constant (7 everywhere): there is nothing to fuse"),
]


def _bad_input_options(problem: str, folder: Path, user_data: Path) -> list[str]:
    """The bundle's options (and the files in ``folder`` they name) for one bad input."""
    datalist = folder / "datalist.json"
    pet_mri = [str(user_data / "images" / "PET-MRI" / "MRI" / "25015.png"),
               str(user_data / "images" / "PET-MRI" / "PET" / "25015.png")]
    options = ["--datalist", str(datalist)]
    if problem == "missing":
        datalist.write_text(json.dumps({"testing": [{"sources": [
            pet_mri[0], str(folder / "no_such_pet.png")]}]}))
    elif problem == "malformed":
        datalist.write_text(json.dumps({"training": [["a.png", "b.png"]]}))
    elif problem == "constant source":  # in the second group: refused before the first is written
        Image.new("RGB", (256, 256)).save(folder / "black.png")
        datalist.write_text(json.dumps({"testing": [{"sources": pet_mri}, {"sources": [
            pet_mri[0], str(folder / "black.png")], "name": "black"}]}))
    elif problem == "constant volume":
        t1 = user_data / "volumes" / "t1.nii.gz"
        flat = sitk.ReadImage(str(t1)) * 0 + 7
        sitk.WriteImage(flat, str(folder / "flat.nii.gz"))
        datalist.write_text(json.dumps({"testing": [{"sources": [
            str(t1), str(folder / "flat.nii.gz")]}]}))
    elif problem == "one modality":
        (folder / "folder" / "MRI").mkdir(parents=True)
        shutil.copy(pet_mri[0], folder / "folder" / "MRI" / "25015.png")
        options = ["--dataset_dir", str(folder / "folder")]
    else:
        datalist.write_text(json.dumps({"testing": [{"sources": pet_mri}]}))
        options += ["--block_exponent", "True"]
    return options


@pytest.fixture(scope="module")
def bad_input_runs(bundle_env: PythonEnv, bundle: Path, user_data: Path,
                   tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, tuple[Outcome, Path]]:
    """Every case of :data:`BAD_INPUTS` run by the bundle, the runs started together
    (``run_bad_inputs``): per problem, the finished run and its output folder."""
    return run_bad_inputs(
        [problem for problem, _ in BAD_INPUTS], tmp_path_factory.mktemp,
        lambda problem, folder: _bad_input_options(problem, folder, user_data),
        functools.partial(run_bundle, bundle_env, bundle, "--config_file",
                          "configs/inference.json"))


@pytest.mark.parametrize("problem, message", BAD_INPUTS)
def test_bad_input_is_a_one_line_error(
    bad_input_runs: dict[str, tuple[Outcome, Path]], problem: str,
    message: str
) -> None:
    """What the bundle's code refuses is one line on stderr, not MONAI's 60-240-line
    "Failed to instantiate component" traceback (``--block_exponent True`` was taken as 1)."""
    done, out = bad_input_runs[problem]
    assert_one_line_bundle_error(done, message, out)


@pytest.fixture(scope="module")
def tiny_atlas(aanlib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two pairs per split in the atlas layout, 48x48 centre crops (seconds to train on)."""
    root = tmp_path_factory.mktemp("tiny_atlas")
    spec = json.loads((aanlib / "splits.json").read_text())["pairs"]
    info = spec["PET-MRI"]
    chosen = {"train": info["train"][:2], "validation": info["validation"][:2]}
    for names in chosen.values():
        for name in names:
            for modality in info["modalities"]:
                with Image.open(aanlib / "PET-MRI" / modality / name) as img:
                    top = (img.height - CROP) // 2
                    crop = img.crop((top, top, top + CROP, top + CROP))
                out = root / "PET-MRI" / modality / name
                out.parent.mkdir(parents=True, exist_ok=True)
                crop.save(out)
    pairs = {"PET-MRI": {"modalities": info["modalities"], **chosen}}
    (root / "splits.json").write_text(json.dumps({"pairs": pairs}))
    return root


def test_evaluation_without_medfusion(bundle_env, bundle, tiny_atlas, tmp_path):
    out = tmp_path / "eval"
    done = run_bundle(bundle_env, bundle, "--config_file",
                      "['configs/train.json','configs/evaluate.json']",
                      "--dataset_dir", str(tiny_atlas), "--output_dir", str(out),
                      "--block_exponent", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (out / "metrics.csv").read_text().splitlines()
    scores = dict(line.split(",") for line in lines)
    assert {"val_score", "val_qabf", "val_vif", "val_ssim"} <= set(scores)
    assert 0.0 < float(scores["val_qabf"]) < 1.0
    assert float(scores["val_vif"]) > 0.0
    assert 0.0 < float(scores["val_ssim"]) <= 1.0


def test_training_writes_a_run_folder_not_the_shipped_weights(bundle_env, bundle, tiny_atlas,
                                                              tmp_path):
    shipped = bundle / "models" / "model.pt"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    # The supervised targets come from MedFusion's fusion rules: built where MedFusion is
    # installed (this interpreter), then read by the bundle alone through --target_dir.
    targets = tmp_path / "targets"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from scripts.targets import "
            "build_targets; build_targets(sys.argv[2], sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(bundle), str(tiny_atlas), str(targets)],
                   check=True, capture_output=True, timeout=300)
    assert (targets / "targets.json").is_file()
    done = run_bundle(bundle_env, bundle, "training", "--config_file", "configs/train.json",
                      "--dataset_dir", str(tiny_atlas), "--target_dir", str(targets),
                      "--run_name", "test-run", "--epochs", "1",
                      "--block_exponent", "2", "--patch_size", "32", "--patches_per_image", "2",
                      "--batch_size", "2",
                      "--num_threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    run = bundle / "runs" / "test-run"
    assert (run / "models" / "model.pt").is_file()
    assert any((run / "logs").glob("events.out.tfevents*"))
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
