"""Metrics on several threads give exactly the single-thread values (compute_metrics' two
groups, volume_metrics' slices), count undefined values the same, and the allocator tuning of
the command line really removes the page faults of large temporaries."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medfusion.metrics as M


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def pair(aanlib: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _grey(aanlib / "CT-MRI" / "CT" / "20005.png")
    b = _grey(aanlib / "CT-MRI" / "MRI" / "20005.png")
    return np.maximum(a, b), a, b


def _same(x: dict, y: dict) -> bool:
    return list(x) == list(y) and all(
        (math.isnan(x[k]) and math.isnan(y[k])) or x[k] == y[k] for k in x)


def test_two_threads_give_the_single_thread_table(pair):
    f, a, b = pair
    assert f.size >= M.table.PARALLEL_PIXELS  # the threaded path really runs
    one = M.compute_metrics(f, [a, b], workers=1)
    two = M.compute_metrics(f, [a, b], workers=2)
    assert _same(one, two)
    target_one = M.compute_metrics(f, [a, b], target=a, workers=1)
    target_two = M.compute_metrics(f, [a, b], target=a, workers=2)
    assert _same(target_one, target_two) and "SSIM_target" in target_two
    picked = M.compute_metrics(f, [a, b], names=["QABF", "FMI", "SSIM"], workers=2)
    assert list(picked) == ["QABF", "FMI", "SSIM"]
    assert all(picked[k] == one[k] for k in picked)


def test_volume_metrics_on_threads_match_one_thread(pair):
    f, a, b = pair
    volumes = [np.stack([np.roll(x, 7 * i, axis=0) for i in range(5)]) for x in (f, a, b)]
    for volume in volumes:
        volume[2] = 0.0  # a blank slice: several metrics undefined there
    results = {}
    for workers in (1, 3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", M.MetricUndefinedWarning)
            rows, aggregate = M.volume_metrics(volumes[0], volumes[1:], workers=workers)
        summary = [str(w.message) for w in caught if issubclass(w.category,
                                                               M.MetricUndefinedWarning)]
        results[workers] = rows, aggregate, summary
    rows_one, aggregate_one, summary_one = results[1]
    rows_three, aggregate_three, summary_three = results[3]
    assert [r["slice"] for r in rows_three] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(_same(x, y) for x, y in zip(rows_one, rows_three, strict=True))
    assert _same(aggregate_one, aggregate_three)
    assert summary_one == summary_three and len(summary_one) == 1
    assert "undefined on some slices" in summary_one[0]


def test_allocator_tuning_removes_page_faults_of_large_temporaries():
    code = (
        "import resource, numpy as np\n"
        "from medfusion.allocator import keep_freed_memory\n"
        "def faults():\n"
        "    x = np.ones((512, 512))\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(50):\n"
        "        y = x * 2.0; z = y + x; del y, z\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "plain = faults()\n"
        "applied = keep_freed_memory()\n"
        "faults()\n"
        "print(plain, applied, faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    plain, applied, tuned = int(out[0]), out[1] == "True", int(out[2])
    if not applied:
        pytest.skip("not glibc: no allocator tuning")
    assert plain > 1000  # 100 fresh 2 MB temporaries: ~512 faults each without tuning
    assert tuned < plain / 20
