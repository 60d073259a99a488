"""Render the benchmark results as ``report.md``.

Only formatting lives here: the numbers come from :mod:`medfusion.report.runner` and every table
has a CSV/JSON twin in the report folder with full precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from medfusion.report.perturb import LEVEL_UNITS

if TYPE_CHECKING:
    from medfusion.report.runner import BenchmarkResults

ARROWS = {"higher": "↑", "lower": "↓"}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], text_columns: int = 1) -> str:
    """A GitHub-flavoured Markdown table: the first ``text_columns`` left-aligned, numbers right."""
    align = [":--"] * text_columns + ["--:"] * (len(headers) - text_columns)
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return fmt(value)
    return str(value).replace("|", "\\|")


def fmt(value: float | None, digits: int = 4) -> str:
    """Compact number with ``digits`` significant digits (``–`` for missing)."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def mean_std(stats: Sequence[float] | None) -> str:
    """``mean ± std`` of a (mean, std, n) triple."""
    if not stats or stats[0] is None or not math.isfinite(stats[0]):
        return "–"
    return f"{fmt(stats[0])} ± {fmt(stats[1])}"


def _best(values: Mapping[str, float], direction: str) -> str | None:
    if direction not in ("higher", "lower"):
        return None
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None
    pick = max if direction == "higher" else min
    return pick(finite, key=finite.get)


def _quality_table(results: BenchmarkResults, pair_type: str) -> str:
    """Metrics as rows, methods as columns, the best mean in bold."""
    per_method = results.summary[pair_type]
    rows = []
    for metric in results.metrics:
        direction = results.directions.get(metric, "higher")
        means = {m: per_method.get(m, {}).get(metric, (math.nan,))[0] for m in results.methods}
        best = _best(means, direction)
        cells = []
        for method in results.methods:
            text = mean_std(per_method.get(method, {}).get(metric))
            cells.append(f"**{text}**" if method == best else text)
        rows.append([f"{metric} {ARROWS.get(direction, '(descriptive)')}"] + cells)
    ranks = results.ranks.get(pair_type, {})
    rows.append(["mean rank ↓"] + [ranks.get(m) for m in results.methods])
    return table(["metric"] + list(results.methods), rows)


def _rank_table(results: BenchmarkResults) -> str:
    columns = list(results.summary) + ["all"]
    rows = [[m] + [results.ranks.get(c, {}).get(m) for c in columns] for m in results.methods]
    return table(["method"] + columns, rows)


def _summary_lines(results: BenchmarkResults) -> list[str]:
    """One line per pair type: the method with the best mean rank, and its rank."""
    lines = []
    for pair_type in [*results.summary, "all"]:
        ranks = {m: r for m, r in results.ranks.get(pair_type, {}).items() if math.isfinite(r)}
        if not ranks:
            continue
        order = sorted(ranks, key=ranks.get)
        best = [f"`{m}`" for m in order if math.isclose(ranks[m], ranks[order[0]])]
        text = ", ".join(f"{m} {fmt(ranks[m], 3)}" for m in order)
        name = "all pair types" if pair_type == "all" else pair_type
        lead = "best mean rank" if len(best) == 1 else "tied best mean rank"
        lines.append(f"- **{name}**: {lead} {' and '.join(best)} (ranks: {text})")
    return lines


def _block_section(results: BenchmarkResults) -> list[str]:
    if not results.block_size:
        return ["_Skipped: " + (results.block_size_note or "no block-size aware method") + "_"]
    metrics = results.study_metrics
    rows = [
        [r["method"], r["block_exponent"], f"{r['block_pixels']}²", r["s_per_512_slice"],
         r["s_per_image"]] + [r.get(m) for m in metrics]
        for r in results.block_size
    ]
    return [
        f"On {results.study_group_count} groups (fixed seeded subset). The CNN decides on "
        "blocks of 2^i × 2^i pixels (`--block-exponent i`; one set of weights for every i): "
        "its block network runs on (H/2^i) × (W/2^i) positions, so a smaller i follows "
        "structures more precisely and a larger i is faster. *s / 512² slice*: median seconds "
        "of one 512 × 512 slice (a study group resized), *s/image*: median seconds per "
        "study group (256², including reading and colour handling).",
        "",
        table(["method", "i", "block", "s / 512² slice", "s/image"] + metrics, rows,
              text_columns=1),
        "",
        f"![block size]({results.figures['block_size']})",
    ]


def _three_source_section(results: BenchmarkResults) -> list[str]:
    case = results.three_sources
    metrics = case["metrics"]
    rows = [[method] + [case["summary"][method][m] for m in metrics] for method in case["summary"]]
    best = {}
    for m in metrics:
        values = {k: case["summary"][k][m] for k in case["summary"]}
        best[m] = max(values, key=values.get)
    return [
        case["description"],
        "",
        table(["method"] + metrics, rows, text_columns=1),
        "",
        "Best per metric: " + ", ".join(f"{m} `{best[m]}`" for m in metrics) + ".",
        "",
        f"![three sources]({case['figure']})" if case.get("figure") else "",
    ]


def _robustness_section(results: BenchmarkResults) -> list[str]:
    if not results.robustness:
        return ["_Skipped: no perturbation requested._"]
    lines = [
        f"On {results.study_group_count} groups (fixed seeded subset). Inputs are perturbed, "
        "fused, and the fusion is scored against the **clean** sources, so the numbers say how "
        "much of the true information survives the disturbance. Level 0 is the clean input.",
        "",
    ]
    metrics = results.study_metrics
    for kind, rows in results.robustness.items():
        lines += [f"### {kind} ({LEVEL_UNITS.get(kind, 'level')})", ""]
        body = [[r["level"], r["method"], r["groups"]] + [r.get(m) for m in metrics] for r in rows]
        lines += [table(["level", "method", "groups"] + metrics, body, text_columns=2), ""]
        if kind in results.figures.get("robustness", {}):
            lines += [f"![{kind}]({results.figures['robustness'][kind]})", ""]
    return lines


def _speed_section(results: BenchmarkResults) -> list[str]:
    if not results.speed:
        return ["_Skipped (`--speed-images 0`)._"]
    rows = [
        [
            r["method"],
            r["device"],
            r["s_per_image"],
            r.get("peak_memory_mib"),
            r.get("process_peak_mib"),
            r["images"],
        ]
        for r in results.speed
    ]
    headers = ["method", "device", "s/image", "peak MiB (method)", "peak MiB (process)", "images"]
    lines = [
        "Each method is measured in a fresh process: median seconds per fusion (reading "
        "excluded, after one warm-up call); *peak MiB (method)*: the peak memory while building "
        "the method and fusing, above the process's baseline once torch is loaded and the images "
        "are read; *peak MiB (process)*: the whole process's peak (CPU: resident set size; GPU: "
        f"allocated CUDA memory). Environment: {results.environment_text()}.",
        "",
        table(headers, rows, text_columns=2),
        "",
    ]
    if "speed" in results.figures:
        lines.append(f"![speed]({results.figures['speed']})")
    return lines


def render(results: BenchmarkResults) -> str:
    """The whole report as Markdown text (figure links are relative to the report folder)."""
    out = ["# MedFusion evaluation report", ""]
    out += [
        "## How to read this",
        "",
        "- Every method fuses the same co-registered groups; colour PET/SPECT inputs are fused "
        "through their luminance (Y of YCbCr) and their colour is put back. The metrics score "
        "the fused luminance, rounded to 8 bits as `medfusion fuse` writes it (volumes: the "
        "float result), against the sources' luminance on the 8-bit grey scale (0–255), "
        "so SD, MSE, SF... are in grey levels; MI, SSIM and VIF are summed over the two sources "
        "(see the metric legend at the end).",
        "- ↑ means higher is better, ↓ lower is better, *(descriptive)* has no better direction; "
        "the best mean per row is **bold**. Values are mean ± sample standard deviation over "
        "the groups of one pair type.",
        "- *Mean rank*: for every group and every ranking metric "
        f"({', '.join(results.rank_metrics)}), the methods are ranked (1 = best, ties share the "
        "average rank); the table gives the average. Lower is better.",
        "- Block size, robustness and speed run on a fixed subset chosen by the seed; the raw "
        "numbers of every table are in the CSV/JSON files listed at the end.",
        "- No metric here has a ground truth: they measure how much of each source's edges, "
        "information and structure the fusion keeps, which is why several are shown.",
        "",
        "Command:",
        "",
        "```",
        results.command,
        "```",
        "",
    ]
    out += ["## Summary", ""] + _summary_lines(results)
    for label, bundle in results.environment.get("bundles", {}).items():
        out.append(
            f"- `{label}`: bundle `{bundle['bundle']}`, weights `{bundle['weights']}` "
            f"({bundle['bytes']} bytes, SHA-256 `{bundle['sha256'][:16]}…`)"
        )
    if results.notes:
        out += [""] + [f"- Note: {note}" for note in results.notes]
    out += ["", "## Data", ""]
    out.append(
        table(
            ["pair type", "modalities", "kind", "groups"],
            [
                [p, " + ".join(info["modalities"]), info["kind"], info["groups"]]
                for p, info in results.pair_types.items()
            ],
            text_columns=3,
        )
    )
    out.append("")
    out += ["## Quality per pair type", ""]
    for pair_type in results.summary:
        count = results.pair_types[pair_type]["groups"]
        out += [f"### {pair_type} ({count} groups)", "", _quality_table(results, pair_type), ""]
    if "metrics" in results.figures:
        out += [f"![metric means]({results.figures['metrics']})", ""]
    out += ["## Mean rank", "", _rank_table(results), ""]
    out += ["## Block size", ""] + _block_section(results) + [""]
    if results.three_sources:
        out += ["## Three sources", ""] + _three_source_section(results) + [""]
    out += ["## Robustness to input disturbances", ""] + _robustness_section(results)
    out += ["## Speed and memory", ""] + _speed_section(results) + [""]
    out += ["## Image panels", ""]
    out.append(
        "Sources, each method's fusion, and a zoomed centre crop (yellow box) for a "
        "representative group per pair type: the group whose "
        f"{results.panel_metric} under `{results.panel_method}` is the median of its pair type."
    )
    out.append("")
    for title, path in results.panels:
        out += [f"**{title}**", "", f"![{title}]({path})", ""]
    if results.worst_panels:
        out += ["### The CNN's worst groups by weaker-source share", ""]
        out.append(
            f"The {len(results.worst_panels)} groups where `{results.panel_method}` keeps the "
            "smallest share of its weaker-kept source's edges (lowest QSF_MIN = min_S Q^{S/F}) "
            "over all pair types; the zoom (yellow box) is the 64 × 64 window where that "
            "source loses the most edge strength under the CNN."
        )
        out.append("")
        for title, path in results.worst_panels:
            out += [f"**{title}**", "", f"![{title}]({path})", ""]
    if results.timings:
        spent = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in results.timings.items())
        out += [f"Run time per stage: {spent}.", ""]
    out += ["## Metric legend", ""]
    out.append(
        table(
            ["metric", "better", "what it measures"],
            [
                [m, results.directions.get(m, ""), results.descriptions.get(m, "")]
                for m in results.metrics
            ],
            text_columns=3,
        )
    )
    out += ["", "## Raw numbers", ""]
    out += [f"- [`{name}`]({name}): {text}" for name, text in results.files.items()]
    out.append("")
    return "\n".join(out)
