"""The ``sesf`` method and its bundle: the bundle alone (without medfusion) trains through
``monai.bundle`` and fuses as the core does; fusion of real atlas pairs through the decision
map, the block exponent, row strips, 3 sources, tiny slices, the CLI's decision map."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_errors import Outcome, assert_one_line_bundle_error, run_bad_inputs
from packaging_envs import copy_bundle_alone
from PIL import Image

from medfusion.engine import fuse_images
from medfusion.errors import InputError, ModelError
from medfusion.methods import get_method

BUNDLE = Path(__file__).resolve().parents[2] / "sesf_bundle"
CROP = 40
CT_MRI = ("CT-MRI", ("MRI", "CT"), "2004.png")


def _pair_paths(aanlib: Path, pair=CT_MRI) -> list[Path]:
    folder, modalities, name = pair
    return [aanlib / folder / modality / name for modality in modalities]


def _gradient(image: np.ndarray) -> np.ndarray:
    rows, cols = np.gradient(image.astype(np.float64))
    return np.hypot(rows, cols)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def sesf():
    """The shipped bundle's method, built once."""
    return get_method("sesf", device="cpu")


@pytest.fixture(scope="module")
def ct_mri(aanlib: Path, sesf):
    """A real CT-MRI atlas pair fused by sesf, with its decision map."""
    return fuse_images(_pair_paths(aanlib), method=sesf, device="cpu", decision_map=True)


@pytest.fixture(scope="module")
def tiny_aanlib(aanlib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training and one validation pair per pair type, 40x40 centre crops, atlas layout."""
    root = tmp_path_factory.mktemp("tiny_aanlib_sesf")
    spec = json.loads((aanlib / "splits.json").read_text())["pairs"]
    pairs = {}
    for pair, info in spec.items():
        chosen = {"train": info["train"][20:21], "validation": info["validation"][3:4]}
        for names in chosen.values():
            for name in names:
                for modality in info["modalities"]:
                    out = root / pair / modality / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with Image.open(aanlib / pair / modality / name) as img:
                        top = (img.height - CROP) // 2
                        left = (img.width - CROP) // 2
                        img.crop((left, top, left + CROP, top + CROP)).save(out)
        pairs[pair] = {"modalities": info["modalities"], **chosen}
    (root / "splits.json").write_text(json.dumps({"pairs": pairs}))
    return root


# ---------------------------------------------------------------- the bundle folder alone
# ``medfusion`` made unimportable in the child (``sys.modules['medfusion'] = None``: any import
# of it raises ImportError), the bundle copied alone to a temporary folder and run from there.
NO_MEDFUSION = ("import runpy, sys; sys.modules['medfusion'] = None; "
                "sys.argv = ['monai.bundle', *sys.argv[1:]]; "
                "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)")


@pytest.fixture(scope="module")
def lone_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sesf bundle folder copied alone (what a user downloads), without caches or runs."""
    return copy_bundle_alone(BUNDLE, tmp_path_factory.mktemp("elsewhere") / "sesf_bundle")


def _run_alone(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", NO_MEDFUSION, "run", *args], cwd=bundle,
                          env=env, capture_output=True, text=True, timeout=300)


def test_bundle_alone_cannot_import_medfusion(lone_bundle: Path) -> None:
    code = NO_MEDFUSION.split("sys.argv")[0] + "import medfusion"
    done = subprocess.run([sys.executable, "-c", code], cwd=lone_bundle, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "import of medfusion halted" in done.stderr
    imports = [line for path in lone_bundle.rglob("*.py") for line in path.read_text().splitlines()
               if line.strip().startswith(("import medfusion", "from medfusion"))]
    assert not imports


def test_bundle_alone_trains_one_epoch_into_the_run_folder(
    lone_bundle: Path, tiny_aanlib: Path, tmp_path: Path
) -> None:
    shipped = lone_bundle / "models" / "model.pt"
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    run_dir = tmp_path / "run"
    done = _run_alone(lone_bundle, "training", "--config_file", "configs/train.json",
                      "--dataset_dir", str(tiny_aanlib), "--run_dir", str(run_dir),
                      "--epochs", "1", "--patch_size", "24", "--batch_size", "3",
                      "--num_threads", "1")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-2000:]
    assert "Epoch[1] Complete" in log and "val_psnr" in log
    saved = torch.load(run_dir / "models" / "model.pt", weights_only=True)
    assert any(key.startswith("encoder.") for key in saved)
    assert any(key.startswith("decoder.") for key in saved)
    assert any((run_dir / "logs").glob("events.out.tfevents*"))
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before  # shipped weights kept


def test_bundle_alone_fuses_as_the_core_does(lone_bundle: Path, aanlib: Path,
                                             tmp_path: Path) -> None:
    """A datalist of a colour PET-MRI pair and three sources, fused by the bundle alone: the
    same 8-bit luminance and decision map as medfusion's sesf (one fusion.py, same loading)."""
    from medfusion.io.images import to_uint8

    pet = _pair_paths(aanlib, ("PET-MRI", ("MRI", "PET"), "25020.png"))
    three = [*_pair_paths(aanlib), pet[1]]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [
        {"sources": list(map(str, pet)), "name": "pet_mri.png"},
        {"sources": list(map(str, three)), "name": "three.png"}]}))
    out = tmp_path / "fused"
    done = _run_alone(lone_bundle, "--config_file", "configs/inference.json",
                      "--datalist", str(datalist), "--output_dir", str(out),
                      "--block_exponent", "1")
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    method = get_method("sesf", device="cpu", block_exponent=1)
    for name, paths in (("pet_mri", pet), ("three", three)):
        core = fuse_images(paths, method=method, device="cpu", decision_map=True)
        written = np.asarray(Image.open(out / f"{name}.png"))
        assert np.array_equal(written, to_uint8(core.luminance))
        assert np.array_equal(np.asarray(Image.open(out / f"{name}_decision.png")),
                              core.decision_map)
    assert set(np.unique(np.asarray(Image.open(out / "three_decision.png")))) <= {1, 2, 3}


BAD_INPUTS = [
    ("no dataset_dir", "no splits.json in dataset_dir"),
    ("one source", "'sources' needs a reference and at least one other file"),
    ("flag as block exponent", "block_exponent must be an integer 0..6, got True"),
    ("second group sizes differ", "sources of bad.png differ in size"),
    ("second group palette", "not PIL mode 'P'"),
    ("unknown pair", "pair type(s) CT-PET not in"),  # was an empty run ending in success
    ("unknown split", "no split 'test' for CT-MRI"),  # was a KeyError traceback
    # raised "from None": the hidden float() error was shown instead
    ("text as a setting", "non-numeric fusion setting"),
    # the second group's decision map overwrote the first group's fused image
    ("name of a decision map", "good_decision.png would be both a fused image"),
    # an all-black second source was fused into an image that looked like a success
    ("second group constant", "odd.png is all zero: there is nothing to fuse"),
]


def _bad_input_options(problem: str, folder: Path, aanlib: Path) -> list[str]:
    """The bundle's options (and the files in ``folder`` they name) for one bad input."""
    pair = list(map(str, _pair_paths(aanlib)))
    datalist = folder / "datalist.json"
    options = ["--datalist", str(datalist)]
    groups = [{"sources": pair, "name": "good.png"}]
    if problem == "no dataset_dir":
        options = ["--dataset_dir", str(folder / "missing")]
    elif problem == "one source":
        groups = [{"sources": pair[:1]}]
    elif problem == "flag as block exponent":
        options += ["--block_exponent", "True"]
    elif problem == "name of a decision map":
        groups = [{"sources": pair, "name": "good_decision.png"},
                  {"sources": pair[::-1], "name": "good.png"}]
    elif problem == "text as a setting":
        options += ["--fusion#sf_radius", "abc"]
    elif problem in ("unknown pair", "unknown split"):
        options = ["--dataset_dir", str(aanlib),
                   *(["--pairs", "['CT-PET']"] if "pair" in problem else ["--split", "test"])]
    else:
        odd = folder / "odd.png"
        with Image.open(pair[1]) as image:
            if "constant" in problem:
                image = Image.new(image.mode, image.size)
            (image.resize((128, 128)) if "sizes" in problem
             else image if "constant" in problem else image.convert("P")).save(odd)
        groups.append({"sources": [pair[0], str(odd)], "name": "bad.png"})
    datalist.write_text(json.dumps({"testing": groups}))
    return options


@pytest.fixture(scope="module")
def bad_input_runs(lone_bundle: Path, aanlib: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, tuple[Outcome, Path]]:
    """Every case of :data:`BAD_INPUTS` run by the bundle alone, the runs started together
    (``run_bad_inputs``): per problem, the finished run and its output folder."""
    return run_bad_inputs(
        [problem for problem, _ in BAD_INPUTS], tmp_path_factory.mktemp,
        lambda problem, folder: _bad_input_options(problem, folder, aanlib),
        functools.partial(_run_alone, lone_bundle, "--config_file", "configs/inference.json"))


@pytest.mark.parametrize("problem, message", BAD_INPUTS)
def test_bundle_alone_bad_input_is_one_line_nothing_written(
    bad_input_runs: dict[str, tuple[Outcome, Path]], problem: str,
    message: str
) -> None:
    """Refused input under ``monai.bundle run`` is one line (the CNN bundle's except hook, one
    shared file), not a 60-line traceback; a later group's bad source leaves no earlier output."""
    done, out = bad_input_runs[problem]
    assert_one_line_bundle_error(done, message, out)


@pytest.mark.parametrize("name", ["one_line_errors.py", "splits.py", "atomic_files.py"])
def test_bundles_share_one_file(name: str) -> None:
    """The sesf bundle's except hook, splits.json reader and atomic writer are the CNN bundle's
    files (links), not copies."""
    shared = BUNDLE / "scripts" / name
    assert shared.is_symlink()
    assert shared.resolve() == (BUNDLE.parent / "monai_bundle" / "scripts" / name).resolve()


def test_shipped_weights_reconstruct_sources(aanlib: Path, sesf) -> None:
    """The shipped auto-encoder reproduces real validation slices (what its features encode)."""
    from medfusion.engine import fuse_images as load  # same luminance the method sees

    sources = load(_pair_paths(aanlib), method="average", device="cpu").sources
    images = torch.from_numpy(sources)[:, None]
    with torch.inference_mode():
        recon = sesf.network(images).clamp(0, 1)
    mse = torch.mean((recon - images) ** 2, dim=(1, 2, 3))
    psnr = 10 * torch.log10(1.0 / mse)
    assert float(psnr.min()) > 30.0
    assert (BUNDLE / "models" / "model.pt").stat().st_size < 2_000_000


def test_fused_real_pair_keeps_both_sources(ct_mri) -> None:
    fused, (mri, ct) = ct_mri.luminance, ct_mri.sources
    assert fused.shape == mri.shape and fused.dtype == np.float32
    assert 0.0 <= fused.min() and fused.max() <= 1.0
    assert _corr(fused, mri) > 0.35 and _corr(fused, ct) > 0.5
    # edges of both sources survive: the fused gradient follows each source's gradient
    grad = _gradient(fused)
    assert _corr(grad, _gradient(mri)) > 0.3
    assert _corr(grad, _gradient(ct)) > 0.5
    # the bright CT bone mostly kept (better than an average, which would halve it)
    bone = ct > 0.8
    assert bone.sum() > 100 and np.mean(fused[bone]) > 0.6 > np.mean((ct + mri)[bone]) / 2


def test_decision_map_values_and_shape(ct_mri, sesf) -> None:
    labels = ct_mri.decision_map
    assert labels.shape == ct_mri.luminance.shape and labels.dtype == np.uint8
    counts = np.bincount(labels.ravel(), minlength=3)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] > 0 and len(counts) == 3
    # consistency verification removed small regions: hardly any pixel lies in one
    from scipy import ndimage

    min_area = sesf.settings["min_region"] * labels.size
    in_small = 0
    for source in (1, 2):
        regions, _ = ndimage.label(labels == source)
        sizes = np.bincount(regions.ravel())
        sizes[0] = labels.size  # background of this label: not a region
        in_small += int((sizes[regions] < min_area).sum())
    assert in_small < 0.005 * labels.size
    # the soft weights are a partition of unity in [0, 1], and they drive the fusion
    batch = torch.from_numpy(ct_mri.sources)[None]
    fused, winners = sesf.fuse_with_decision(batch)
    assert np.array_equal(winners[0].numpy(), labels)
    np.testing.assert_allclose(fused[0].numpy(), ct_mri.luminance, atol=1e-6)


def test_identical_sources_give_the_source(aanlib: Path, sesf) -> None:
    mri = fuse_images(_pair_paths(aanlib), method="average", device="cpu").sources[0]
    batch = torch.from_numpy(np.stack([mri, mri]))[None]
    np.testing.assert_allclose(sesf(batch)[0].numpy(), mri, atol=1e-5)


def test_three_sources(aanlib: Path, sesf) -> None:
    mri, ct = fuse_images(_pair_paths(aanlib), method="average", device="cpu").sources
    pet = fuse_images(_pair_paths(aanlib, ("PET-MRI", ("MRI", "PET"), "25020.png")),
                      method="average", device="cpu").sources[1]
    batch = torch.from_numpy(np.stack([mri, ct, pet]))[None]
    fused, labels = sesf.fuse_with_decision(batch)
    assert fused.shape == (1, *mri.shape) and labels.shape == (1, *mri.shape)
    assert set(np.unique(labels.numpy())) <= {1, 2, 3}
    assert len(np.unique(labels.numpy())) >= 2
    assert 0.0 <= float(fused.min()) and float(fused.max()) <= 1.0
    # the fused pixel is a convex mix of the sources (weights >= 0 summing to one)
    low, high = batch.amin(dim=1), batch.amax(dim=1)
    assert bool(((fused >= low - 1e-4) & (fused <= high + 1e-4)).all())


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 2, 3, 5), (1, 3, 7, 2)])
def test_tiny_slices_do_not_crash(sesf, shape) -> None:
    batch = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    fused, labels = sesf.fuse_with_decision(batch)
    assert fused.shape == (shape[0], *shape[2:]) and labels.shape == fused.shape
    assert torch.isfinite(fused).all()


def test_sesf_bundle_given_to_cnn_is_a_one_line_error() -> None:
    """``--method cnn --bundle sesf_bundle`` loaded (same config keys, strict weights) and then
    failed at the first slice with a 60-line ValueError traceback."""
    with pytest.raises(ModelError, match="does not fuse sources .*is it a cnn bundle") as error:
        get_method("cnn", device="cpu", bundle_dir=BUNDLE)
    assert "\n" not in str(error.value)


def test_missing_bundle_names_the_classical_fallback(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="SESF bundle folder not found.*laplacian"):
        get_method("sesf", bundle_dir=tmp_path / "nowhere")


def test_bundle_config_flag_as_block_exponent_is_refused(tmp_path: Path) -> None:
    """``"block_exponent": true`` in a bundle's config was fused as exponent 1."""
    bundle = copy_bundle_alone(BUNDLE, tmp_path / "sesf_bundle")
    config = bundle / "configs" / "inference.json"
    settings = json.loads(config.read_text())
    settings["block_exponent"] = True
    config.write_text(json.dumps(settings))
    with pytest.raises(InputError, match="block exponent must be an integer 0..6, got True"):
        get_method("sesf", device="cpu", bundle_dir=bundle)


# ---------------------------------------------------------------- block exponent and memory tile
def test_block_exponent_makes_the_decision_on_blocks(aanlib: Path, sesf) -> None:
    assert sesf.block_exponent == 0  # the bundle's default (configs/inference.json)
    sources = fuse_images(_pair_paths(aanlib), method="average", device="cpu").sources
    batch = torch.from_numpy(sources[:, :250, :246].copy())[None]  # partial last blocks
    hard = {}
    for exponent in (0, 2, 4):
        decision = get_method("sesf", block_exponent=exponent).decide(batch)
        labels = decision.hard[0].numpy()
        size = 2**exponent
        padded = np.pad(labels, ((0, -250 % size), (0, -246 % size)), mode="edge")
        blocks = padded.reshape(padded.shape[0] // size, size, padded.shape[1] // size, size)
        assert (blocks == blocks[:, :1, :, :1]).all()  # one label per 2^i x 2^i block
        assert set(np.unique(labels)) == {0, 1}
        hard[exponent] = labels
        fused = decision.fused[0].numpy()
        assert fused.shape == (250, 246) and 0.0 <= fused.min() and fused.max() <= 1.0
    assert np.mean(hard[0] != hard[2]) > 0.01 and np.mean(hard[2] != hard[4]) > 0.01


@pytest.mark.parametrize("bad", [7, -1, 2.5, "x", True, False])
def test_bad_block_exponent_is_a_one_line_error(bad) -> None:
    with pytest.raises(InputError, match="block exponent") as error:
        get_method("sesf", block_exponent=bad)
    assert len(str(error.value).splitlines()) == 1


def test_row_strips_equal_the_whole_slice(aanlib: Path, sesf) -> None:
    """A tall slice with a tiny budget runs the encoder in row strips (halo = its receptive
    field): the same activity, decision and fused slice as the whole slice."""
    mri, ct = fuse_images(_pair_paths(aanlib), method="average", device="cpu").sources
    tall = np.stack([np.concatenate([mri, ct, mri])[:, 96:160],
                     np.concatenate([ct, mri, ct])[:, 96:160]])  # (2, 768, 64)
    batch = torch.from_numpy(np.ascontiguousarray(tall))[None]
    strips = get_method("sesf", memory_budget_mb=2)
    slices, rows = strips.tile(2, 768, 64)
    assert slices == 1 and rows < 768 // 8  # many strips
    assert sesf.tile(2, 768, 64)[1] == 768  # the default budget runs it whole
    images = batch.reshape(2, 1, 768, 64)
    torch.testing.assert_close(strips.energy(images), sesf.energy(images), rtol=1e-5, atol=1e-6)
    whole, tiled = sesf.decide(batch), strips.decide(batch)
    assert torch.equal(whole.hard, tiled.hard) and torch.equal(whole.winners, tiled.winners)
    torch.testing.assert_close(whole.fused, tiled.fused, rtol=0, atol=1e-5)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfusion", "fuse", *args, "--progress", "none"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_saves_decision_map_for_images(aanlib: Path, tmp_path: Path, repo_root) -> None:
    mri, ct = _pair_paths(aanlib)
    fused, labels = tmp_path / "fused.png", tmp_path / "decision.png"
    done = _cli(str(mri), str(ct), "-o", str(fused), "--method", "sesf",
                "--save-decision-map", str(labels), cwd=repo_root)
    assert done.returncode == 0, done.stderr
    decision = np.asarray(Image.open(labels))
    assert decision.shape == np.asarray(Image.open(fused)).shape
    assert set(np.unique(decision)) == {1, 2}


def test_cli_refuses_a_jpeg_decision_map(aanlib: Path, tmp_path: Path, capsys) -> None:
    """Labels 1/2 saved as JPEG came back as 0..3 (lossy), reported as success."""
    from medfusion.cli import main

    mri, ct = _pair_paths(aanlib)
    for name in ("decision.jpg", "decision.JPEG"):
        code = main(["fuse", str(mri), str(ct), "-o", str(tmp_path / "fused.png"), "--method",
                     "sesf", "--save-decision-map", str(tmp_path / name), "--progress", "none"])
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("medfusion: error:")]
        assert code == 1 and len(err) == 1 and f"not {name} (JPEG is lossy" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_cli_block_exponent_applies_to_sesf(aanlib: Path, tmp_path: Path, repo_root) -> None:
    from medfusion.io.images import to_uint8

    fused = tmp_path / "fused.png"
    done = _cli(*map(str, _pair_paths(aanlib)), "-o", str(fused), "--method", "sesf",
                "--block-exponent", "2", cwd=repo_root)
    assert done.returncode == 0, done.stderr
    blocky = get_method("sesf", block_exponent=2)
    expected = fuse_images(_pair_paths(aanlib), method=blocky, device="cpu").luminance
    assert np.array_equal(np.asarray(Image.open(fused)), to_uint8(expected))
    default = fuse_images(_pair_paths(aanlib), method="sesf", device="cpu").luminance
    assert not np.array_equal(to_uint8(default), to_uint8(expected))


def test_cli_refuses_decision_map_of_a_method_without_one(
    aanlib: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from medfusion.cli import main

    mri, ct = _pair_paths(aanlib)
    code = main(["fuse", str(mri), str(ct), "-o", str(tmp_path / "g.png"), "--method", "gff",
                 "--save-decision-map", str(tmp_path / "g_map.png"), "--progress", "none"])
    error = capsys.readouterr().err
    assert code == 1
    assert "makes no decision map" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "g_map.png").exists()


def test_cli_saves_decision_map_volume_on_reference_grid(spm12: Path, tmp_path: Path,
                                                         repo_root) -> None:
    inputs = []
    for name in ("T1", "PET"):
        path = next(spm12.glob(f"{name}.nii*"))
        small = sitk.ReadImage(str(path))[20:60, 30:70, 40:43]  # 3 axial slices
        inputs.append(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(small, str(inputs[-1]))
    fused, labels = tmp_path / "fused.nrrd", tmp_path / "decision.nrrd"
    done = _cli(*map(str, inputs), "-o", str(fused), "--method", "sesf",
                "--save-decision-map", str(labels), cwd=repo_root)
    assert done.returncode == 0, done.stderr
    ref, out, lab = (sitk.ReadImage(str(p)) for p in (inputs[0], fused, labels))
    assert lab.GetPixelID() == sitk.sitkUInt8
    for image in (out, lab):
        assert image.GetSize() == ref.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), ref.GetOrigin())
        np.testing.assert_allclose(image.GetSpacing(), ref.GetSpacing())
        np.testing.assert_allclose(image.GetDirection(), ref.GetDirection())
    assert set(np.unique(sitk.GetArrayViewFromImage(lab))) <= {1, 2}


def test_bundle_metadata_and_network_shapes() -> None:
    from monai.bundle import verify_metadata, verify_net_in_out

    from medfusion.methods.bundle import use_bundle_scripts

    meta, config = BUNDLE / "configs" / "metadata.json", BUNDLE / "configs" / "inference.json"
    verify_metadata(meta_file=str(meta), filepath=str(BUNDLE / "docs" / "metadata_schema.json"))
    use_bundle_scripts(BUNDLE)
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), n=4)


def test_bundle_alone_refuses_image_modes_it_cannot_read(tmp_path: Path) -> None:
    """The standalone loader reads 8-bit grey/RGB; 16-bit, palette and grey+alpha images are a
    one-line error instead of a misread luminance (medfusion's reader converts them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sesf_transforms_alone",
                                                  BUNDLE / "scripts" / "transforms.py")
    transforms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transforms)
    grey = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(transforms.load_luminance(str(tmp_path / "grey.png")),
                          grey.astype(np.float32) / np.float32(255.0))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "alpha.png")
    for name in ("deep.png", "palette.png", "alpha.png"):
        with pytest.raises(ValueError, match="8-bit grey or RGB") as error:
            transforms.load_luminance(str(tmp_path / name))
        assert "\n" not in str(error.value)
