"""Which Python packages MedFusion's fusion needs in Slicer, and how to install them safely.

Slicer's Python is shared by every module, so installing is cautious:

- packages that ship with Slicer (numpy, SimpleITK, pydicom) are never installed, upgraded or
  downgraded here: other modules and Slicer's compiled libraries depend on them; if one is too
  old, the plan says so and asks for a newer Slicer instead;
- every package that is already installed and new enough is frozen at its version through a
  pip constraints file, so installing the missing ones cannot move numpy (or torch) underneath;
- torch comes from the PyTorch extension's installer (``PyTorchUtils``), which picks the build
  that matches the GPU driver; only without that extension is the pinned wheel used;
- missing packages are installed at the exact versions MedFusion was tested with.

The plan lists the steps; the module asks the user once, then :func:`run_installation` runs them
through the pip runner it is given (``slicer.util.pip_install`` in Slicer), reporting progress.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PIP = "pip"
PYTORCH = "pytorch"
SLICER = "slicer"


@dataclass(frozen=True)
class Requirement:
    """One package: pip name, import name, lowest working version, version to install, how."""

    distribution: str
    module: str
    minimum: str
    pin: str | None
    installer: str = PIP

    @property
    def spec(self) -> str:
        """The pip requirement that installs the pinned version."""
        return f"{self.distribution}=={self.pin}"


# What ``python -m medfusion fuse`` imports (see pyproject.toml for the minimums; the pins are the
# versions the project is tested with). Test Testing/tests/test_slicer_dependencies.py keeps this
# in step with pyproject.toml and with what the command really imports.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("numpy", "numpy", "1.24", None, SLICER),
    Requirement("SimpleITK", "SimpleITK", "2.3", None, SLICER),
    Requirement("nibabel", "nibabel", "5", "5.4.2"),
    Requirement("pydicom", "pydicom", "2.4", None, SLICER),
    Requirement("torch", "torch", "2.3", "2.13.0", PYTORCH),
    Requirement("monai", "monai", "1.4", "1.6.1"),
    Requirement("pytorch-ignite", "ignite", "0.4.11", "0.5.5"),
    Requirement("scipy", "scipy", "1.10", "1.17.1"),
    Requirement("numba", "numba", "0.59", "0.68.1"),
    Requirement("pillow", "PIL", "10", "13.0.0"),
    Requirement("PyYAML", "yaml", "6", "6.0.3"),
    Requirement("tqdm", "tqdm", "4.60", "4.70.1"),
    Requirement("onnxruntime", "onnxruntime", "1.17", "1.32.0"),
    Requirement("onnx", "onnx", "1.16", "1.23.2"),
    Requirement("onnxscript", "onnxscript", "0.2", "0.7.2"),
)

# pyproject dependencies that ``medfusion fuse`` does not need (PACS, reports, training).
NOT_NEEDED_FOR_FUSION: frozenset[str] = frozenset(
    {"pynetdicom", "requests", "matplotlib", "tomli", "fire", "tensorboard", "jsonschema"}
)

CORE = Requirement("medfusion", "medfusion", "0.1.0", "0.1.0")


def parse_version(text: str) -> tuple:
    """A comparable key for a version string (``2.13.0+cu121``, ``2.0.0rc1``, ``1.26.4``)."""
    try:
        from packaging.version import Version
    except ImportError:  # pragma: no cover - Slicer always has pip, which vendors packaging
        try:
            from pip._vendor.packaging.version import Version
        except ImportError:
            Version = None  # noqa: N806
    if Version is not None:
        return (Version(text),)
    numbers = re.match(r"\d+(\.\d+)*", text.strip())
    if numbers is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in numbers.group(0).split("."))


def version_at_least(installed: str, minimum: str) -> bool:
    """True when ``installed`` >= ``minimum`` (local labels such as ``+cu121`` ignored)."""
    try:
        return parse_version(installed.split("+")[0]) >= parse_version(minimum)
    except Exception:  # an unparsable version is treated as too old rather than trusted
        return False


def installed_version(requirement: Requirement) -> str | None:
    """The installed version, from package metadata or the module's ``__version__``."""
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # packages built into Slicer (SimpleITK) may have no pip metadata
        module = importlib.import_module(requirement.module)
    except Exception:
        return None
    version = getattr(module, "__version__", None)
    return str(version) if version else None


def installed_versions(requirements: Iterable[Requirement] = REQUIREMENTS) -> dict[str, str | None]:
    """Installed version (or None) per distribution name."""
    return {req.distribution: installed_version(req) for req in requirements}


@dataclass(frozen=True)
class InstallStep:
    """One package to install, why, and through which installer."""

    requirement: Requirement
    installed: str | None
    via: str
    spec: str

    @property
    def reason(self) -> str:
        if self.installed is None:
            return "missing"
        return f"{self.installed} is older than {self.requirement.minimum}"


@dataclass
class InstallPlan:
    """The steps that make Slicer's Python ready for MedFusion, or why it cannot be made so."""

    steps: list[InstallStep] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    core_source: Path | None = None

    @property
    def satisfied(self) -> bool:
        return not self.steps and not self.blocking

    @property
    def torch_step(self) -> InstallStep | None:
        return next((s for s in self.steps if s.via == PYTORCH), None)

    @property
    def pip_steps(self) -> list[InstallStep]:
        return [s for s in self.steps if s.via == PIP and s.requirement.distribution != "medfusion"]

    @property
    def core_step(self) -> InstallStep | None:
        return next((s for s in self.steps if s.requirement.distribution == "medfusion"), None)

    def constraints_text(self) -> str:
        """Contents of the pip constraints file (one ``name==version`` per line)."""
        return "".join(f"{line}\n" for line in self.constraints)

    def pip_commands(self, constraints_file: str | Path) -> list[list[str]]:
        """pip argument lists (after ``python -m pip``), in order: dependencies, then MedFusion.

        MedFusion itself goes in with ``--no-deps``: its dependencies were just installed under
        the constraints, and pip must not resolve them again on its own terms.
        """
        commands = []
        if self.pip_steps:
            commands.append(["install", "-c", str(constraints_file),
                             *(s.spec for s in self.pip_steps)])
        if self.core_step is not None:
            commands.append(["install", "--no-deps", "-c", str(constraints_file),
                             self.core_step.spec])
        return commands

    def describe(self) -> str:
        """A message for the confirmation dialog: what is missing and what will happen."""
        lines = []
        if self.blocking:
            lines.append("MedFusion cannot run in this Slicer:")
            lines += [f"  - {problem}" for problem in self.blocking]
        if self.steps:
            lines.append("MedFusion needs these Python packages in Slicer's Python:")
            for step in self.steps:
                how = " (with the PyTorch extension's installer)" if step.via == PYTORCH else ""
                lines.append(f"  - {step.spec} ({step.reason}){how}")
            frozen = [c for c in self.constraints if c.split("==")[0] in {"numpy", "torch"}]
            if frozen:
                lines.append("Kept as they are: " + ", ".join(frozen) + ".")
            lines.append("Installing may take several minutes; Slicer may not respond meanwhile.")
        return "\n".join(lines)


SHIPPED_CORE = "FuseVolumesCore"


def _is_core_source(folder: Path) -> bool:
    project = folder / "pyproject.toml"
    return (project.is_file() and (folder / "medfusion" / "__init__.py").is_file()
            and re.search(r'^name\s*=\s*"medfusion"', project.read_text(encoding="utf-8"), re.M)
            is not None)


def find_core_source(start: str | Path) -> Path | None:
    """The MedFusion source tree to install the core from, for the module file ``start``.

    An installed extension ships it beside the module (``FuseVolumesCore/``, laid out by the
    module's CMake lists: pyproject.toml, the package, its bundle and demo sample); a developer
    running the module from a checkout gets the checkout above the module file.
    """
    start = Path(start).resolve()
    shipped = (start if start.is_dir() else start.parent) / SHIPPED_CORE
    if _is_core_source(shipped):
        return shipped
    for folder in start.parents:
        if _is_core_source(folder):
            return folder
    return None


def plan_installation(
    installed: Mapping[str, str | None],
    requirements: Sequence[Requirement] = REQUIREMENTS,
    pytorch_installer: bool = False,
    core_installed: str | None = None,
    core_source: Path | None = None,
) -> InstallPlan:
    """Compare installed versions with the requirements and return the installation plan.

    ``installed`` maps distribution names to versions (None: missing), as
    :func:`installed_versions` returns. ``pytorch_installer`` says whether the PyTorch
    extension is there. ``core_installed`` is the installed MedFusion version; when it is missing
    the plan installs it from ``core_source`` (a checkout) or the pinned release.
    """
    plan = InstallPlan(core_source=core_source)
    for req in requirements:
        version = installed.get(req.distribution)
        if version is not None and version_at_least(version, req.minimum):
            plan.constraints.append(f"{req.distribution}=={version}")  # freeze what works
            continue
        if req.installer == SLICER or req.pin is None:
            found = f"version {version}" if version else "not installed"
            plan.blocking.append(
                f"{req.distribution} is {found}, MedFusion needs {req.minimum} or newer; it ships"
                " with Slicer and is never changed by this module: use a newer Slicer."
            )
            continue
        via = PYTORCH if req.installer == PYTORCH and pytorch_installer else PIP
        spec = f"{req.distribution}>={req.minimum}" if via == PYTORCH else req.spec
        plan.steps.append(InstallStep(req, version, via, spec))
    if core_installed is None or not version_at_least(core_installed, CORE.minimum):
        spec = str(core_source) if core_source is not None else CORE.spec
        plan.steps.append(InstallStep(CORE, core_installed, PIP, spec))
    return plan


def run_installation(
    plan: InstallPlan,
    pip: Callable[[list[str]], object],
    progress: Callable[[int, int, str], None] | None = None,
) -> None:
    """Run the plan's pip commands (after torch is there) with ``pip(arguments)``.

    ``pip`` gets the arguments after ``python -m pip`` and raises when pip fails.
    ``progress(step, steps, text)`` is called before each command. The shipped core is copied to
    a temporary folder first: pip builds a source tree in place, and the extension's own folder
    may be read-only (and must stay as installed).
    """
    workdir = Path(tempfile.mkdtemp(prefix="FuseVolumes-install-"))
    try:
        constraints = workdir / "constraints.txt"
        constraints.write_text(plan.constraints_text(), encoding="utf-8")
        core_step = plan.core_step
        staged_core = None
        if core_step is not None and plan.core_source is not None:
            staged_core = workdir / "medfusion-src"
            shutil.copytree(plan.core_source, staged_core,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build",
                                                          "*.egg-info"))
        commands = plan.pip_commands(constraints)
        for index, arguments in enumerate(commands, start=1):
            if staged_core is not None and arguments[-1] == str(plan.core_source):
                arguments = [*arguments[:-1], str(staged_core)]
                text = "Installing the MedFusion core shipped with the extension"
            else:
                names = [a.split("==")[0] for a in arguments[3:]]
                text = "Installing " + ", ".join(names)
            if progress is not None:
                progress(index, len(commands), text)
            pip(arguments)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
