"""Shared pytest fixtures: where the real data lives, and small helpers.

The real images live in ``../shared/data`` beside the checkout (override with ``MEDFUSION_DATA``).
They are read in place, never copied into the repository. Without them the data tests skip,
unless ``MEDFUSION_REQUIRE_DATA=1`` (set by ``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _data_root() -> Path:
    env = os.environ.get("MEDFUSION_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's top folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``../shared/data``: Harvard atlas pairs, SPM12 and TCGA volumes, GE head CT DICOM."""
    root = _data_root()
    if not (root / "README.md").is_file():
        message = f"shared data not found at {root} (set MEDFUSION_DATA)"
        if os.environ.get("MEDFUSION_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def aanlib(data_root: Path) -> Path:
    """Harvard Whole Brain Atlas pairs: ``aanlib/<PAIR>/<MODALITY>/<name>.png``."""
    return data_root / "aanlib"


@pytest.fixture(scope="session")
def spm12(data_root: Path) -> Path:
    """Co-registered SPM12 templates (T1, T2, PD, EPI, PET, SPECT; SPECT has a flipped x grid)."""
    return data_root / "volumes" / "spm12"


@pytest.fixture(scope="session")
def tcga(data_root: Path) -> Path:
    """Real patient MRI (t1, t1c, t2, flair) on differing grids."""
    return data_root / "volumes" / "tcga-fg-6692"


@pytest.fixture(scope="session")
def ct_dicom_dir(data_root: Path) -> Path:
    """Real GE head CT DICOM series (28 slices, gantry tilt, uneven spacing)."""
    return data_root / "dicom" / "ct-head-ge"


@pytest.fixture
def fresh_logging():
    """Let each ``main()`` call log to this test's stderr (as a real process does), not to a
    stream captured and closed by an earlier test: ``logging.basicConfig`` configures the root
    logger once per process, with the stderr of its time."""
    saved = logging.root.handlers[:]
    logging.root.handlers = []
    yield
    logging.root.handlers = saved
