"""Start-up of the command line (not a test): one PNG pair through ``medfusion fuse``, ``cnn``
against ``laplacian``, run interleaved so that both see the same load of a shared machine.

Each round runs ``python -m medfusion fuse Resources/demo/mri.png Resources/demo/pet.png -o
OUT.png --method M --progress none`` once per method, in a fresh process; the table gives the
median wall time and the median CPU time (user + system of the child, what another process takes
from a shared core does not count there) and the cnn/laplacian ratios. ``cnn`` runs with a warm
export cache (the first run of a new network exports it once, timed separately as "cold").

    nice python Testing/benchmarks/bench_startup.py [--rounds 7] [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "Resources" / "demo"


def run_once(method: str, output: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``medfusion fuse`` process."""
    command = [sys.executable, "-m", "medfusion", "fuse", str(DEMO / "mri.png"),
               str(DEMO / "pet.png"), "-o", str(output), "--method", method,
               "--progress", "none"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache run")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "fused.png"
        cold = None
        if not args.no_cold:
            cold_env = {**env, "MEDFUSION_CACHE_DIR": str(Path(folder) / "cache")}
            cold = run_once("cnn", output, cold_env)
        run_once("cnn", output, env)  # warm the user's export cache and the file cache
        times: dict[str, list[tuple[float, float]]] = {"laplacian": [], "cnn": []}
        for _ in range(args.rounds):
            for method in times:
                times[method].append(run_once(method, output, env))
    print(f"# start-up: one 256x256 PNG pair through `medfusion fuse`, {args.rounds} interleaved "
          f"rounds, medians")
    header = f"{'method':<26}{'wall s':>8}{'cpu s':>8}"
    print(header)
    print("-" * len(header))
    medians = {}
    for method, rows in times.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        medians[method] = (wall, cpu)
        print(f"{method:<26}{wall:>8.2f}{cpu:>8.2f}")
    if cold is not None:
        print(f"{'cnn, cold export cache':<26}{cold[0]:>8.2f}{cold[1]:>8.2f}")
    ratio_wall = medians["cnn"][0] / medians["laplacian"][0]
    ratio_cpu = medians["cnn"][1] / medians["laplacian"][1]
    print(f"{'ratio cnn / laplacian':<26}{ratio_wall:>8.2f}{ratio_cpu:>8.2f}")


if __name__ == "__main__":
    main()
