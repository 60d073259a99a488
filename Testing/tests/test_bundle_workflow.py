"""The MONAI bundle as the model zoo's CI exercises it: train, infer, verify, export.

Training runs for one epoch on a handful of small crops of real atlas pairs written to tmp_path
(same folder layout and splits.json as ``aanlib``), so it takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_errors import Outcome, finished, run_bad_inputs
from PIL import Image

BUNDLE = Path(__file__).resolve().parents[2] / "monai_bundle"
CROP = 48  # pixels: small enough for seconds, large enough for the 4-scale VIF term


def _crop(path: Path) -> Image.Image:
    with Image.open(path) as img:
        h, w = img.height, img.width
        top, left = (h - CROP) // 2, (w - CROP) // 2
        return img.crop((left, top, left + CROP, top + CROP))


@pytest.fixture(scope="module")
def tiny_aanlib(aanlib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-pair copy of the atlas layout (3 train, 3 validation) with 48x48 centre crops."""
    root = tmp_path_factory.mktemp("tiny_aanlib")
    spec = json.loads((aanlib / "splits.json").read_text())["pairs"]
    pairs = {}
    for pair, info in spec.items():
        chosen = {"train": info["train"][10:11], "validation": info["validation"][5:6]}
        for names in chosen.values():
            for name in names:
                for modality in info["modalities"]:
                    out = root / pair / modality / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _crop(aanlib / pair / modality / name).save(out)
        pairs[pair] = {"modalities": info["modalities"], **chosen}
    (root / "splits.json").write_text(json.dumps({"description": "test subset", "pairs": pairs}))
    return root


def _train_overrides(dataset: Path, out: Path) -> dict:
    return {
        "dataset_dir": str(dataset),
        "ckpt_dir": str(out / "models"),
        "output_dir": str(out / "logs"),
        "epochs": 1,
        "val_interval": 1,
        "target_dir": str(out / "targets"),
        "patch_size": 32,
        "patches_per_image": 2,
        "batch_size": 2,
        "num_threads": 1,
    }


@pytest.fixture(autouse=True)
def _bundle_scripts_importable() -> None:
    """The shipped bundle's ``scripts`` package, as ``monai.bundle`` sees it from the bundle."""
    from medfusion.methods.cnn import use_bundle_scripts

    use_bundle_scripts(BUNDLE)


def test_config_workflow_trains_one_epoch(tiny_aanlib: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "train.json"),
        workflow_type="train",
        **_train_overrides(tiny_aanlib, tmp_path),
    )
    workflow.initialize()
    assert not workflow.check_properties()  # bundle_root, device, dataset_dir, network_def, ...
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    workflow.finalize()
    assert trainer.state.epoch == 1
    assert np.isfinite(float(trainer.state.output[0]["loss"]))
    assert 0.0 < evaluator.state.metrics["val_qabf"] < 1.0
    assert evaluator.state.metrics["val_vif"] > 0.0
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert "max_prior" in saved and any(k.startswith("encoder.") for k in saved)
    assert any((tmp_path / "logs").glob("events.out.tfevents*"))
    # supervised: every training group got a fused target, built from the training split only
    index = json.loads((tmp_path / "targets" / "targets.json").read_text())
    assert len(index) == 3 and len(list((tmp_path / "targets").rglob("*.png"))) == 3
    assert all(entry["rule"] in entry["scores"] for entry in index.values())


def test_inference_workflow_with_shipped_weights(tiny_aanlib: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        workflow_type="infer",
        dataset_dir=str(tiny_aanlib),
        output_dir=str(tmp_path / "fused"),
        block_exponent=2,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = sorted((tmp_path / "fused").rglob("*.png"))
    assert len(written) == 3  # one validation pair per pair type
    for path in written:
        pair, name = path.parent.name, path.name
        fused = np.asarray(Image.open(path).convert("L"), dtype=np.float32)  # PET/SPECT: colour
        mri = np.asarray(Image.open(tiny_aanlib / pair / "MRI" / name).convert("L"), np.float32)
        assert fused.shape == mri.shape
        assert fused.std() > 5.0  # real content, not a constant image
        assert np.corrcoef(fused.ravel(), mri.ravel())[0, 1] > 0.3


def test_cli_run_training_one_epoch(tiny_aanlib: Path, tmp_path: Path, repo_root: Path) -> None:
    args = [sys.executable, "-m", "monai.bundle", "run", "training",
            "--config_file", "monai_bundle/configs/train.json"]
    for key, value in _train_overrides(tiny_aanlib, tmp_path).items():
        args += [f"--{key}", str(value)]
    done = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Epoch[1] Complete" in done.stdout + done.stderr
    assert (tmp_path / "models" / "model.pt").is_file()


def test_verify_metadata_offline() -> None:
    from monai.bundle import verify_metadata

    verify_metadata(
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        filepath=str(BUNDLE / "docs" / "metadata_schema.json"),
    )


def test_verify_net_in_out_and_torchscript_export(tmp_path: Path) -> None:
    from monai.bundle import ckpt_export, verify_net_in_out

    meta, config = BUNDLE / "configs" / "metadata.json", BUNDLE / "configs" / "inference.json"
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), n=4)
    exported = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(BUNDLE / "models" / "model.pt"),
        meta_file=str(meta),
        config_file=str(config),
    )
    scripted = torch.jit.load(str(exported))
    x = torch.rand(1, 3, 40, 56)  # three sources, a size the training never saw
    y = scripted(x)
    assert y.shape == (1, 1, 40, 56)
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


REFUSED_DATASETS = [
    (["--pairs", "['CT-PET']"], "pair type(s) CT-PET not in"),  # was an empty run, exit 0
    (["--split", "test"], "no split 'test' for CT-MRI"),  # was a KeyError traceback
    ([], "is not an atlas splits file"),  # (a splits.json without 'pairs') KeyError traceback
]


@pytest.fixture(scope="module")
def refused_dataset_runs(tiny_aanlib: Path, repo_root: Path,
                         tmp_path_factory: pytest.TempPathFactory
                         ) -> dict[str, tuple[Outcome, Path]]:
    """Each case of :data:`REFUSED_DATASETS` through ``monai.bundle run``, the runs started
    together (``run_bad_inputs``): per message, the finished run and its output folder."""
    options = {message: case for case, message in REFUSED_DATASETS}

    def dataset_options(message: str, folder: Path) -> list[str]:
        dataset = tiny_aanlib
        if not options[message]:
            dataset = folder / "atlas"
            dataset.mkdir()
            (dataset / "splits.json").write_text(json.dumps({"groups": {}}))
        return ["--dataset_dir", str(dataset), *options[message]]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                               "monai_bundle/configs/inference.json", *args],
                              cwd=repo_root, capture_output=True, text=True, timeout=300)

    return run_bad_inputs(list(options), tmp_path_factory.mktemp, dataset_options, run)


@pytest.mark.parametrize("options, message", REFUSED_DATASETS)
def test_cli_run_refuses_unknown_pairs_and_splits_in_one_line(
    refused_dataset_runs: dict[str, tuple[Outcome, Path]],
    options: list[str], message: str
) -> None:
    outcome, out = refused_dataset_runs[message]
    done = finished(outcome)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("medfusion bundle: error: "), done.stderr
    assert message in errors[0]
    assert not out.exists()
