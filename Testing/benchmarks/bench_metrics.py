"""Time every metric on one real 256x256 CT-MRI pair (max fusion), and the naive reference
implementations of the expensive ones beside the fast versions.

Run: ``python Testing/benchmarks/bench_metrics.py [--repeat N] [--naive-crop 64] [--no-naive]
[--size 512] [--slices 16]``. ``--size 512`` upsamples the pair bilinearly (a 512x512 slice pair
with the atlas' flat background; the naive versions are then skipped). The last table times
``volume_metrics`` on ``--slices`` such slices (shifted copies) with 1 thread and with the
default threads (all CPUs of the process), and ``compute_metrics`` of all metrics with 1 and 2
threads.
The naive FMI (a per-window Python loop, as fmi.m) is timed on a crop and scaled to 256x256
by the window count; the other naive versions run on the full image.

Times are the minimum over ``--repeat`` calls (the CPU is shared: the minimum is the least
disturbed run), as wall clock and as this process's CPU time (``time.process_time``; what
other processes take from a shared core does not count there). The last lines give the
minor page faults of one full table: fresh NumPy temporaries are fresh pages from the OS
(glibc trims freed heap), which costs ~1-2 us each on this VM; ``MALLOC_TOP_PAD_=67108864``
(or ``MALLOC_TRIM_THRESHOLD_`` + ``MALLOC_MMAP_THRESHOLD_``) in the environment removes them.

The whole table's time is in the README's Speed table (with this command); per metric and
volume slices, and earlier runs: docs/metrics.md, Speed.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Testing" / "tests"))

from test_metrics_reference import (  # noqa: E402
    naive_fmi,
    naive_piella,
    naive_qabf,
    naive_qncie,
    naive_vifp,
)
from timing import best_of  # noqa: E402

import medfusion.metrics as M  # noqa: E402


def _load(data: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    ct = np.asarray(Image.open(data / "CT-MRI" / "CT" / "20005.png").convert("L"), float)
    mri = np.asarray(Image.open(data / "CT-MRI" / "MRI" / "20005.png").convert("L"), float)
    return ct, mri


def _faults(func) -> int:
    """Minor page faults of one call."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    func()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "aanlib")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--naive-crop", type=int, default=64)
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's allocator as it is (the CLI tunes it)")
    args = parser.parse_args()
    if not args.no_malloc_tuning:
        from medfusion.allocator import keep_freed_memory

        keep_freed_memory()  # as the command line does
    a, b = _load(args.data)
    if args.size != a.shape[0]:
        from scipy.ndimage import zoom

        factor = args.size / a.shape[0]
        a, b = (np.clip(zoom(x, factor, order=1), 0, 255) for x in (a, b))
        args.no_naive = True
    f = np.maximum(a, b)
    print(f"# metrics of one {a.shape[0]}x{a.shape[1]} CT-MRI pair (max fusion), "
          f"minimum of {args.repeat} runs, allocator tuning "
          f"{'off' if args.no_malloc_tuning else 'on'}")

    naive = {
        "QABF": lambda: naive_qabf(a, b, f),
        "VIF": lambda: naive_vifp(a, f) + naive_vifp(b, f),
        "QNCIE": lambda: naive_qncie(a, b, f),
        "Q0": lambda: naive_piella(a, b, f, 1),
        "QW": lambda: naive_piella(a, b, f, 2),
        "QE": lambda: naive_piella(a, b, f, 3),
    }
    print(f"{'metric':8} {'wall ms':>9} {'cpu ms':>8} {'naive ms':>10} {'speed-up':>9}")
    total = total_cpu = 0.0
    for name in M.available_metrics():
        seconds, cpu = best_of(lambda n=name: M.compute_metrics(f, [a, b], names=[n], workers=1),
                             args.repeat)
        total += seconds
        total_cpu += cpu
        naive_ms = ""
        ratio = ""
        if not args.no_naive and (name in naive or name == "FMI"):
            if name == "FMI":
                c = args.naive_crop
                crop = (slice(96, 96 + c), slice(96, 96 + c))
                t = best_of(lambda crop=crop: naive_fmi(a[crop], b[crop], f[crop]), 1)[0]
                t *= (256 - 2) ** 2 / (c - 2) ** 2
            else:
                t = best_of(naive[name], 1)[0]
            naive_ms = f"{t * 1e3:10.0f}"
            ratio = f"{t / seconds:8.0f}x"
        print(f"{name:8} {seconds * 1e3:9.2f} {cpu * 1e3:8.2f} {naive_ms:>10} {ratio:>9}")
    print(f"sum of single-metric calls: {total * 1e3:.1f} ms wall, {total_cpu * 1e3:.1f} ms cpu")
    for workers in (1, 2):
        wall, cpu = best_of(lambda w=workers: M.compute_metrics(f, [a, b], workers=w),
                          args.repeat)
        faults = _faults(lambda w=workers: M.compute_metrics(f, [a, b], workers=w))
        print(f"compute_metrics(all {len(M.available_metrics())}), {workers} thread(s): "
              f"{wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms cpu, {faults} page faults")
    wall, cpu = best_of(lambda: M.compute_metrics(f, [a, b], target=a), args.repeat)
    print(f"... with a target (6 more values): {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms cpu")

    volume = [np.stack([np.roll(x, i, axis=1) for i in range(args.slices)]) for x in (f, a, b)]
    default = M.table.default_workers()
    print(f"volume_metrics of {args.slices} slices of {a.shape[0]}x{a.shape[1]}:")
    for workers in sorted({1, default}):
        wall, cpu = best_of(lambda w=workers: M.volume_metrics(volume[0], volume[1:], workers=w),
                          max(1, args.repeat // 3))
        print(f"  {workers} thread(s): {wall / args.slices * 1e3:.1f} ms wall per slice, "
              f"{cpu / args.slices * 1e3:.1f} ms cpu per slice")


if __name__ == "__main__":
    main()
