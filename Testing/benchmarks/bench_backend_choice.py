"""What ``auto`` picks for a volume's slices after a first call of another size (not a test).

Each row is a fresh process: the default ``cnn`` method fuses one first pair of the given size,
then batches of two 512² slices (a volume's calls: the network runs its compiled CPU loops on
them), and the table gives the backend that ran those batches and their best time per 512²
pair, beside the same run with ``MEDFUSION_BACKEND=torch`` and ``=onnxruntime`` forced. Until
session 34 ``auto`` chose once per process, on the first call: a small first image (64²-384²)
then fixed ONNX Runtime for the volume too (6.0 ms per pair on the Intel VM of session 34,
against torch's 1.5-1.8 ms; a first 512² pair kept torch).

    python Testing/benchmarks/bench_backend_choice.py [--sizes 64,128,384,512] [--calls 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from medfusion.methods import get_method
first, calls = int(sys.argv[1]), int(sys.argv[2])
method = get_method("cnn")
generator = torch.Generator().manual_seed(0)
with torch.inference_mode():
    method.network(torch.rand(1, 2, first, first, generator=generator))
    batch = torch.rand(2, 2, 512, 512, generator=generator)
    method.network(batch)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        method.network(batch)
        best = min(best, time.perf_counter() - start)
print(json.dumps({"backend": method.network.backend, "ms_per_pair": best / 2 * 1e3}))
"""


def run(first: int, calls: int, backend: str) -> dict:
    env = dict(os.environ, MEDFUSION_BACKEND=backend)
    done = subprocess.run([sys.executable, "-c", CHILD, str(first), str(calls)], env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,384,512",
                        help="first-call sizes (pixels a side), comma-separated")
    parser.add_argument("--calls", type=int, default=20, help="timed batches per process")
    args = parser.parse_args()
    print("| first call | auto: backend | auto ms / 512² pair | torch ms | onnxruntime ms |")
    print("|---|---|---:|---:|---:|")
    for size in (int(text) for text in args.sizes.split(",")):
        auto, plain, onnx = (run(size, args.calls, name)
                             for name in ("auto", "torch", "onnxruntime"))
        print(f"| {size}² | {auto['backend']} | {auto['ms_per_pair']:.2f} | "
              f"{plain['ms_per_pair']:.2f} | {onnx['ms_per_pair']:.2f} |")


if __name__ == "__main__":
    main()
