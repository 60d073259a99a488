"""Run the benchmark: methods × groups × metrics, block size, robustness, speed, panels.

Stages (each with a progress bar):

1. quality: every method on every group, the full metric set (CSV per group, mean ± std and
   mean rank per pair type);
2. block size: the CNN methods at each block size on a fixed seeded subset;
3. robustness: every method on perturbed inputs of the subset, scored against clean sources;
4. speed: seconds per image and peak memory per method (each in a fresh process), on CPU
   and on CUDA where available;
5. panels: sources and fusions of one representative group per pair type.

Everything random (subset, noise) derives from ``seed``; the quality, block-size and robustness
numbers are the same on every run with the same seed, data and code (timings are not).
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfusion.errors import InputError, ModelError
from medfusion.report.dataset import Group, discover_groups, select_subset
from medfusion.report.fusion import (
    LoadedGroup,
    MethodSpec,
    build_method,
    fuse,
    load_group,
    metric_axis,
)
from medfusion.report.perturb import (
    DEFAULT_LEVELS,
    KINDS,
    PerturbationSpec,
    applies_to,
    perturb,
    perturbation_rng,
)
from medfusion.report.scoring import Scorer, worker_pool
from medfusion.report.speed import speed_table

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("cnn", "gff", "laplacian", "average", "max")
ALWAYS_METHODS = ("max", "average")
PREFERRED_RANK_METRICS = ("QABF", "VIF", "SSIM", "MI", "FMI", "EN", "SD", "SF")
# Block size and robustness: reference-based and fast (FMI costs ~0.3 CPU-s per 256² image).
DEFAULT_STUDY_METRICS = ("QABF", "VIF", "QSF_MIN", "SSIM", "MI")
DEFAULT_BLOCK_EXPONENTS = (0, 1, 2, 3, 4)
TIMING_SIZE = 512  # the block-size study times the CNN on slices of this size
WORST_PANELS = 3  # panels of the CNN's worst groups by the weaker source's share


@dataclass
class BenchmarkConfig:
    """What to run; the CLI fills it from its arguments."""

    dataset: Path
    output_dir: Path
    split: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    methods_required: bool = False  # True: a method that cannot be built is an error
    bundles: tuple[Path, ...] = ()
    metrics: tuple[str, ...] | None = None  # None: every registered metric
    rank_metrics: tuple[str, ...] | None = None  # None: the preferred ones that exist
    study_metrics: tuple[str, ...] | None = None  # None: DEFAULT_STUDY_METRICS that exist
    block_exponents: tuple[int, ...] = DEFAULT_BLOCK_EXPONENTS
    three_sources: bool = True  # the 3-source case from the SPM12 templates, when found
    perturbations: tuple[PerturbationSpec, ...] = tuple(
        PerturbationSpec(k, DEFAULT_LEVELS[k]) for k in KINDS
    )
    max_groups: int | None = None
    study_groups: int = 30
    speed_images: int = 8  # 0: no speed stage
    workers: int = 2  # processes that compute metrics (1: in the main process)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    command: str = "medfusion benchmark"


@dataclass
class BenchmarkResults:
    """Everything the report shows; :mod:`markdown` renders it, :mod:`files` saves it."""

    command: str
    methods: list[str]
    metrics: list[str]
    directions: dict[str, str]
    rank_metrics: list[str]
    study_metrics: list[str]
    pair_types: dict[str, dict]
    rows: list[dict]
    summary: dict[str, dict[str, dict[str, tuple[float, float, int]]]]
    ranks: dict[str, dict[str, float]]
    study_group_count: int = 0
    block_size: list[dict] = field(default_factory=list)
    block_size_rows: list[dict] = field(default_factory=list)
    block_size_note: str = ""
    robustness: dict[str, list[dict]] = field(default_factory=dict)
    robustness_rows: list[dict] = field(default_factory=list)
    speed: list[dict] = field(default_factory=list)
    panels: list[tuple[str, str]] = field(default_factory=list)
    panel_metric: str = ""
    panel_method: str = ""
    worst_panels: list[tuple[str, str]] = field(default_factory=list)
    three_sources: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def environment_text(self) -> str:
        env = self.environment
        parts = [f"{env.get('cpu_threads')} CPU thread(s)", f"torch {env.get('torch')}"]
        if env.get("gpu"):
            parts.append(f"GPU {env['gpu']}")
        else:
            parts.append("no GPU")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- helpers


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; checked by the methods registry."""
    from medfusion.methods import resolve_device as resolve

    return str(resolve(device))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="fusion",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )


def metric_directions() -> dict[str, str]:
    """``{name: "higher" | "lower" | "none"}`` for every registered metric, in table order."""
    from medfusion.metrics import METRICS

    return {name: spec.direction for name, spec in METRICS.items()}


def metric_descriptions() -> dict[str, str]:
    """``{name: what it measures}`` from the metrics registry."""
    from medfusion.metrics import METRICS

    return {name: spec.description for name, spec in METRICS.items()}


def metric_kinds() -> dict[str, str]:
    """``{name: "image" | "fusion" | "pair"}``: whether a metric looks at the sources."""
    from medfusion.metrics import METRICS

    return {name: spec.kind for name, spec in METRICS.items()}


def _choose_metrics(requested: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """Canonical names of the requested metrics (aliases such as QAB/F accepted), in order."""
    from medfusion.metrics import resolve_name

    if requested is None:
        return list(known)
    chosen = []
    for name in requested:
        canonical = resolve_name(name)  # raises InputError for an unknown name
        if canonical not in known:
            raise InputError(
                f"{what} {name!r} must be one of the selected metrics that have a better "
                f"direction: {', '.join(known)}"
            )
        if canonical not in chosen:
            chosen.append(canonical)
    return chosen


def build_method_specs(config: BenchmarkConfig) -> list[MethodSpec]:
    """Method specs from names and extra bundles; ``max`` and ``average`` always included."""
    names = list(dict.fromkeys(config.methods))
    for name in ALWAYS_METHODS:
        if name not in names:
            names.append(name)
    specs = [MethodSpec(name, name) for name in names]
    for bundle in config.bundles:
        label = f"cnn[{Path(bundle).name or bundle}]"
        specs.append(MethodSpec(label, "cnn", {"bundle_dir": str(bundle)}))
    return specs


def check_methods(
    specs: list[MethodSpec], device: str, required: bool
) -> tuple[list[MethodSpec], list[str]]:
    """Build each method once; leave out a CNN whose bundle cannot load (unless ``required``)."""
    usable, notes = [], []
    for spec in specs:
        try:
            build_method(spec, device)
        except ModelError as error:  # e.g. a bundle without trained weights
            if required:
                raise
            notes.append(f"method `{spec.label}` left out: {error}")
            logger.warning("method %s left out: %s", spec.label, error)
            continue
        usable.append(spec)
    return usable, notes


def summarise(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std, count) over the finite values; NaN mean when there are none."""
    data = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return (math.nan, math.nan, 0)
    std = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return (float(data.mean()), std, int(data.size))


def mean_ranks(
    rows: Sequence[dict], methods: Sequence[str], metrics: Sequence[str], directions: dict
) -> dict[str, float]:
    """Average rank (1 = best, ties averaged) over every (group, metric) all methods scored."""
    from scipy.stats import rankdata

    by_group: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], {})[row["method"]] = row
    totals = dict.fromkeys(methods, 0.0)
    count = 0
    for per_method in by_group.values():
        if any(m not in per_method for m in methods):
            continue
        for metric in metrics:
            values = np.array([per_method[m].get(metric, math.nan) for m in methods], dtype=float)
            if not np.all(np.isfinite(values)):
                continue
            sign = -1.0 if directions.get(metric, "higher") == "higher" else 1.0
            for method, rank in zip(methods, rankdata(sign * values), strict=True):
                totals[method] += float(rank)
            count += 1
    return {m: (totals[m] / count if count else math.nan) for m in methods}


def _timed_fuse(item: LoadedGroup, spec: MethodSpec, device: str):
    start = time.perf_counter()
    fusion = fuse(item, spec, device)
    return fusion, time.perf_counter() - start


class _Stage:
    """Rows of one stage, a progress bar, and a :class:`Scorer` that fills the rows in."""

    def __init__(
        self, total: int, desc: str, metrics: Sequence[str], pool: Executor | None, progress: bool
    ) -> None:
        self.rows: list[dict] = []
        self.bar = _progress(total, desc, progress)
        self.scorer = Scorer(pool, metrics, self._done)

    def _done(self, row: dict, values: dict) -> None:
        row.update(values)
        self.bar.update()

    def add(self, row: dict, item: LoadedGroup, fused: np.ndarray) -> None:
        """Append ``row`` now; its metrics arrive when the score is done."""
        self.rows.append(row)
        self.scorer.submit(row, fused, item.luminances, metric_axis(item))

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.scorer.__exit__(*exc_info)
        finally:
            self.bar.close()


# ----------------------------------------------------------------------------- stages


def quality_stage(
    groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    metrics: Sequence[str],
    device: str,
    pool: Executor | None = None,
    progress: bool = False,
) -> list[dict]:
    """Every method on every group: one row per (group, method) with every metric."""
    with _Stage(len(groups) * len(specs), "quality", metrics, pool, progress) as stage:
        for group in groups:
            item = load_group(group)
            for spec in specs:
                row = {"pair_type": group.pair_type, "group": group.label, "method": spec.label}
                stage.add(row, item, fuse(item, spec, device).luminance)
    return stage.rows


def time_per_slice(
    item: LoadedGroup, spec: MethodSpec, device: str, size: int = TIMING_SIZE, repeats: int = 5
) -> float:
    """Median seconds of the method on the group's sources resized to ``size``² (one slice)."""
    import torch

    method = build_method(spec, device)
    planes = [torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)) for s in item.luminances]
    batch = torch.nn.functional.interpolate(
        torch.stack(planes)[None], size=(size, size), mode="bilinear", align_corners=False
    ).to(device)
    method(batch)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        method(batch)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def block_size_stage(
    groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    block_exponents: Sequence[int],
    metrics: Sequence[str],
    device: str,
    pool: Executor | None = None,
    progress: bool = False,
) -> tuple[list[dict], list[dict]]:
    """CNN methods at each block exponent ``i`` (blocks of ``2^i`` pixels): per-group rows and a
    per-``i`` summary with seconds per image, seconds per 512² slice and the study metrics.

    The fusions of one exponent are timed while no score runs (the queue is drained first),
    so the seconds are not slowed down by the metric workers.
    """
    loaded = [load_group(g) for g in groups]
    summary = []
    total = len(groups) * len(specs) * len(block_exponents)
    with _Stage(total, "block size", metrics, pool, progress) as stage:
        for spec in specs:
            for exponent in block_exponents:
                sized = spec.with_options(block_exponent=int(exponent))
                stage.scorer.drain()
                fuse(loaded[0], sized, device)  # warm-up: the first call pays set-up costs
                timed = [_timed_fuse(item, sized, device) for item in loaded]
                per_slice = time_per_slice(loaded[0], sized, device)
                first = len(stage.rows)
                for item, (fusion, _) in zip(loaded, timed, strict=True):
                    row = {
                        "method": spec.label,
                        "block_exponent": int(exponent),
                        "pair_type": item.group.pair_type,
                        "group": item.group.label,
                    }
                    stage.add(row, item, fusion.luminance)
                summary.append(
                    (spec.label, int(exponent), [t for _, t in timed], per_slice, first)
                )
    entries = []
    for label, exponent, seconds, per_slice, first in summary:
        rows = stage.rows[first : first + len(loaded)]
        entry = {
            "method": label,
            "block_exponent": exponent,
            "block_pixels": 2**exponent,
            "s_per_512_slice": per_slice,
            "s_per_image": float(np.median(seconds)),
            "groups": len(loaded),
        }
        entry.update({m: summarise(r[m] for r in rows)[0] for m in metrics})
        entries.append(entry)
    return stage.rows, entries


def worst_groups(
    groups: Sequence[Group], rows: Sequence[dict], method: str, metric: str, count: int
) -> list[Group]:
    """The ``count`` groups where ``method`` scores lowest on ``metric`` (all pair types)."""
    by_label = {g.label: g for g in groups}
    scored = sorted(
        (r[metric], r["group"])
        for r in rows
        if r["method"] == method and r.get(metric) is not None and math.isfinite(r[metric])
    )
    return [by_label[label] for _, label in scored[:count]]


def _eligible(item: LoadedGroup, kind: str) -> bool:
    return any(applies_to(kind, m) for m in item.group.modalities)


def perturbed_sources(item: LoadedGroup, kind: str, level: float, seed: int) -> list[np.ndarray]:
    """The group's sources with ``kind`` at ``level`` applied to the modalities it fits."""
    return [
        perturb(source, kind, level, perturbation_rng(seed, item.group.label, kind, level, index))
        if applies_to(kind, modality)
        else source
        for index, (source, modality) in enumerate(
            zip(item.sources, item.group.modalities, strict=True)
        )
    ]


def _mean_rows(rows: Sequence[dict], keys: dict, metrics: Sequence[str]) -> dict | None:
    """Average the metric columns of the rows that match every ``keys`` item."""
    chosen = [r for r in rows if all(r[k] == v for k, v in keys.items())]
    if not chosen:
        return None
    return {
        **keys,
        "groups": len(chosen),
        **{m: summarise(r[m] for r in chosen)[0] for m in metrics},
    }


def robustness_stage(
    groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    perturbations: Sequence[PerturbationSpec],
    clean_rows: Sequence[dict],
    metrics: Sequence[str],
    device: str,
    seed: int,
    pool: Executor | None = None,
    progress: bool = False,
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Every method on perturbed inputs, scored against the clean sources.

    Level 0 reuses the clean rows of the quality stage. Returns per-group rows and, per kind,
    the mean of every (level, method).
    """
    loaded = [load_group(g) for g in groups]
    clean = {(r["group"], r["method"]): r for r in clean_rows}
    total = sum(
        len(p.levels) * len(specs) for p in perturbations for i in loaded if _eligible(i, p.kind)
    )
    rows: list[dict] = []
    with _Stage(total, "robustness", metrics, pool, progress) as stage:
        for pert in perturbations:
            eligible = [item for item in loaded if _eligible(item, pert.kind)]
            for level in (0.0, *pert.levels):
                for item in eligible:
                    noisy = perturbed_sources(item, pert.kind, level, seed) if level else None
                    for spec in specs:
                        row = {
                            "kind": pert.kind,
                            "level": float(level),
                            "pair_type": item.group.pair_type,
                            "group": item.group.label,
                            "method": spec.label,
                        }
                        if noisy is None:
                            base = clean[(item.group.label, spec.label)]
                            row.update({m: base[m] for m in metrics})
                            rows.append(row)
                            continue
                        rows.append(row)
                        stage.add(row, item, fuse(item, spec, device, sources=noisy).luminance)
    summary: dict[str, list[dict]] = {}
    for pert in perturbations:
        entries = [
            _mean_rows(
                rows, {"kind": pert.kind, "level": float(level), "method": spec.label}, metrics
            )
            for level in (0.0, *pert.levels)
            for spec in specs
        ]
        if any(entries):
            summary[pert.kind] = [e for e in entries if e]
    return rows, summary


def representative_groups(
    groups: Sequence[Group], rows: Sequence[dict], method: str, metric: str
) -> list[Group]:
    """Per pair type, the group whose ``metric`` under ``method`` is the (lower) median."""
    by_label = {g.label: g for g in groups}
    chosen = []
    for pair_type in sorted({g.pair_type for g in groups}):
        scored = sorted(
            (r[metric], r["group"])
            for r in rows
            if r["pair_type"] == pair_type
            and r["method"] == method
            and r.get(metric) is not None
            and math.isfinite(r[metric])
        )
        if scored:
            chosen.append(by_label[scored[(len(scored) - 1) // 2][1]])
    return chosen


def bundle_fingerprints(specs: Sequence[MethodSpec]) -> dict[str, dict]:
    """Per CNN method: its bundle folder and the SHA-256 and size of the weights it loaded."""
    import hashlib

    cnn_specs = [spec for spec in specs if spec.name == "cnn"]
    if not cnn_specs:
        return {}
    from medfusion.methods.cnn import DEFAULT_BUNDLE, WEIGHTS

    info = {}
    for spec in cnn_specs:
        bundle = Path(spec.options.get("bundle_dir") or DEFAULT_BUNDLE)
        weights = bundle / WEIGHTS
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        info[spec.label] = {
            "bundle": bundle.name,
            "weights": str(WEIGHTS),
            "sha256": digest,
            "bytes": weights.stat().st_size,
        }
    return info


def _environment() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- main entry


@contextmanager
def _timed(results_timings: dict, stage: str, log: Callable[[str], None]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    results_timings[stage] = round(time.perf_counter() - start, 2)
    log(f"{stage}: {results_timings[stage]:.1f} s")


def _select_metrics(config: BenchmarkConfig) -> tuple[dict, list[str], list[str], list[str]]:
    """Directions, the table's metrics, the ranking metrics and the studies' metrics."""
    directions = metric_directions()
    metrics = _choose_metrics(config.metrics, list(directions), "metric")
    ranked = [m for m in metrics if directions[m] in ("higher", "lower")]
    if config.rank_metrics is None:
        rank_metrics = [m for m in PREFERRED_RANK_METRICS if m in ranked] or ranked[:3]
    else:
        rank_metrics = _choose_metrics(config.rank_metrics, ranked, "rank metric")
    if not rank_metrics:
        raise InputError("no metric with a better direction selected; add e.g. QABF, VIF, SSIM")
    if config.study_metrics is None:
        # Noise and blur inflate no-reference metrics (EN, SD, SF): by default the studies use
        # cheap metrics that compare the fusion with its sources.
        kinds = metric_kinds()
        study_metrics = (
            [m for m in DEFAULT_STUDY_METRICS if m in ranked]
            or [m for m in rank_metrics if kinds.get(m) != "image"]
            or rank_metrics
        )
    else:
        study_metrics = _choose_metrics(config.study_metrics, ranked, "study metric")
    return directions, metrics, rank_metrics, study_metrics


def _pair_types(groups: Sequence[Group]) -> dict[str, dict]:
    pair_types: dict[str, dict] = {}
    for group in groups:
        info = pair_types.setdefault(
            group.pair_type, {"groups": 0, "modalities": list(group.modalities), "kind": group.kind}
        )
        info["groups"] += 1
    return pair_types


def _summary(rows: Sequence[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    """``{pair_type: {method: {metric: (mean, std, n)}}}``."""
    pair_types = dict.fromkeys(r["pair_type"] for r in rows)
    return {
        p: {
            s: {
                m: summarise(r[m] for r in rows if r["pair_type"] == p and r["method"] == s)
                for m in metrics
            }
            for s in methods
        }
        for p in pair_types
    }


def _ranks(
    rows: Sequence[dict], methods: Sequence[str], metrics: Sequence[str], directions: dict
) -> dict[str, dict[str, float]]:
    """Mean rank per pair type and over all groups (``"all"``)."""
    pair_types = dict.fromkeys(r["pair_type"] for r in rows)
    ranks = {
        p: mean_ranks([r for r in rows if r["pair_type"] == p], methods, metrics, directions)
        for p in pair_types
    }
    ranks["all"] = mean_ranks(rows, methods, metrics, directions)
    return ranks


def _studies(
    config: BenchmarkConfig,
    results: BenchmarkResults,
    specs: Sequence[MethodSpec],
    subset: Sequence[Group],
    device: str,
    pool: Executor | None,
    log: Callable[[str], None],
) -> None:
    """Block-size and robustness studies on the seeded subset (results filled in place)."""
    cnn_specs = [s for s in specs if s.name == "cnn"]
    if cnn_specs and config.block_exponents:
        with _timed(results.timings, "block size", log):
            results.block_size_rows, results.block_size = block_size_stage(
                subset,
                cnn_specs,
                config.block_exponents,
                results.study_metrics,
                device,
                pool=pool,
                progress=config.progress,
            )
    else:
        results.block_size_note = (
            "no CNN method in this run" if not cnn_specs else "no block exponent"
        )
    if config.perturbations:
        with _timed(results.timings, "robustness", log):
            results.robustness_rows, results.robustness = robustness_stage(
                subset,
                specs,
                config.perturbations,
                results.rows,
                results.study_metrics,
                device,
                config.seed,
                pool=pool,
                progress=config.progress,
            )


def run_benchmark(
    config: BenchmarkConfig, log: Callable[[str], None] = logger.info
) -> BenchmarkResults:
    """Run every stage and write the report folder; return the results."""
    import torch

    from medfusion.report import output

    torch.manual_seed(config.seed)
    groups = discover_groups(config.dataset, split=config.split)
    if config.max_groups:
        groups = select_subset(groups, config.max_groups, config.seed)
    device = resolve_device(config.device)
    directions, metrics, rank_metrics, study_metrics = _select_metrics(config)
    specs, notes = check_methods(build_method_specs(config), device, config.methods_required)
    fingerprints = bundle_fingerprints(specs)
    labels = [s.label for s in specs]
    subset = select_subset(groups, config.study_groups, config.seed)
    log(
        f"{len(groups)} groups, methods {', '.join(labels)}, device {device}, "
        f"studies on {len(subset)} groups"
    )
    timings: dict[str, float] = {}
    pool = worker_pool(config.workers)
    with pool if pool is not None else nullcontext():
        with _timed(timings, "quality", log):
            rows = quality_stage(groups, specs, metrics, device, pool, config.progress)
        results = BenchmarkResults(
            command=config.command,
            methods=labels,
            metrics=metrics,
            directions=directions,
            rank_metrics=rank_metrics,
            study_metrics=study_metrics,
            pair_types=_pair_types(groups),
            rows=rows,
            summary=_summary(rows, labels, metrics),
            ranks=_ranks(rows, labels, rank_metrics, directions),
            study_group_count=len(subset),
            notes=notes,
            environment={**_environment(), "bundles": fingerprints},
            timings=timings,
            descriptions=metric_descriptions(),
        )
        _studies(config, results, specs, subset, device, pool, log)
    if config.speed_images > 0:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        with _timed(timings, "speed", log):
            results.speed = speed_table(
                subset[: config.speed_images], specs, devices, config.progress
            )
    if bundle_fingerprints(specs) != fingerprints:
        message = (
            "CNN weights changed on disk during the run: the numbers mix two models; run again"
        )
        logger.warning(message)
        results.notes.append(message)
    results.panel_method = next((s.label for s in specs if s.name == "cnn"), labels[0])
    results.panel_metric = rank_metrics[0]
    panel_groups = representative_groups(groups, rows, results.panel_method, results.panel_metric)
    worst = []
    if "QSF_MIN" in metrics and any(s.name == "cnn" for s in specs):
        worst = worst_groups(groups, rows, results.panel_method, "QSF_MIN", WORST_PANELS)
    if config.three_sources and any(s.name == "cnn" for s in specs):
        from medfusion.report.three_sources import three_source_case

        with _timed(timings, "three sources", log):
            results.three_sources = three_source_case(config.dataset, specs, device)
    with _timed(timings, "report", log):
        output.write_report(results, config.output_dir, panel_groups, specs, device, worst)
    return results
