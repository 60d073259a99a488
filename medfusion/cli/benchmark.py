"""``medfusion benchmark DATASET -o REPORT_DIR``: the evaluation report in one command.

Fuses every co-registered group of DATASET with every method, scores the full metric set, and
studies the block size, robustness to input disturbances, and speed; writes ``report.md`` with
tables, plots and image panels, plus the raw numbers as CSV/JSON (see :mod:`medfusion.report`).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from medfusion.errors import InputError, OutputError

DEFAULT_PERTURBATIONS = ("gaussian", "rician", "poisson", "blur")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _exponents(text: str) -> tuple[int, ...]:
    try:
        exponents = tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block exponents must be integers: {text!r}") from None
    if any(not 0 <= e <= 6 for e in exponents):
        raise argparse.ArgumentTypeError(f"block exponents must be in 0..6: {text!r}")
    return exponents


def register(subparsers) -> None:
    """Add the ``benchmark`` sub-command."""
    parser = subparsers.add_parser(
        "benchmark",
        help="evaluate fusion methods on a dataset and write a report",
        description="Fuse every co-registered group of DATASET with every method, score the "
        "full metric set, study the block size, the robustness to input disturbances and the "
        "speed, and write REPORT_DIR/report.md with tables, plots and image panels, plus the raw "
        "numbers as CSV/JSON.",
    )
    parser.add_argument(
        "dataset",
        type=Path,
        help="folder <PAIR>/<MODALITY>/<name>.<ext> (optional splits.json), "
        "or a CSV/JSON list of groups",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="REPORT_DIR",
        help="report folder, outside the dataset folder (created in an existing folder; the "
        "report's files in it are replaced, and those an earlier report wrote there that this "
        "one does not are removed; other files stay; a failed run changes nothing there)",
    )
    parser.add_argument("--split", help="use only this split of the split file (e.g. validation)")
    parser.add_argument(
        "--methods",
        type=_names,
        default=None,
        help="comma-separated methods (default: cnn,gff,laplacian,average,max; "
        "max and average are always added; a CNN without weights is "
        "left out with a note unless named here)",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="another MONAI bundle to compare as a CNN method (repeatable); its configs run "
        "Python code ($ expressions): use only trusted folders",
    )
    parser.add_argument(
        "--metrics",
        type=_names,
        default=None,
        help="comma-separated metrics (default: every registered metric)",
    )
    parser.add_argument(
        "--rank-metrics",
        type=_names,
        default=None,
        help="metrics the mean rank is taken over "
        "(default: QABF,VIF,SSIM,MI,FMI,EN,SD,SF, those selected)",
    )
    parser.add_argument(
        "--study-metrics",
        type=_names,
        default=None,
        help="metrics of the block-size and robustness studies (default: QABF,VIF,SSIM,MI)",
    )
    parser.add_argument(
        "--block-exponents",
        type=_exponents,
        default=(0, 1, 2, 3, 4),
        help="CNN block size exponents i to study, blocks of 2^i pixels "
        "(default: 0,1,2,3,4; '' to skip)",
    )
    parser.add_argument(
        "--perturbations",
        nargs="*",
        default=list(DEFAULT_PERTURBATIONS),
        metavar="KIND[:LEVEL...]",
        help="robustness disturbances: gaussian, rician (MRI), poisson "
        "(PET/SPECT), blur, each with optional levels, e.g. blur:1:2 "
        "(default: all four at their default levels; none to skip)",
    )
    parser.add_argument(
        "--max-groups",
        type=int,
        default=None,
        metavar="N",
        help="use a seeded subset of N groups for the quality tables",
    )
    parser.add_argument(
        "--study-groups",
        type=int,
        default=30,
        metavar="N",
        help="groups in the seeded subset for block size, robustness and speed (default: 30)",
    )
    parser.add_argument(
        "--speed-images",
        type=int,
        default=8,
        metavar="N",
        help="images timed per method and device (default: 8; 0: no speed study)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help="processes computing metrics beside the fusion (default: up to 2; 1: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets and noise")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line, every option spelled out (for the report)."""
    parts = ["medfusion", "benchmark", str(args.dataset), "-o", str(args.output)]
    if args.split:
        parts += ["--split", args.split]
    if args.methods:
        parts += ["--methods", ",".join(args.methods)]
    for bundle in args.bundle:
        parts += ["--bundle", str(bundle)]
    if args.metrics:
        parts += ["--metrics", ",".join(args.metrics)]
    if args.rank_metrics:
        parts += ["--rank-metrics", ",".join(args.rank_metrics)]
    if args.study_metrics:
        parts += ["--study-metrics", ",".join(args.study_metrics)]
    parts += ["--block-exponents", ",".join(map(str, args.block_exponents)) or "''"]
    parts += ["--perturbations", *(args.perturbations or ["none"])]
    if args.max_groups:
        parts += ["--max-groups", str(args.max_groups)]
    parts += ["--study-groups", str(args.study_groups), "--speed-images", str(args.speed_images)]
    parts += ["--workers", str(args.workers), "--seed", str(args.seed), "--device", args.device]
    return " ".join(shlex.quote(p) if p != "''" else p for p in parts)


def check_report_folder(output: Path, dataset: Path) -> None:
    """Refuse, before any work, an ``-o`` that is a file, that is or lies inside the dataset
    folder (the report's folders would then be read as modalities of the dataset by the next
    run), or where the report could not be written (the check of every command's outputs:
    an existing folder must be writable, a new one creatable in its existing parent)."""
    from medfusion.io.atomic import check_output_folder

    if output.exists() and not output.is_dir():
        raise OutputError(f"-o must be a folder, but {output} is a file")
    inside = output.resolve()
    if dataset.is_dir() and (inside == dataset.resolve() or dataset.resolve() in inside.parents):
        raise OutputError(f"-o {output} lies inside the dataset folder {dataset}: write the "
                          "report elsewhere")
    check_output_folder(output)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print where the report is."""
    from medfusion.report.perturb import parse_perturbations
    from medfusion.report.runner import DEFAULT_METHODS, BenchmarkConfig, run_benchmark

    for name, value, least in (
        ("--max-groups", args.max_groups, 1),
        ("--study-groups", args.study_groups, 1),
        ("--speed-images", args.speed_images, 0),
        ("--workers", args.workers, 1),
    ):
        if value is not None and value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    if args.methods is not None and not args.methods:
        raise InputError("--methods names no method (give e.g. --methods cnn,max)")
    check_report_folder(Path(args.output), Path(args.dataset))
    tokens = [t for t in args.perturbations if t.lower() != "none"]
    config = BenchmarkConfig(
        dataset=args.dataset,
        output_dir=args.output,
        split=args.split,
        methods=args.methods or DEFAULT_METHODS,
        methods_required=args.methods is not None,
        bundles=tuple(args.bundle),
        metrics=args.metrics,
        rank_metrics=args.rank_metrics,
        study_metrics=args.study_metrics,
        block_exponents=args.block_exponents,
        perturbations=tuple(parse_perturbations(tokens)),
        max_groups=args.max_groups,
        study_groups=args.study_groups,
        speed_images=args.speed_images,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        command=_command(args),
    )
    run_benchmark(config)
    print(Path(args.output) / "report.md")
    return 0
