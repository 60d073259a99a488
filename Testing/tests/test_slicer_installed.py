"""The Slicer extension as the Extensions Manager installs it (Slicer itself cannot run here).

The module is laid out exactly as its CMake lists install it, copying only the files they name,
into a folder with Slicer's install layout. A fresh virtual environment stands in for
PythonSlicer: no checkout on any path, only what Slicer's Python brings (numpy, SimpleITK,
pydicom) and torch as the PyTorch extension would install it. The module's own first-use
dependency step then installs the core from what the extension ships and the rest from the
package index, and its background runner fuses a real volume pair with the default ``cnn``.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from packaging_envs import PythonEnv, assert_cannot_import_medfusion, fresh_env, package_layer
from test_slicer_module import _cmake_records

REPO = Path(__file__).resolve().parents[2]
SLICER_PYTHON = (3, 12)  # Slicer 5.10 and later; the extension's minimum (see CMakeLists.txt)
SLICER_OWN = ("numpy", "SimpleITK", "pydicom")
PREFIX = "Slicer-5.10"


def lay_out_module(records, prefix: Path) -> Path:
    """Copy the files the CMake lists install, where they install them; return the module dir."""
    modules = prefix / "lib" / "Slicer" / "qt-scripted-modules"
    for key, folder, value in records:
        if key in ("SCRIPT", "RESOURCE"):
            target = modules / value
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / value, target)
        elif key == "INSTALL":
            destination, source = value.split("|", 1)
            target = prefix / destination / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return modules


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("installed")
    records = _cmake_records(root)
    return lay_out_module(records, root / PREFIX)


def test_installed_files_are_the_module_core_and_bundle(installed: Path):
    core = installed / "FuseVolumesCore"
    assert (installed / "FuseVolumes.py").is_file()
    assert (installed / "FuseVolumesLib" / "runner.py").is_file()
    assert (core / "pyproject.toml").is_file() and (core / "medfusion" / "engine.py").is_file()
    for bundle_file in ("configs/inference.json", "models/model.pt", "scripts/network.py",
                        "scripts/colour.py", "docs/README.md"):
        assert (core / "medfusion" / "bundle" / bundle_file).is_file(), bundle_file
    for bundle_file in ("configs/inference.json", "models/model.pt", "scripts/network.py",
                        "scripts/fusion.py"):
        assert (core / "medfusion" / "sesf_bundle" / bundle_file).is_file(), bundle_file
    assert (core / "medfusion" / "demo" / "mri.png").is_file()
    assert not any(p.is_symlink() for p in installed.rglob("*"))
    # every Python file shipped parses on the Python of the Slicer releases supported
    shipped = sorted(installed.rglob("*.py"))
    assert len(shipped) > 60
    for path in shipped:
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=SLICER_PYTHON)


def test_catalog_entry_matches_the_cmake_metadata(tmp_path: Path):
    entry = json.loads((REPO / "MedFusionExtension" / "MedFusionExtension.json").read_text())
    meta = dict(v.split("=", 1) for k, _, v in _cmake_records(tmp_path) if k == "META")
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["build_subdirectory"] == "."
    assert entry["scm_url"] == ""  # no public repository yet: filled in when there is one


@pytest.fixture(scope="module")
def slicer_python(tmp_path_factory: pytest.TempPathFactory) -> PythonEnv:
    """A PythonSlicer stand-in: Slicer's own packages and torch, nothing of MedFusion."""
    root = tmp_path_factory.mktemp("slicer-python")
    env = fresh_env(root / "venv", layers=[package_layer("slicer-own", ["SimpleITK", "pydicom"])])
    assert_cannot_import_medfusion(env, root)
    return env


VERSIONS = f"""
import importlib.metadata, json
print(json.dumps({{n: importlib.metadata.version(n) for n in {SLICER_OWN!r}}}))
"""

DEPENDENCY_STEP = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from FuseVolumesLib.dependencies import (CORE, REQUIREMENTS, find_core_source, installed_version,
    installed_versions, plan_installation, run_installation)

def plan():
    return plan_installation(installed_versions(REQUIREMENTS), pytorch_installer=False,
                             core_installed=installed_version(CORE),
                             core_source=find_core_source(sys.argv[1] + "/FuseVolumes.py"))

first = plan()
progress = []
def pip(arguments):
    subprocess.run([sys.executable, "-m", "pip", *arguments, "-q"], check=True)
run_installation(first, pip, lambda step, steps, text: progress.append([step, steps, text]))
print(json.dumps({"steps": [s.spec for s in first.steps], "blocking": first.blocking,
                  "core_source": str(first.core_source), "progress": progress,
                  "satisfied_after": plan().satisfied}))
"""

RUNNER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from FuseVolumesLib import FuseRequest, FusionProcess
out = Path(sys.argv[4])
request = FuseRequest(reference=Path(sys.argv[2]), others=[Path(sys.argv[3])],
                      output=out / "fused.nrrd", metrics=out / "metrics.csv", device="cpu")
process = FusionProcess(request)
process.start()
events = []
result = process.wait(timeout=900, on_event=lambda e: events.append(e.kind))
print(json.dumps({"status": result.status, "message": result.message, "command": process.command,
                  "progress_events": events.count("progress"), "stderr": result.stderr[-20:]}))
"""


def _json(done) -> dict:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _slab(path: Path, out: Path) -> Path:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:, :, 36:44], str(out))
    return out


@pytest.mark.slow
def test_first_use_installs_then_the_runner_fuses_with_cnn(installed, slicer_python, spm12,
                                                           tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    before = _json(slicer_python.run(["-c", VERSIONS], cwd=work))

    step = _json(slicer_python.run(["-c", DEPENDENCY_STEP, str(installed)], cwd=work,
                                   timeout=1200))
    assert not step["blocking"]
    assert step["core_source"] == str(installed / "FuseVolumesCore")
    assert str(installed / "FuseVolumesCore") in step["steps"]  # the core: from the extension
    assert not any(s.split("==")[0] in ("torch", *SLICER_OWN) for s in step["steps"])
    assert [p[:2] for p in step["progress"]] == [[1, 2], [2, 2]]
    assert step["satisfied_after"]
    assert _json(slicer_python.run(["-c", VERSIONS], cwd=work)) == before  # Slicer's, untouched
    assert not list((installed / "FuseVolumesCore").glob("*.egg-info"))  # shipped tree as is

    located = slicer_python.run(["-c", "import medfusion.resources as r; print(r.bundle_dir())"],
                                cwd=work)
    assert located.returncode == 0, located.stderr
    assert slicer_python.root in Path(located.stdout.strip()).parents

    reference = _slab(spm12 / "T1.nii", work / "t1.nrrd")
    other = _slab(spm12 / "PET.nii", work / "pet.nrrd")
    out = work / "scene"
    out.mkdir()
    run = _json(slicer_python.run(["-c", RUNNER, str(installed), str(reference), str(other),
                                   str(out)], cwd=work, timeout=1200))
    assert run["status"] == "succeeded", run
    assert "--method" in run["command"] and run["command"][run["command"].index("--method") + 1] \
        == "cnn"
    assert run["progress_events"] >= 1
    fused, ref = sitk.ReadImage(str(out / "fused.nrrd")), sitk.ReadImage(str(reference))
    assert fused.GetSize() == ref.GetSize()
    np.testing.assert_allclose(fused.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(fused.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(fused.GetDirection(), ref.GetDirection(), atol=1e-6)
    voxels = sitk.GetArrayFromImage(fused)
    assert voxels.dtype == np.float32 and voxels.min() >= 0.0 and voxels.max() <= 1.0
    assert voxels.std() > 0.05
    assert (out / "metrics.csv").read_text().count("\n") >= 2


def test_module_source_mentions_the_supported_slicer():
    source = (REPO / "MedFusionExtension" / "FuseVolumes" / "FuseVolumes.py").read_text()
    assert "Slicer 5.10" in source
