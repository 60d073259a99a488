"""The bundle with other weights, for the benchmarks that score a training run's checkpoints."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[2] / "monai_bundle"


@contextmanager
def bundle_with_weights(weights: str | Path | None) -> Iterator[Path]:
    """The shipped bundle folder, or (``weights`` given) a temporary copy of it whose
    ``models/model.pt`` is ``weights`` (a bare state dict or MONAI's ``{"model": ...}``) and
    which holds no ``model.ts``, so only those weights can be loaded; removed on exit."""
    if not weights:
        yield BUNDLE
        return
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "bundle"
        shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "runs", "*.ts"))
        shutil.copy(weights, bundle / "models" / "model.pt")
        yield bundle
