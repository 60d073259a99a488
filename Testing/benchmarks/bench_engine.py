"""Benchmark of the fusion engine: seconds per slice and peak memory (not a test).

Cases: batches of 256x256 and 512x512 slice pairs through each method, and a synthetic
512x512x300 volume pair (int16 reference, float32 other on a shifted grid so it is resampled)
fused end to end with ``fuse_volumes``. Each case runs in a fresh subprocess so its peak RSS
(VmHWM, else ru_maxrss) is its own; ``tracemalloc`` gives the peak of numpy/Python allocations
(SimpleITK and torch CPU buffers are not traced; the RSS covers them).

    python Testing/benchmarks/bench_engine.py                 # all classical methods, CPU (+cuda)
    python Testing/benchmarks/bench_engine.py --methods laplacian cnn --devices cpu
    python Testing/benchmarks/bench_engine.py --depth 60      # smaller volume, quick look
    nice python Testing/benchmarks/bench_engine.py --cli-only --methods laplacian cnn

The last table runs the real command line on the volume pair, ``medfusion fuse ct.nii pet.nii
-o fused.nii --method M [--metrics per_slice.csv]`` (read, resample, fuse, write, and the
per-slice metrics), under ``/usr/bin/time``: wall and CPU seconds and peak RSS against the
memory target 1.5 x (inputs + output) + 300 MB.

The numbers of the ``--cli-only`` run are in the README's Speed table (with this command);
earlier runs in docs/speed_history.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status in MB (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _rss_mb() -> float:
    """Peak resident memory of this process in MB.

    VmHWM, because ru_maxrss survives exec on Linux and would report the parent's peak; falls
    back to ru_maxrss where /proc is missing.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    current = _proc_status_mb("VmRSS")
    return current if current is not None else _rss_mb()


def synthetic_slices(count: int, size: int, sources: int = 2) -> np.ndarray:
    """(count, sources, size, size) float32 in [0, 1] with structure at several scales."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    batch = np.empty((count, sources, size, size), np.float32)
    for i in range(count):
        for k in range(sources):
            f = 3 + 5 * k + i % 4
            batch[i, k] = 0.5 + 0.25 * np.sin(f * 6.28 * x) * np.cos((f + 2) * 6.28 * y)
    batch += rng.normal(0, 0.05, batch.shape).astype(np.float32)
    return np.clip(batch, 0, 1)


def make_volume_pair(folder: Path, depth: int) -> tuple[Path, Path]:
    """A 512x512xdepth int16 'CT' reference and a float32 'PET' on a half-voxel-shifted grid."""
    import SimpleITK as sitk

    z, y, x = np.ogrid[0:depth, 0:512, 0:512]
    head = ((x - 256) ** 2 + (y - 256) ** 2 < 200**2) & (np.abs(z - depth / 2) < depth * 0.45)
    ct = np.where(head, 40, -1000).astype(np.int16)
    ct += (30 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.int16)
    reference = sitk.GetImageFromArray(ct)
    reference.SetSpacing((0.5, 0.5, 1.0))
    del ct
    pet = (head * (1.0 + np.cos(x / 40.0) * np.sin(z / 9.0 + y / 50.0))).astype(np.float32)
    other = sitk.GetImageFromArray(pet)
    del pet, head
    other.SetSpacing((0.5, 0.5, 1.0))
    other.SetOrigin((0.25, 0.25, 0.5))
    ref_path, other_path = folder / "ct.nii", folder / "pet.nii"
    sitk.WriteImage(reference, str(ref_path))
    sitk.WriteImage(other, str(other_path))
    return ref_path, other_path


def run_slices(method_name: str, device: str, size: int, count: int, repeats: int) -> dict:
    """Time ``count`` slices per call of one method; return seconds per slice and memory."""
    import torch

    from medfusion.methods import get_method, resolve_device

    torch_device = resolve_device(device)
    method = get_method(method_name, device=torch_device)
    batch = synthetic_slices(count, size)
    tracemalloc.start()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # first call warms up
            start = time.perf_counter()
            tensor = torch.from_numpy(batch).to(torch_device)
            fused = method(tensor).cpu().numpy()
            if torch_device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fused.shape == (count, size, size)
    result = {"s_per_slice": statistics.median(times[1:]) / count,
              "traced_mb": peak / 2**20, "rss_mb": _rss_mb()}
    if torch_device.type == "cuda":
        result["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_volume(method_name: str, device: str, folder: Path, batch_size: int) -> dict:
    """Read, resample and fuse the synthetic volume pair end to end (not writing)."""
    import SimpleITK as sitk
    import torch  # noqa: F401  (imported before timing: its import is not fusion time)

    from medfusion.engine import fuse_volumes
    from medfusion.io.volumes import read_volume

    reference = read_volume(folder / "ct.nii")
    other = read_volume(folder / "pet.nii")
    input_mb = (sitk.GetArrayViewFromImage(reference).nbytes
                + sitk.GetArrayViewFromImage(other).nbytes) / 2**20
    rss_before = _current_rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    fused = fuse_volumes(reference, [other], method=method_name, device=device,
                         batch_size=batch_size)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    depth = fused.GetSize()[2]
    return {"s_per_slice": elapsed / depth, "total_s": elapsed, "traced_mb": peak / 2**20,
            "rss_mb": _rss_mb(), "rss_before_mb": rss_before, "input_mb": input_mb,
            "output_mb": sitk.GetArrayViewFromImage(fused).nbytes / 2**20, "slices": depth}


def _child(args: argparse.Namespace) -> None:
    if args.case == "volume":
        result = run_volume(args.method, args.device, Path(args.folder), args.batch_size)
    else:
        result = run_slices(args.method, args.device, int(args.case), args.batch_size,
                            args.repeats)
    print(json.dumps(result))


def run_cli_volume(method: str, folder: Path, metrics: bool) -> dict:
    """One ``medfusion fuse`` process on the volume pair under ``/usr/bin/time``."""
    import os

    output = folder / "fused.nii"
    command = ["/usr/bin/time", "-f", "TIME %e %U %S %M", sys.executable, "-m", "medfusion",
               "fuse", str(folder / "ct.nii"), str(folder / "pet.nii"), "-o", str(output),
               "--method", method, "--progress", "none"]
    if metrics:
        command += ["--metrics", str(folder / "per_slice.csv")]
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1:])
    line = [x for x in done.stderr.splitlines() if x.startswith("TIME ")][-1].split()
    wall, user, system, peak_kb = (float(v) for v in line[1:])
    output.unlink(missing_ok=True)
    return {"wall_s": wall, "cpu_s": user + system, "rss_mb": peak_kb / 1024.0}


def cli_table(methods: list[str], folder: Path, depth: int) -> None:
    """Print the end-to-end command-line table for the volume pair in ``folder``."""
    import SimpleITK as sitk

    sizes = [sitk.ReadImage(str(folder / n)) for n in ("ct.nii", "pet.nii")]
    input_mb = sum(sitk.GetArrayViewFromImage(i).nbytes for i in sizes) / 2**20
    output_mb = 4 * sizes[0].GetNumberOfPixels() / 2**20
    del sizes
    limit = 1.5 * (input_mb + output_mb) + 300
    print(f"\n# medfusion fuse, 512x512x{depth} pair end to end (inputs {input_mb:.0f} MB, "
          f"output {output_mb:.0f} MB, RSS target {limit:.0f} MB)")
    header = f"{'method':<11}{'metrics':<9}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for method in methods:
        for metrics in (False, True):
            try:
                r = run_cli_volume(method, folder, metrics)
            except RuntimeError as error:
                print(f"{method:<11}{'yes' if metrics else 'no':<9} failed: {error}")
                continue
            print(f"{method:<11}{'yes' if metrics else 'no':<9}{r['wall_s']:>8.1f}"
                  f"{r['cpu_s']:>8.1f}{r['rss_mb']:>13.0f}", flush=True)


def _available_devices(requested: list[str]) -> list[str]:
    import torch

    devices = [d for d in requested if d == "cpu" or torch.cuda.is_available()]
    return devices or ["cpu"]


def _available_methods(requested: list[str]) -> list[str]:
    from medfusion.errors import ModelError
    from medfusion.methods import get_method

    methods = []
    for name in requested:
        try:
            get_method(name, device="cpu")
            methods.append(name)
        except ModelError as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["average", "max", "laplacian", "cnn"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--depth", type=int, default=300, help="slices of the volume pair")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-volume", action="store_true")
    parser.add_argument("--cli-only", action="store_true",
                        help="only the end-to-end command-line table")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        _child(args)
        return

    import platform

    import torch

    methods = _available_methods(args.methods)
    devices = _available_devices(args.devices)
    print(f"# medfusion engine benchmark: {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    header = (f"{'case':<22}{'method':<11}{'device':<8}{'s/slice':>10}{'traced MB':>11}"
              f"{'RSS MB':>9}  notes")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        cases = [] if args.cli_only else ["256", "512"]
        if not args.skip_volume:
            make_volume_pair(folder, args.depth)
            if not args.cli_only:
                cases.append("volume")
        for case in cases:
            for device in devices:
                for method in methods:
                    command = [sys.executable, __file__, "--case", case, "--method", method,
                               "--device", device, "--folder", str(folder),
                               "--batch-size", str(args.batch_size),
                               "--repeats", str(args.repeats)]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode != 0:
                        print(f"{case:<22}{method:<11}{device:<8} failed: "
                              f"{done.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    name = (f"512x512x{args.depth} pair" if case == "volume"
                            else f"{case}x{case} x{args.batch_size}")
                    notes = ""
                    if case == "volume":
                        notes = (f"total {r['total_s']:.1f} s; inputs {r['input_mb']:.0f} MB, "
                                 f"output {r['output_mb']:.0f} MB, RSS before fusion "
                                 f"{r['rss_before_mb']:.0f} MB")
                    if "gpu_mb" in r:
                        notes += f" GPU peak {r['gpu_mb']:.0f} MB"
                    print(f"{name:<22}{method:<11}{device:<8}{r['s_per_slice']:>10.4f}"
                          f"{r['traced_mb']:>11.0f}{r['rss_mb']:>9.0f}  {notes}", flush=True)
        if not args.skip_volume:
            cli_table(methods, folder, args.depth)


if __name__ == "__main__":
    main()
