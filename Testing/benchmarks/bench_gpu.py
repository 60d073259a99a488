"""The CNN on a CUDA GPU (not a test): slices per second, agreement with the CPU, a volume.

- the default ``cnn`` method (``medfusion.methods.get_method("cnn", device="cuda")``: the
  bundle's block exponent, its checks and clamp) on batches of 512² slice pairs that are
  already on the GPU, and the bundle's network alone; slices per second from CUDA events
  (median of ``--repeat`` calls after warm-ups);
- the same method fed from pinned host memory and read back, as a volume job streams slices;
- the largest difference between the GPU's and the CPU's fused slices: the method (full
  float32 convolutions, ``medfusion.methods.backend.full_float32_convolutions``) and the
  network alone with cuDNN's TF32 on (torch's default) and off;
- ``--depth N``: a synthetic 512x512xN volume pair (``bench_engine.make_volume_pair``: an int16
  CT and a float32 PET on a half-voxel-shifted grid, so it is resampled), in one process read,
  fused on the GPU and written, each step timed; then ``medfusion fuse --device cuda`` end to
  end (a fresh process: its start, imports and CUDA's initialisation count), wall seconds.

    python Testing/benchmarks/bench_gpu.py [--size 512] [--batches 16,64,256] [--repeat 20]
        [--depth 300]

Without a CUDA GPU it says so and exits with status 0 (nothing to measure). The numbers are in
the README's Speed section with this command.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import make_volume_pair, synthetic_slices  # noqa: E402

from medfusion.methods.backend import full_float32_convolutions  # noqa: E402


def cuda_times(run: Callable[[], object], repeat: int, warmups: int = 3) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``run`` (CUDA events around each)."""
    for _ in range(warmups):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def throughput_table(size: int, batches: list[int], repeat: int) -> None:
    """Slices per second of the method and the network, on the GPU and from the host."""
    from medfusion.methods import get_method

    method = get_method("cnn", device="cuda")
    network = method.module
    print(f"\n# cnn on {torch.cuda.get_device_name(0)}: {size}x{size} slice pairs, float32 "
          f"convolutions in full float32 (not TF32), median of {repeat} calls")
    header = (f"{'slices/call':>12}{'method ms':>11}{'slices/s':>10}{'network ms':>12}"
              f"{'slices/s':>10}{'from host ms':>14}{'slices/s':>10}{'GPU MB':>8}")
    print(header)
    print("-" * len(header))
    for count in batches:
        method_s, network_s, host_s, peak = _measure(method, network, count, size, repeat)
        print(f"{count:>12}{method_s * 1e3:>11.2f}{count / method_s:>10.0f}"
              f"{network_s * 1e3:>12.2f}{count / network_s:>10.0f}{host_s * 1e3:>14.2f}"
              f"{count / host_s:>10.0f}{peak:>8.0f}", flush=True)


def _measure(method: Callable, network: Callable, count: int, size: int, repeat: int
             ) -> tuple[float, float, float, float]:
    """Median seconds per call of the method and the network on ``count`` slices on the GPU,
    of the method from pinned host memory and back, and the peak GPU memory in MB."""
    host = torch.from_numpy(synthetic_slices(count, size)).pin_memory()
    on_gpu = host.to("cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        method_s = statistics.median(cuda_times(lambda: method(on_gpu), repeat))
        with full_float32_convolutions():  # as the method runs it
            network_s = statistics.median(cuda_times(lambda: network(on_gpu), repeat))
        host_s = statistics.median(cuda_times(
            lambda: method(host.to("cuda", non_blocking=True)).cpu(), repeat))
    return method_s, network_s, host_s, torch.cuda.max_memory_allocated() / 2**20


def agreement_table(size: int) -> None:
    """Largest |GPU - CPU| of the fused slices: the method (its convolutions in full float32
    whatever torch's TF32 setting), and the network alone with cuDNN's TF32 on and off."""
    from medfusion.methods import get_method

    batch = torch.from_numpy(synthetic_slices(4, size))
    with torch.inference_mode():
        cpu = get_method("cnn", device="cpu")(batch)
        method = get_method("cnn", device="cuda")
        print(f"\n# GPU against CPU, 4 slices of {size}x{size}: max |difference|")
        as_is = torch.backends.cudnn.allow_tf32
        rows = [("cnn method, torch's TF32 setting as it is", as_is, method),
                ("network alone, cuDNN TF32 on", True, method.module),
                ("network alone, cuDNN TF32 off", False, method.module)]
        for label, tf32, run in rows:
            torch.backends.cudnn.allow_tf32 = tf32
            gpu = run(batch.to("cuda")).reshape(cpu.shape).cpu()
            print(f"{label:<44}{float((gpu - cpu).abs().max()):.2e}")
        torch.backends.cudnn.allow_tf32 = as_is


def volume_table(depth: int, device: str = "cuda") -> None:
    """Read, fuse on ``device`` and write a 512x512x``depth`` pair; then the CLI end to end."""
    from medfusion.engine import fuse_volumes
    from medfusion.io.volumes import read_volume, write_volume

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        ct, pet = make_volume_pair(folder, depth)
        print(f"\n# 512x512x{depth} pair (int16 CT, float32 PET on a shifted grid), cnn on "
              f"{device}")
        steps: dict[str, float] = {}
        for _ in range(2):  # the first round warms CUDA, cuDNN and the page cache
            start = time.perf_counter()
            reference, other = read_volume(ct), read_volume(pet)
            read = time.perf_counter()
            fused = fuse_volumes(reference, [other], method="cnn", device=device)
            done = time.perf_counter()
            write_volume(folder / "fused.nii", fused)
            written = time.perf_counter()
            steps = {"read": read - start, "resample + normalise + fuse": done - read,
                     "write": written - done, "in one process": written - start}
            del reference, other, fused
        for name, seconds in steps.items():
            print(f"{name:<30}{seconds:>8.2f} s")
        command = [sys.executable, "-m", "medfusion", "fuse", str(ct), str(pet), "-o",
                   str(folder / "cli.nii"), "--method", "cnn", "--device", device,
                   "--progress", "none"]
        for metrics in (False, True):
            extra = ["--metrics", str(folder / "metrics.csv")] if metrics else []
            walls = []
            for _ in range(2):
                start = time.perf_counter()
                done = subprocess.run(command + extra, capture_output=True, text=True)
                walls.append(time.perf_counter() - start)
                if done.returncode != 0:
                    print(f"medfusion fuse failed: {done.stderr.strip().splitlines()[-1:]}")
                    return
            label = "medfusion fuse" + (" --metrics" if metrics else "")
            print(f"{label:<30}{min(walls):>8.2f} s (wall, best of 2 processes: "
                  f"{', '.join(f'{w:.2f}' for w in walls)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="16,64,256",
                        help="comma-separated slices per call")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--depth", type=int, default=0,
                        help="slices of a volume pair to fuse end to end (0: none)")
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be whole numbers separated by commas, got {args.batches!r}")
    if args.size < 8 or args.repeat < 1 or not batches or min(batches) < 1 or args.depth < 0:
        parser.error("--size must be at least 8, --repeat and every batch at least 1, "
                     "--depth at least 0")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0)}")
    throughput_table(args.size, batches, args.repeat)
    agreement_table(args.size)
    if args.depth:
        volume_table(args.depth)


if __name__ == "__main__":
    main()
