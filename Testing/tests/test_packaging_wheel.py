"""The wheel, as a pip user gets it: built with ``pip wheel . --no-deps``, installed with its
dependencies into a fresh virtual environment (torch from the pinned CPU build), and run from a
folder outside any checkout: ``medfusion demo``, ``medfusion fuse`` with the default ``cnn``,
``--bundle`` with another bundle folder, and ``medfusion benchmark`` on a user's folder."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from packaging_envs import (
    PythonEnv,
    assert_cannot_import_medfusion,
    clean_environ,
    fresh_env,
    package_layer,
)
from PIL import Image

pytestmark = pytest.mark.slow  # fresh environments and real installs: minutes

REPO = Path(__file__).resolve().parents[2]
PET_MRI = "25015.png"


def core_dependencies() -> list[str]:
    """The third-party dependencies that pyproject.toml declares (torch is in the torch layer)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [d for d in project["dependencies"] if not d.startswith("torch")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q",
                           "-w", str(out)], capture_output=True, text=True, timeout=600,
                          env=clean_environ(), cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("medfusion-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> PythonEnv:
    root = tmp_path_factory.mktemp("wheel-env")
    env = fresh_env(root / "venv", layers=[package_layer("core-deps", core_dependencies())])
    assert_cannot_import_medfusion(env, root)
    env.pip_install(str(wheel))  # resolves the wheel's dependencies, installs medfusion here
    return env


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A working folder that is no checkout (no pyproject.toml, monai_bundle, Resources)."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def medfusion(env: PythonEnv, cwd: Path, *args: str, **environ: str
              ) -> subprocess.CompletedProcess:
    """The installed ``medfusion`` console script of ``env`` (``environ``: extra variables)."""
    script = env.python.parent / "medfusion"
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=clean_environ(**environ))


def test_wheel_carries_the_bundle_and_the_demo_sample(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for bundle_file in ("configs/inference.json", "configs/metadata.json", "configs/train.json",
                        "configs/evaluate.json", "scripts/network.py", "scripts/inference.py",
                        "scripts/colour.py", "models/model.pt", "docs/README.md", "LICENSE"):
        assert f"medfusion/bundle/{bundle_file}" in names, bundle_file
    for bundle_file in ("configs/inference.json", "configs/metadata.json", "scripts/network.py",
                        "scripts/fusion.py", "models/model.pt", "docs/README.md", "LICENSE"):
        assert f"medfusion/sesf_bundle/{bundle_file}" in names, bundle_file
    for shared in ("scripts/one_line_errors.py", "scripts/splits.py",
                   "scripts/atomic_files.py"):  # links to the cnn's files
        content = {zipfile.ZipFile(wheel).read(f"medfusion/{b}/{shared}")
                   for b in ("bundle", "sesf_bundle")}
        assert len(content) == 1 and b"def " in content.pop(), shared
    assert {"medfusion/demo/mri.png", "medfusion/demo/pet.png",
            "medfusion/demo/NOTICE.md"} <= names
    assert not [n for n in names if "__pycache__" in n or "/runs/" in n or "/eval/" in n]
    for name in names:  # what the wheel ships parses on the oldest Python it allows
        if name.endswith(".py"):
            ast.parse(zipfile.ZipFile(wheel).read(name), name, feature_version=(3, 10))


def test_demo_from_any_folder(wheel_env: PythonEnv, outside: Path):
    done = medfusion(wheel_env, outside, "demo", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    out = outside / "medfusion-demo"
    assert {p.name for p in out.iterdir()} == {"fused.png", "panel.png", "metrics.json"}
    info = json.loads((out / "metrics.json").read_text())
    assert "cnn" in json.dumps(info) and "laplacian" not in done.stderr
    fused = np.asarray(Image.open(out / "fused.png"))
    assert fused.ndim == 3 and fused.std() > 10  # PET colour kept


def test_fuse_with_the_default_cnn_equals_the_checkout(wheel_env, outside, aanlib, tmp_path):
    """The wheel's bundle fuses as the checkout's does. One backend for both: `auto` picks
    ONNX Runtime or torch by a timing, and their outputs (within 1e-4, test_backend.py) can
    round to another 8-bit value at a pixel (one pixel of this pair with the 0.3.0 weights)."""
    sources = [str(aanlib / "PET-MRI" / m / PET_MRI) for m in ("MRI", "PET")]
    done = medfusion(wheel_env, outside, "fuse", *sources, "-o", "fused.png", "--device", "cpu",
                     MEDFUSION_BACKEND="torch")
    assert done.returncode == 0, done.stderr[-3000:]
    here = subprocess.run([sys.executable, "-m", "medfusion", "fuse", *sources,
                           "-o", str(tmp_path / "checkout.png"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MEDFUSION_BACKEND": "torch"})
    assert here.returncode == 0, here.stderr
    installed = np.asarray(Image.open(outside / "fused.png")).astype(int)
    assert np.array_equal(installed, np.asarray(Image.open(tmp_path / "checkout.png")).astype(int))


def test_another_bundle_folder(wheel_env: PythonEnv, outside: Path, aanlib: Path):
    located = wheel_env.run(["-c", "from medfusion.resources import bundle_dir; "
                                   "print(bundle_dir())"], cwd=outside)
    shipped = Path(located.stdout.strip())
    assert wheel_env.root in shipped.parents  # the installed copy, not this checkout
    other = outside / "my_bundle"
    shutil.copytree(shipped, other, ignore=shutil.ignore_patterns("__pycache__"))
    sources = [str(aanlib / "PET-MRI" / m / PET_MRI) for m in ("MRI", "PET")]
    done = medfusion(wheel_env, outside, "fuse", *sources, "-o", "other.png",
                     "--bundle", str(other), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    (other / "models" / "model.pt").unlink()  # the option really points at that folder
    done = medfusion(wheel_env, outside, "fuse", *sources, "-o", "none.png",
                     "--bundle", str(other), "--device", "cpu")
    assert done.returncode == 1 and "no trained weights" in done.stderr
    assert str(other) in done.stderr and not (outside / "none.png").exists()


def test_benchmark_on_a_user_folder(wheel_env: PythonEnv, outside: Path, aanlib: Path):
    data = outside / "my_pairs"
    for modality in ("MRI", "PET"):
        (data / "PET-MRI" / modality).mkdir(parents=True)
        for name in ("25015.png", "25038.png"):
            shutil.copy(aanlib / "PET-MRI" / modality / name, data / "PET-MRI" / modality / name)
    done = medfusion(wheel_env, outside, "benchmark", str(data), "-o", "report",
                     "--methods", "cnn,average,max", "--metrics", "QABF,SSIM",
                     "--perturbations", "gaussian:0.05", "--block-exponents", "3",
                     "--speed-images", "0", "--workers", "1", "--no-progress",
                     "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    report = (outside / "report" / "report.md").read_text()
    assert "cnn" in report and "QABF" in report.replace("/", "").upper()
