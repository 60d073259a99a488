"""The Fuse Volumes module's dependency plan: what is missing, what gets installed, and that
numpy (and the other packages Slicer ships) is never downgraded or otherwise changed."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MedFusionExtension" / "FuseVolumes"))

from FuseVolumesLib.dependencies import (  # noqa: E402
    CORE,
    NOT_NEEDED_FOR_FUSION,
    PIP,
    PYTORCH,
    REQUIREMENTS,
    SLICER,
    find_core_source,
    installed_versions,
    plan_installation,
    version_at_least,
)

# What a fresh Slicer 5.8 ships (Python 3.12): numpy, SimpleITK, pydicom; no torch or monai.
SLICER_5_8 = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "pydicom": "2.4.4", "pillow": "10.4.0",
              "scipy": None, "torch": None, "monai": None, "pytorch-ignite": None,
              "PyYAML": None, "tqdm": None}


def _by_name(plan):
    return {step.requirement.distribution: step for step in plan.steps}


def test_fresh_slicer_plan_installs_missing_pins_and_freezes_numpy():
    plan = plan_installation(SLICER_5_8, pytorch_installer=True)
    steps = _by_name(plan)
    assert not plan.blocking and not plan.satisfied
    assert "numpy" not in steps and "SimpleITK" not in steps and "pydicom" not in steps
    assert steps["torch"].via == PYTORCH and steps["torch"].spec == "torch>=2.3"
    assert steps["monai"].spec == "monai==1.6.1" and steps["monai"].via == PIP
    assert steps["medfusion"].spec == "medfusion==0.1.0"
    assert "pillow" not in steps  # 10.4.0 is new enough: kept
    assert "numpy==1.26.4" in plan.constraints and "pillow==10.4.0" in plan.constraints
    commands = plan.pip_commands("/tmp/constraints.txt")
    assert commands[0][:3] == ["install", "-c", "/tmp/constraints.txt"]
    assert not any(arg.startswith(("numpy", "torch")) for arg in commands[0])
    assert commands[-1][:2] == ["install", "--no-deps"] and commands[-1][-1] == "medfusion==0.1.0"
    text = plan.describe()
    assert "numpy==1.26.4" in text and "PyTorch extension" in text


def test_old_numpy_blocks_instead_of_being_changed():
    for old in ("1.21.6", "1.23.5"):
        plan = plan_installation({**SLICER_5_8, "numpy": old})
        assert any(problem.startswith("numpy is version " + old) for problem in plan.blocking)
        assert "numpy" not in _by_name(plan)
        assert not any(c.startswith("numpy") for c in plan.constraints)
        assert all("numpy" not in arg for cmd in plan.pip_commands("c.txt") for arg in cmd)
    missing = plan_installation({**SLICER_5_8, "numpy": None})
    assert "numpy is not installed" in missing.blocking[0]


def test_newer_versions_are_kept_never_downgraded():
    newer = {"numpy": "2.3.1", "SimpleITK": "2.5.7", "pydicom": "3.0.2", "nibabel": "5.4.2",
             "torch": "2.13.0+cu126", "monai": "1.7.0", "pytorch-ignite": "0.5.5",
             "scipy": "1.17.1", "pillow": "12.0.0", "PyYAML": "6.0.3", "tqdm": "4.70.1",
             "onnxruntime": "1.33.0", "onnx": "1.24.0", "onnxscript": "0.8.0", "numba": "0.69.0"}
    plan = plan_installation(newer, core_installed="0.1.0")
    assert plan.satisfied and plan.pip_commands("c.txt") == []
    assert "monai==1.7.0" in plan.constraints  # newer than the pin 1.6.1: frozen, not pinned down
    assert "torch==2.13.0+cu126" in plan.constraints


def test_torch_without_pytorch_extension_uses_the_pinned_wheel():
    plan = plan_installation({**SLICER_5_8, "torch": "2.1.2"}, pytorch_installer=False)
    step = _by_name(plan)["torch"]
    assert step.via == PIP and step.spec == "torch==2.13.0"
    assert step.reason == "2.1.2 is older than 2.3"


def test_core_from_a_checkout_is_installed_from_source():
    source = find_core_source(REPO / "MedFusionExtension" / "FuseVolumes" / "FuseVolumes.py")
    assert source == REPO
    plan = plan_installation(SLICER_5_8, core_source=source)
    assert plan.pip_commands("c.txt")[-1][-1] == str(REPO)
    assert find_core_source(Path("/")) is None


def test_version_comparison_with_real_version_strings():
    assert version_at_least("2.13.0+cpu", "2.3")
    assert version_at_least("2.13.0+cu126", "2.13.0")
    assert not version_at_least("2.0.0rc1", "2.0.0")
    assert version_at_least("1.26.4", "1.24") and not version_at_least("1.23.5", "1.24")
    assert version_at_least("0.5.5", "0.4.11")
    assert not version_at_least("not-a-version", "1.0")


def test_this_environment_is_complete():
    installed = installed_versions()
    assert installed["numpy"] == importlib.metadata.version("numpy")
    plan = plan_installation(installed, core_installed=importlib.metadata.version("medfusion"))
    assert plan.satisfied, plan.describe()
    assert f"numpy=={installed['numpy']}" in plan.constraints


def test_requirements_follow_pyproject():
    """Every pyproject dependency is handled: in REQUIREMENTS with the same minimum, or listed as
    not needed for fusion. Pins are at or above the minimum."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    minimums = {}
    for line in project["dependencies"]:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(>=\s*([\w.]+))?", line)
        minimums[match.group(1).lower()] = match.group(3)
    ours = {req.distribution.lower(): req for req in REQUIREMENTS}
    for name, minimum in minimums.items():
        if name in NOT_NEEDED_FOR_FUSION:
            continue
        assert name in ours, f"pyproject dependency {name} missing from FuseVolumesLib"
        assert ours[name].minimum == minimum, (name, ours[name].minimum, minimum)
    for req in REQUIREMENTS:
        assert req.distribution.lower() in minimums, f"{req.distribution} not in pyproject"
        if req.installer == SLICER:
            assert req.pin is None
        else:
            assert version_at_least(req.pin, req.minimum)
    assert CORE.pin == importlib.metadata.version("medfusion").split("+")[0]


@pytest.mark.slow
def test_requirements_cover_what_fuse_really_imports(tmp_path):
    """Run the real ``medfusion fuse`` and list the third-party packages it imported: each must
    be in REQUIREMENTS (or be a dependency of one of them), or Slicer users would miss it."""
    import numpy as np
    import SimpleITK as sitk

    for name in ("a", "b"):
        array = np.random.default_rng(len(name)).random((3, 48, 48)).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nrrd"))
    code = (
        "import atexit, sys, runpy\n"
        "out = sys.argv[1]\n"
        "atexit.register(lambda: open(out, 'w').write('\\n'.join(sorted(sys.modules))))\n"
        "sys.argv = ['medfusion'] + sys.argv[2:]\n"
        "runpy.run_module('medfusion', run_name='__main__')\n"
    )
    record = tmp_path / "modules.txt"
    done = subprocess.run(
        [sys.executable, "-c", code, str(record), "fuse", str(tmp_path / "a.nrrd"),
         str(tmp_path / "b.nrrd"), "-o", str(tmp_path / "f.nrrd"), "--method", "laplacian",
         "--metrics", str(tmp_path / "m.csv"), "--progress", "json", "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    top = {name.split(".")[0] for name in record.read_text().split()}
    owners = importlib.metadata.packages_distributions()
    imported = {_normal(dist) for module in top for dist in owners.get(module, [])}
    allowed = _closure({req.distribution for req in REQUIREMENTS} | {"medfusion"})
    # numba imports cffi (and with it pycparser) where it happens to be installed, for its cffi
    # support; without them it works the same
    optional = {"cffi", "pycparser"}
    assert sorted(imported - allowed - optional) == []


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: set[str]) -> set[str]:
    """The names and everything they require (no extras), transitively, as pip installs them."""
    seen: set[str] = set()
    todo = [_normal(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requirements:
            if "extra ==" not in line:
                todo.append(_normal(re.match(r"[A-Za-z0-9_.\-]+", line).group(0)))
    return seen
