"""How much the CNN re-injects the unselected source's detail (not a test): per pair type, the
mean detail gain ``sigmoid(gain_k)`` and the share of head pixels where it exceeds 0.5, and the
mean selection weight of each source there.

Why: ``FusionNet`` fuses ``F = sum_k w_k x_k + s_k (1 - w_k) d_k``; with ``s = 0`` it is a pure
soft selection between the sources (a learned pixel maximum), whatever ``w`` is. Session 18
found ``s`` at 0.000-0.003 on every pair type for the shipped weights and for every fine-tune
tried (issue 11).

    python Testing/benchmarks/bench_cnn_gain.py [--weights W.pt] [--pairs 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "monai_bundle"))

from bundle_weights import bundle_with_weights  # noqa: E402
from scripts.datalist import build_groups  # noqa: E402
from scripts.transforms import LoadFusionGroupd  # noqa: E402

from medfusion.methods import get_method  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.environ.get("MEDFUSION_DATA", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset_dir", default=os.path.join(data, "aanlib"))
    parser.add_argument("--weights", help="weights file to look at (default: the shipped ones)")
    parser.add_argument("--pairs", type=int, default=8, help="validation pairs per pair type")
    args = parser.parse_args()
    with bundle_with_weights(args.weights) as bundle:
        network = get_method("cnn", bundle_dir=bundle).module
    report(network, args)


def report(network: torch.nn.Module, args: argparse.Namespace) -> None:
    """Run ``network`` on ``args.pairs`` validation pairs per type and print the table."""
    code = sys.modules[type(network).__module__]
    combine, seen = code.combine_sources, {}

    def recording(x, base, logit, gain, max_prior):  # same result, maps kept
        seen.update(x=x, gain=torch.sigmoid(gain),
                    weights=torch.softmax(torch.addcmul(logit, max_prior, x), dim=1))
        return combine(x, base, logit, gain, max_prior)

    code.combine_sources = recording
    load = LoadFusionGroupd()
    rows: dict[str, list[list[float]]] = defaultdict(list)
    for group in build_groups(args.dataset_dir, "validation"):
        if len(rows[group["pair"]]) >= args.pairs:
            continue
        with torch.inference_mode():
            network(load(group)["image"][None].float())
        head = seen["x"][0].amax(dim=0) > 0.05
        gain, weights = seen["gain"][0], seen["weights"][0]
        rows[group["pair"]].append(
            [float(gain[k][head].mean()) for k in range(2)]
            + [float((gain[k][head] > 0.5).float().mean()) for k in range(2)]
            + [float(weights[k][head].mean()) for k in range(2)])
    print(f"weights: {args.weights or 'shipped'}; head pixels (max source > 0.05), "
          f"{args.pairs} validation pairs per type; source 1 is MRI\n")
    print("| pair type | mean s (MRI / other) | share s > 0.5 (MRI / other) |"
          " mean w (MRI / other) |")
    print("|---|---|---|---|")
    for pair, values in sorted(rows.items()):
        v = np.mean(values, axis=0)
        print(f"| {pair} | {v[0]:.3f} / {v[1]:.3f} | {v[2]:.3f} / {v[3]:.3f} | "
              f"{v[4]:.3f} / {v[5]:.3f} |")


if __name__ == "__main__":
    main()
