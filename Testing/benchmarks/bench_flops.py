"""The CNN against this CPU's compute limit (not a test): FLOPs, measured limit, time, ratio.

- limit: a 64 -> 64 channel 3x3 convolution on a 256x256 map (torch, ``--threads`` threads), the
  best FLOP rate this CPU reaches on a convolution;
- the bundle's network on one 512x512 slice pair: FLOPs counted by
  ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs), seconds per backend
  (:mod:`medfusion.methods.backend`), and the ratio of that time to FLOPs / limit;
- the default ``cnn`` method (what ``medfusion fuse`` runs: the bundle's block exponent, the memory
  and cache tiles) on the same slice, with numba loaded as in a volume job (the network's
  full-resolution passes as compiled loops), and the network's torch code alone for comparison
  (FLOPs are those of the path that runs: convolutions and matrix products);
- the network's compiled path in its parts, each timed alone: the block statistics and the
  composition loops (no FLOPs) and the block CNN (all of them), with the floor the two loops
  put under the ratio;
- ``--compare-serial-loops``: the default method with its two full-resolution loops in row
  bands (``cpu_kernels.bands``, as shipped) against the same loops on the calling thread
  alone, interleaved (``--rounds`` rounds, best of ``--repeat`` each): the median ratio;
- ``--compare-fused-layers``: the default method with the block CNN's layers as oneDNN calls
  with fused activations and the head as one stacked product (``cpu_kernels.ONEDNN_LAYERS``,
  as shipped) against torch's layers and per-source products, interleaved: the median ratio;
- ``--batches 1,2,4,8,16``: the network (plain torch) on a stack of 16 such slice pairs in calls
  of that many slices, per slice: what sets ``medfusion.methods.cnn.CPU_PIXELS_PER_CALL`` (the
  cache tile; calls of many large slices run out of this CPU's caches).

Times are the minimum of ``--repeat`` calls after a warm-up (the CPU may be shared: the minimum
is the least disturbed run), wall clock and process CPU time. The default method's ratio is also
measured *interleaved* (``--rounds`` rounds, each timing the limit's convolution and then the
method, best of ``--repeat`` calls each): a host whose speed drifts between the limit's run and
the method's (this VM's limit read 200-380 GFLOP/s from one run to the next) moves both alike, so
the median of the rounds' ratios holds where a ratio of two separate runs does not.

    nice python Testing/benchmarks/bench_flops.py [--threads 2] [--repeat 5] [--size 512]
        [--rounds 9] [--batches 1,2,4,8,16] [--compare-serial-loops] [--compare-fused-layers]
        [--no-malloc-tuning]

The allocator is tuned as the command line tunes it (``medfusion.allocator``) unless
``--no-malloc-tuning``: without it, every large temporary of the network costs fresh pages.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
from timing import best_of, cpu_kernels_of, network_flops

LIMIT_FLOPS = 2 * 64 * 64 * 9 * 256 * 256  # the limit's convolution


def limit_convolution() -> Callable[[], object]:
    """One call of the limit's 64->64 3x3 convolution on (1, 64, 256, 256), float32."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    x = torch.rand(1, 64, 256, 256)

    def run() -> object:
        with torch.inference_mode():
            return conv(x)
    return run


def conv_limit(repeat: int) -> float:
    """FLOP/s of the limit's convolution (best of ``repeat`` calls)."""
    wall, _ = best_of(limit_convolution(), repeat)
    return LIMIT_FLOPS / wall


def interleaved_ratios(method: Callable[[], object], flops: int, rounds: int, repeat: int
                       ) -> list[tuple[float, float, float]]:
    """Per round: the limit (FLOP/s), the method's seconds and their ratio to the ideal time
    ``flops / limit``, the two timed back to back (best of ``repeat`` calls each)."""
    convolution = limit_convolution()
    results = []
    for _ in range(rounds):
        limit = LIMIT_FLOPS / best_of(convolution, repeat)[0]
        wall = best_of(method, repeat)[0]
        results.append((limit, wall, wall / (flops / limit)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9,
                        help="interleaved rounds (limit, default method) for the ratio")
    parser.add_argument("--batches", default="",
                        help="comma-separated slices per network call to compare (e.g. 1,2,8)")
    parser.add_argument("--compare-serial-loops", action="store_true",
                        help="time the default method with its loops in row bands against "
                             "the loops on one thread, interleaved")
    parser.add_argument("--compare-fused-layers", action="store_true",
                        help="time the default method with the block CNN's fused oneDNN "
                             "layers against torch's layers, interleaved")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's allocator as it is (the CLI tunes it)")
    args = parser.parse_args()
    for name in ("threads", "repeat", "size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        from medfusion.allocator import keep_freed_memory

        keep_freed_memory()  # as the command line does (freed temporaries reused, no page faults)

    # loaded as in a volume job or with --metrics: the network then runs its full-resolution
    # passes as compiled loops on calls of any size (scripts/cpu_kernels.py)
    import numba  # noqa: F401

    from medfusion.methods import backend, get_method

    os.environ.pop(backend.BACKEND_ENV, None)
    method = get_method("cnn", device="cpu")
    module = method.module
    batch = torch.rand(1, 2, args.size, args.size)
    limit = conv_limit(args.repeat)
    flops = network_flops(module, batch)
    ideal = flops / limit
    print(f"# CNN vs compute limit: torch {torch.__version__}, {args.threads} threads, "
          f"{args.size}x{args.size} pair, network {type(module).__name__}")
    print(f"measured limit (64->64 3x3 conv): {limit / 1e9:.1f} GFLOP/s")
    print(f"network FLOPs per slice pair: {flops / 1e9:.2f} GFLOP "
          f"(ideal time at the limit {ideal * 1e3:.1f} ms)")
    header = f"{'what':<34}{'wall ms':>9}{'cpu ms':>9}{'GFLOP/s':>9}{'x limit':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in ("torch", "onnxruntime"):
        if name == "onnxruntime" and not backend.onnxruntime_available():
            continue
        runner = backend.accelerate(module, "cpu", backend=name)
        used = runner.prepare(batch)
        with torch.inference_mode():
            rows.append((f"network, backend {used}", *best_of(lambda r=runner: r(batch),
                                                            args.repeat)))
    default = get_method("cnn", device="cpu")
    with torch.inference_mode():  # the backend for calls like the timed ones (their class)
        label = (f"default cnn method ({default.network.prepare(batch)}, "
                 f"i = {default.block_exponent})")
    rows.append((label, *best_of(lambda: default(batch), args.repeat)))
    module.compiled_cpu_kernels = False  # the network's torch code for every pass
    with torch.inference_mode():
        rows.append(("network, torch code only", *best_of(lambda: module(batch), args.repeat)))
    module.compiled_cpu_kernels = True
    for label, wall, cpu in rows:
        print(f"{label:<34}{wall * 1e3:>9.1f}{cpu * 1e3:>9.1f}{flops / wall / 1e9:>9.1f}"
              f"{wall / ideal:>9.1f}")
    rounds = interleaved_ratios(lambda: default(batch), flops, args.rounds, args.repeat)
    ratios = sorted(ratio for _, _, ratio in rounds)
    print(f"\n# default cnn method, interleaved with the limit ({args.rounds} rounds, best of "
          f"{args.repeat} each)")
    limits, walls = [r[0] / 1e9 for r in rounds], [r[1] * 1e3 for r in rounds]
    print(f"limit GFLOP/s {min(limits):.0f}-{max(limits):.0f}, "
          f"method ms {min(walls):.2f}-{max(walls):.2f}")
    print(f"x limit: median {statistics.median(ratios):.2f} "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    parts_table(module, batch, args.repeat, flops, ideal)
    if args.compare_serial_loops:
        serial_loops_table(module, lambda: default(batch), args.rounds, args.repeat)
    if args.compare_fused_layers:
        fused_layers_table(module, lambda: default(batch), args.rounds, args.repeat)
    if args.batches:
        per_call_table(module, args.size, [int(n) for n in args.batches.split(",")],
                       args.repeat, ideal)


def parts_table(module: torch.nn.Module, batch: torch.Tensor, repeat: int, flops: int,
                ideal: float) -> None:
    """The network's compiled path in its three parts, each timed alone: the block statistics
    and the composition (full-resolution loops, no FLOPs counted: every FLOP is the block
    CNN's) bound the ratio from below whatever the block CNN's speed."""
    kernels = cpu_kernels_of(module)
    if kernels is None or batch.shape[1] != 2:
        return
    block, pool = 1 << module.block_exponent, module.base_pool
    b, k = batch.shape[0], batch.shape[1]
    with torch.inference_mode():
        stats, coarse = kernels.block_stats(batch, block, pool)
        maps = module._compiled_block_maps(kernels, stats, b, k)
        parts = [
            ("block statistics (compiled loop)",
             best_of(lambda: kernels.block_stats(batch, block, pool), repeat)[0], 0),
            ("block CNN (oneDNN, last layer compiled)" if kernels.ONEDNN_LAYERS
             else "block CNN (torch, last layer compiled)",
             best_of(lambda: module._compiled_block_maps(kernels, stats, b, k), repeat)[0],
             flops),
            ("composition (compiled loop)", best_of(lambda: kernels.compose_two(
                batch, maps, coarse, module.max_prior, block, pool), repeat)[0], 0),
        ]
    print("\n# the network's compiled path by part (each alone, best of "
          f"{repeat}; the ratio is to the whole network's ideal time)")
    header = f"{'part':<40}{'wall ms':>9}{'GFLOP/s':>9}{'x limit':>9}"
    print(header)
    print("-" * len(header))
    for label, wall, part_flops in parts:
        rate = f"{part_flops / wall / 1e9:>9.1f}" if part_flops else f"{'-':>9}"
        print(f"{label:<40}{wall * 1e3:>9.2f}{rate}{wall / ideal:>9.2f}")
    floor = parts[0][1] + parts[2][1]
    print(f"statistics + composition alone: {floor * 1e3:.2f} ms = {floor / ideal:.2f}x the "
          "ideal time (the ratio's floor with an infinitely fast block CNN)")


def interleaved_time_ratios(method: Callable[[], object], switch: Callable[[bool], None],
                            rounds: int, repeat: int) -> list[float]:
    """Sorted ratios, one per round, of ``method``'s best time with ``switch(True)`` over its best
    time with ``switch(False)``, timed back to back in each round; the switch is left on."""
    ratios = []
    with torch.inference_mode():
        try:
            for _ in range(rounds):
                switch(False)
                without = best_of(method, repeat)[0]
                switch(True)
                ratios.append(best_of(method, repeat)[0] / without)
        finally:
            switch(True)
    return sorted(ratios)


def serial_loops_table(module: torch.nn.Module, method: Callable[[], object], rounds: int,
                       repeat: int) -> None:
    """The method with the network's loops in row bands (as shipped) over its time with them on
    the calling thread alone (``bands`` patched to 1), back to back in each round."""
    kernels = cpu_kernels_of(module)
    if kernels is None:
        return
    shipped = kernels.bands

    def switch(on: bool) -> None:
        kernels.bands = shipped if on else (lambda rows: 1)

    ratios = interleaved_time_ratios(method, switch, rounds, repeat)
    print(f"\n# row bands against serial loops ({rounds} rounds, best of {repeat} each; "
          f"{shipped(512)} bands for 512 rows here): time ratio median "
          f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})")


def fused_layers_table(module: torch.nn.Module, method: Callable[[], object], rounds: int,
                       repeat: int) -> None:
    """The method with the block CNN's layers as oneDNN calls with fused activations and its
    head as one stacked product (``cpu_kernels.ONEDNN_LAYERS``, as shipped where torch has
    them) over its time with torch's layers and the per-source products, back to back in each
    round."""
    kernels = cpu_kernels_of(module)
    if kernels is None or not kernels.ONEDNN_LAYERS:
        print("\n# fused oneDNN layers: not available in this torch")
        return

    def switch(on: bool) -> None:
        kernels.ONEDNN_LAYERS = on

    ratios = interleaved_time_ratios(method, switch, rounds, repeat)
    print(f"\n# fused oneDNN layers against torch's layers ({rounds} rounds, best of {repeat} "
          f"each): time ratio median {statistics.median(ratios):.3f} "
          f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")


def per_call_table(module: torch.nn.Module, size: int, batches: list[int], repeat: int,
                   ideal: float) -> None:
    """The network on 16 slice pairs in calls of ``n`` slices: time per slice for each ``n``."""
    stack = torch.rand(16, 2, size, size)

    def run(per_call: int) -> None:
        for start in range(0, len(stack), per_call):
            module(stack[start : start + per_call])

    print(f"\n# the network (torch) on 16 {size}x{size} pairs, by slices per call")
    header = f"{'slices per call':<16}{'wall ms/slice':>15}{'cpu ms/slice':>14}{'x limit':>9}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for per_call in batches:
            wall, cpu = best_of(lambda n=per_call: run(n), repeat)
            print(f"{per_call:<16}{wall / 16 * 1e3:>15.2f}{cpu / 16 * 1e3:>14.2f}"
                  f"{wall / 16 / ideal:>9.1f}")


if __name__ == "__main__":
    main()
