"""Where the shipped MONAI bundle and demo sample are, in a wheel or in a source checkout.

All are package data of ``medfusion``: ``medfusion/bundle`` (the CNN bundle: configs, scripts,
weights, model card), ``medfusion/sesf_bundle`` (the sesf auto-encoder bundle) and
``medfusion/demo`` (the PET-MRI sample). In the repository these
names are links to the single copies at the top level (``monai_bundle/``, ``sesf_bundle/``,
``Resources/demo/``);
the wheel build copies the files in. Code asks here, never walks up from its own file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

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
