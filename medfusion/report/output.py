"""Write a report folder: raw numbers (CSV/JSON), figures, image panels and ``report.md``.

Layout::

    REPORT_DIR/report.md
    REPORT_DIR/metrics.csv        one row per (group, method): every metric
    REPORT_DIR/summary.csv        mean, std, n per (pair type, method, metric)
    REPORT_DIR/ranks.csv          mean rank per (pair type, method)
    REPORT_DIR/block_size.csv     per (method, block exponent i): s per 512² slice, quality
    REPORT_DIR/block_size_groups.csv  per (method, i, group): study metrics
    REPORT_DIR/robustness.csv     per (kind, level, group, method): study metrics
    REPORT_DIR/speed.csv          per (method, device): s/image, peak MiB
    REPORT_DIR/results.json       all summaries, the configuration and the environment
    REPORT_DIR/figures/*.png
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medfusion.errors import OutputError
from medfusion.report import figures, markdown
from medfusion.report.dataset import Group
from medfusion.report.files import replacing_report, write_csv, write_json, write_text
from medfusion.report.fusion import MethodSpec, fuse, load_group, middle_slice
from medfusion.report.perturb import LEVEL_UNITS

if TYPE_CHECKING:
    from medfusion.report.runner import BenchmarkResults

FIGURES = "figures"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _write_tables(results: BenchmarkResults, folder: Path) -> None:
    metrics, study = results.metrics, results.study_metrics
    write_csv(folder / "metrics.csv", results.rows, ["pair_type", "group", "method", *metrics])
    results.files["metrics.csv"] = "every metric for every group and method"
    summary_rows = [
        {
            "pair_type": p,
            "method": s,
            "metric": m,
            "mean": v[0],
            "std": v[1],
            "n": v[2],
            "direction": results.directions.get(m, "higher"),
        }
        for p, per_method in results.summary.items()
        for s, per_metric in per_method.items()
        for m, v in per_metric.items()
    ]
    write_csv(
        folder / "summary.csv",
        summary_rows,
        ["pair_type", "method", "metric", "mean", "std", "n", "direction"],
    )
    results.files["summary.csv"] = "mean, sample std and count per pair type, method and metric"
    rank_rows = [
        {"pair_type": p, "method": m, "mean_rank": r}
        for p, per in results.ranks.items()
        for m, r in per.items()
    ]
    write_csv(folder / "ranks.csv", rank_rows, ["pair_type", "method", "mean_rank"])
    results.files["ranks.csv"] = f"mean rank over {', '.join(results.rank_metrics)}"
    if results.block_size:
        write_csv(
            folder / "block_size.csv",
            results.block_size,
            ["method", "block_exponent", "block_pixels", "s_per_512_slice", "s_per_image",
             "groups", *study],
        )
        results.files["block_size.csv"] = (
            "block-size study: per block exponent i, seconds per 512² slice and per image, "
            "mean quality")
    if results.block_size_rows:
        write_csv(
            folder / "block_size_groups.csv",
            results.block_size_rows,
            ["method", "block_exponent", "pair_type", "group", *study],
        )
        results.files["block_size_groups.csv"] = "block-size study, per group"
    if results.three_sources:
        case = results.three_sources
        write_csv(folder / "three_sources.csv", case["rows"],
                  ["slice", "method", *case["metrics"]])
        results.files["three_sources.csv"] = "3-source case (SPM12 T1 + PET + SPECT), per slice"
    if results.robustness_rows:
        write_csv(
            folder / "robustness.csv",
            results.robustness_rows,
            ["kind", "level", "pair_type", "group", "method", *study],
        )
        results.files["robustness.csv"] = "robustness study, per group (vs clean sources)"
    write_csv(
        folder / "speed.csv",
        results.speed,
        ["method", "device", "s_per_image", "peak_memory_mib", "process_peak_mib", "images"],
    )
    results.files["speed.csv"] = "seconds per image and peak memory per method and device"
    results.files["results.json"] = "all summaries, the command and the environment"


def _write_json(results: BenchmarkResults, folder: Path) -> None:
    write_json(
        folder / "results.json",
        {
            "command": results.command,
            "methods": results.methods,
            "metrics": {m: results.directions.get(m, "higher") for m in results.metrics},
            "rank_metrics": results.rank_metrics,
            "pair_types": results.pair_types,
            "summary": {
                p: {
                    s: {m: {"mean": v[0], "std": v[1], "n": v[2]} for m, v in pm.items()}
                    for s, pm in per.items()
                }
                for p, per in results.summary.items()
            },
            "mean_rank": results.ranks,
            "block_size": results.block_size,
            "three_sources": (results.three_sources or {}).get("summary", {}),
            "robustness": results.robustness,
            "speed": results.speed,
            "study_groups": results.study_group_count,
            "notes": results.notes,
            "environment": results.environment,
            "timings_s": results.timings,
        },
    )


def _write_figures(results: BenchmarkResults, folder: Path) -> None:
    colours = figures.method_colours(results.methods)
    fig_dir = folder / FIGURES
    figures.metric_bars(
        {
            p: {s: {m: v[:2] for m, v in pm.items()} for s, pm in per.items()}
            for p, per in results.summary.items()
        },
        results.methods,
        results.metrics,
        fig_dir / "metrics.png",
        titles={
            m: f"{m} {markdown.ARROWS.get(results.directions.get(m, ''), '')}".strip()
            for m in results.metrics
        },
    )
    results.figures["metrics"] = f"{FIGURES}/metrics.png"
    if results.block_size:
        sizes = sorted({r["block_exponent"] for r in results.block_size})
        series = {}
        keys = ["s_per_512_slice", *results.study_metrics]
        for method in dict.fromkeys(r["method"] for r in results.block_size):
            by_size = {
                r["block_exponent"]: r for r in results.block_size if r["method"] == method
            }
            series[method] = {k: [by_size[s][k] for s in sizes] for k in keys}
        figures.curves(
            sizes,
            series,
            keys,
            fig_dir / "block_size.png",
            xlabel="block exponent i (blocks of 2^i x 2^i pixels)",
            title="CNN quality and time vs block exponent i",
            titles={"s_per_512_slice": "seconds per 512² slice"},
            log_x=False,
            colours=colours,
        )
        results.figures["block_size"] = f"{FIGURES}/block_size.png"
    results.figures["robustness"] = {}
    for kind, entries in results.robustness.items():
        levels = sorted({e["level"] for e in entries})
        series = {}
        for method in results.methods:
            by_level = {e["level"]: e for e in entries if e["method"] == method}
            if by_level:
                series[method] = {
                    m: [by_level[v][m] if v in by_level else float("nan") for v in levels]
                    for m in results.study_metrics
                }
        name = f"robustness_{_safe(kind)}.png"
        figures.curves(
            levels,
            series,
            results.study_metrics,
            fig_dir / name,
            xlabel=f"{kind}: {LEVEL_UNITS.get(kind, 'level')}",
            title=f"{kind}: quality vs disturbance level",
            colours=colours,
        )
        results.figures["robustness"][kind] = f"{FIGURES}/{name}"
    panel = results.three_sources.get("panel") if results.three_sources else None
    if panel:
        figures.image_panel(panel["sources"], panel["fused"], fig_dir / "three_sources.png",
                            title="SPM12 T1 + PET + SPECT, axial slice 45")
        results.three_sources["figure"] = f"{FIGURES}/three_sources.png"
    if results.speed:
        figures.speed_bars(results.speed, fig_dir / "speed.png", colours=colours)
        results.figures["speed"] = f"{FIGURES}/speed.png"


def _write_panels(
    results: BenchmarkResults,
    folder: Path,
    groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    device: str,
) -> None:
    for group in groups:
        loaded = load_group(group)
        sources = dict(zip(group.modalities, loaded.sources, strict=True))
        fused = {spec.label: fuse(loaded, spec, device).display for spec in specs}
        if group.kind == "volume":
            sources = {k: middle_slice(loaded, v) for k, v in sources.items()}
            fused = {k: middle_slice(loaded, v) for k, v in fused.items()}
        name = f"panel_{_safe(group.label)}.png"
        figures.image_panel(sources, fused, folder / FIGURES / name, title=group.label)
        results.panels.append((group.label, f"{FIGURES}/{name}"))


def _write_worst_panels(
    results: BenchmarkResults,
    folder: Path,
    groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    device: str,
) -> None:
    """Panels of the CNN's worst groups by weaker-source share, zoomed where the weaker-kept
    source loses the most edge strength under the CNN."""
    from medfusion.report.zoom import worst_edge_window

    for group in groups:
        loaded = load_group(group)
        sources = dict(zip(group.modalities, loaded.sources, strict=True))
        fusions = {spec.label: fuse(loaded, spec, device) for spec in specs}
        cnn = fusions[results.panel_method].luminance
        zoom = worst_edge_window(cnn, loaded.luminances)
        name = f"worst_{_safe(group.label)}.png"
        figures.image_panel(
            sources, {k: v.display for k, v in fusions.items()}, folder / FIGURES / name,
            title=f"{group.label} (zoom: where the weaker source loses most edges)", zoom=zoom,
        )
        results.worst_panels.append((group.label, f"{FIGURES}/{name}"))


def write_report(
    results: BenchmarkResults,
    folder: Path,
    panel_groups: Sequence[Group],
    specs: Sequence[MethodSpec],
    device: str,
    worst_groups: Sequence[Group] = (),
) -> Path:
    """Write every file of the report folder; return the path of ``report.md``.

    The files are written into a temporary folder and moved into ``folder`` together at the
    end (:func:`medfusion.report.files.replacing_report`): a failure (full disk, ...) leaves no
    part of the new report, and an earlier report in ``folder`` as it was. ``folder``'s parent
    must exist. Raises :class:`OutputError` (one line) when a file cannot be written."""
    folder = Path(folder)
    try:
        with replacing_report(folder) as staging:
            _write_tables(results, staging)
            _write_json(results, staging)
            _write_figures(results, staging)
            _write_panels(results, staging, panel_groups, specs, device)
            _write_worst_panels(results, staging, worst_groups, specs, device)
            write_text(staging / "report.md", markdown.render(results))
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise OutputError(f"cannot write the report in {folder}: {reason}") from error
    return folder / "report.md"
