"""Fresh Python environments for the packaging tests (wheel, Slicer extension, bundle alone).

Each test module makes its own virtual environment with ``python -m venv``, so nothing of this
checkout, of the machine's site-packages or of the editable install of ``medfusion`` is visible
in it. Installing torch into every one would take minutes, so torch (the pinned
``torch==2.13.0``, the CPU build that pip finds here) and numpy are installed once into a
*torch layer* that is reused between test runs, and each fresh environment sees that layer
through one ``.pth`` line, as it would see a torch installed by the user before MedFusion (in
Slicer: by the PyTorch extension); ``python -m pip`` also comes from the layer and installs
into the fresh environment. The layer holds nothing but torch, numpy and their own
dependencies; it is rebuilt when its Python or torch version changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TORCH = "torch==2.13.0"
LAYER_PACKAGES = (TORCH, "numpy")
CACHE = Path(os.environ.get("MEDFUSION_TEST_ENV_CACHE",
                            Path.home() / ".cache" / "medfusion-test-envs"))
# Variables that would let a child interpreter see this checkout or the machine's packages.
_LEAKY = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV",
          "PYTHONSAFEPATH", "PYTHONNOUSERSITE")


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at other packages."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.update(extra)
    return env


@dataclass(frozen=True)
class PythonEnv:
    """A virtual environment: its interpreter and its site-packages folder."""

    root: Path

    @property
    def python(self) -> Path:
        folder = "Scripts" if sys.platform.startswith("win") else "bin"
        return self.root / folder / ("python.exe" if folder == "Scripts" else "python")

    @property
    def site_packages(self) -> Path:
        done = subprocess.run([str(self.python), "-c",
                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, env=clean_environ())
        return Path(done.stdout.strip())

    def run(self, args: list[str], cwd: Path, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``python ARGS`` in this environment from ``cwd``, output captured."""
        return subprocess.run([str(self.python), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=env or clean_environ())

    def pip_install(self, *requirements: str, cwd: Path | None = None) -> None:
        done = self.run(["-m", "pip", "install", "-q", *requirements],
                        cwd=cwd or self.root, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _create(root: Path, with_pip: bool = True) -> PythonEnv:
    options = [] if with_pip else ["--without-pip"]
    subprocess.run([sys.executable, "-m", "venv", *options, str(root)], check=True,
                   env=clean_environ(), capture_output=True, timeout=300)
    return PythonEnv(root)


def _cached(tag: str, build) -> PythonEnv:
    """The cached environment ``tag``, built by ``build(env)`` on first use (atomically)."""
    layer = CACHE / tag
    if (layer / "ready").is_file():
        return PythonEnv(layer)
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=CACHE))
    try:
        build(building)
        (building / "ready").write_text(tag + "\n")
        if layer.exists():  # a half-built layer from an interrupted run
            shutil.rmtree(layer)
        building.rename(layer)  # a venv may move: python -m pip is all that is run in it
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return PythonEnv(layer)


def _python_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def torch_layer() -> PythonEnv:
    """The cached environment with only torch and numpy (and pip, which installs elsewhere)."""
    def build(root: Path) -> None:
        _create(root).pip_install(*LAYER_PACKAGES)

    return _cached(f"{TORCH.replace('==', '-')}-{_python_tag()}", build)


def package_layer(name: str, requirements: Sequence[str]) -> PythonEnv:
    """A cached layer over the torch layer that holds exactly what ``requirements`` bring.

    Keyed by the requirement list, so a changed pin builds a new layer. Tests that check an
    installation itself (the wheel's, the Slicer module's first-use step) still install into
    their fresh environment; a layer only spares re-downloading the same third-party packages.
    """
    key = hashlib.sha256("\n".join([TORCH, *sorted(requirements)]).encode()).hexdigest()[:12]

    def build(root: Path) -> None:
        _link_layers(_create(root, with_pip=False), [torch_layer()]).pip_install(*requirements)

    return _cached(f"{name}-{key}-{_python_tag()}", build)


def _link_layers(env: PythonEnv, layers: Sequence[PythonEnv]) -> PythonEnv:
    lines = "".join(f"{layer.site_packages}\n" for layer in layers)
    (env.site_packages / "_medfusion_test_layers.pth").write_text(lines)
    return env


def fresh_env(root: Path, *requirements: str, layers: Sequence[PythonEnv] = ()) -> PythonEnv:
    """A new venv at ``root`` that sees the torch layer (and ``layers``), then installs
    ``requirements`` into itself. pip, like torch, comes from the torch layer."""
    env = _link_layers(_create(root, with_pip=False), [torch_layer(), *layers])
    if requirements:
        env.pip_install(*requirements)
    return env


def copy_bundle_alone(bundle: Path, target: Path) -> Path:
    """``bundle`` copied alone to ``target`` (what a user downloads), without caches or the
    local ``runs``/``eval``/``logs`` folders; returns ``target``."""
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "eval", "runs", "logs"))
    return target


def assert_cannot_import_medfusion(env: PythonEnv, cwd: Path) -> None:
    """The environment really has no ``medfusion`` (nor this checkout) on its path."""
    done = env.run(["-c", "import importlib.util, sys; "
                          "sys.exit(0 if importlib.util.find_spec('medfusion') is None else 1)"],
                   cwd=cwd, timeout=120)
    assert done.returncode == 0, "medfusion is importable in the fresh environment"


def system_purelib() -> Path:
    """The machine's site-packages (for checks that the fresh environments do not see it)."""
    return Path(sysconfig.get_paths()["purelib"])
