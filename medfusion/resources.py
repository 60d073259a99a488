"""Where the shipped MONAI bundle and demo sample are, in a wheel or in a source checkout.

All are package data of ``medfusion``: ``medfusion/bundle`` (the CNN bundle: configs, scripts,
weights, model card), ``medfusion/sesf_bundle`` (the sesf auto-encoder bundle) and
``medfusion/demo`` (the PET-MRI sample). In the repository these
names are links to the single copies at the top level (``monai_bundle/``, ``sesf_bundle/``,
``Resources/demo/``);
the wheel build copies the files in. Code asks here, never walks up from its own file.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType

BUNDLE_RESOURCE = "bundle"
SESF_BUNDLE_RESOURCE = "sesf_bundle"
DEMO_RESOURCE = "demo"


def _package_data(name: str) -> Path:
    """The real path of the package-data folder ``medfusion/<name>`` (links resolved)."""
    return Path(str(resources.files("medfusion") / name)).resolve()


def bundle_dir() -> Path:
    """The shipped CNN bundle folder (``configs/inference.json``, ``models/model.pt``, ...)."""
    return _package_data(BUNDLE_RESOURCE)


def sesf_bundle_dir() -> Path:
    """The shipped bundle of the ``sesf`` method (its auto-encoder; same layout)."""
    return _package_data(SESF_BUNDLE_RESOURCE)


def demo_dir() -> Path:
    """The folder of the demo sample (``mri.png``, ``pet.png``, ``NOTICE.md``)."""
    return _package_data(DEMO_RESOURCE)


def load_bundle_script(folder: Path, relative: str, name: str) -> ModuleType:
    """Import one file of a shipped bundle's ``scripts`` (e.g. the cnn bundle's ``colour.py``)
    as module ``name``, once per process: the core uses the bundle's single copy of code that
    the bundle needs on its own too. The file must import nothing of the bundle or the core."""
    if name in sys.modules:
        return sys.modules[name]
    path = folder / relative
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():  # broken installation
        raise ImportError(f"the shipped bundle has no {relative} ({folder})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
