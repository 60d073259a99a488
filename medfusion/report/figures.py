"""Report figures: metric bars, block-size and robustness curves, speed bars, image panels.

Matplotlib with the non-interactive Agg backend (no display needed). Each function draws one PNG
and writes it atomically; sizes and resolutions are small so the committed report stays light.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medfusion.report.files import write_bytes  # noqa: E402

DPI = 80
# One fixed colour per method so every figure uses the same legend.
_PALETTE = plt.get_cmap("tab10").colors


def method_colours(methods: Sequence[str]) -> dict[str, tuple]:
    """Stable colour per method, in the order given."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}


def _save(fig: plt.Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


def _grid(count: int, columns: int, width: float = 3.2, height: float = 2.6):
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def metric_bars(
    summary: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
    methods: Sequence[str],
    metrics: Sequence[str],
    path: Path,
    titles: Mapping[str, str] | None = None,
) -> Path:
    """Grouped bars of mean ± std: one panel per metric, groups = pair types, bars = methods.

    ``summary[pair_type][method][metric] = (mean, std)``; ``titles`` overrides panel titles.
    """
    pair_types = list(summary)
    colours = method_colours(methods)
    fig, axes = _grid(len(metrics), columns=4)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(pair_types))
    for ax, metric in zip(axes, metrics, strict=True):
        for i, method in enumerate(methods):
            stats = [summary[p].get(method, {}).get(metric, (np.nan, np.nan)) for p in pair_types]
            ax.bar(
                x + (i - (len(methods) - 1) / 2) * width,
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats],
                color=colours[method],
                label=method,
                capsize=2,
                error_kw={"elinewidth": 0.8},
            )
        ax.set_title((titles or {}).get(metric, metric), fontsize=9)
        ax.set_xticks(x, pair_types, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def curves(
    x_values: Sequence[float],
    series: Mapping[str, Mapping[str, Sequence[float]]],
    panels: Sequence[str],
    path: Path,
    xlabel: str,
    title: str = "",
    log_x: bool = False,
    colours: Mapping[str, tuple] | None = None,
    titles: Mapping[str, str] | None = None,
) -> Path:
    """Line plots: one panel per quantity, one line per series.

    ``series[line_name][panel] = y values`` aligned with ``x_values`` (NaN leaves a gap);
    ``titles`` overrides panel titles.
    """
    colours = colours or method_colours(list(series))
    fig, axes = _grid(len(panels), columns=4, height=2.4)
    for ax, panel in zip(axes, panels, strict=True):
        for name, values in series.items():
            if panel in values:
                ax.plot(x_values, values[panel], marker="o", ms=3, color=colours[name], label=name)
        ax.set_title((titles or {}).get(panel, panel), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=7)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(x_values), [f"{v:g}" for v in x_values])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def speed_bars(
    rows: Sequence[Mapping[str, object]], path: Path, colours: Mapping[str, tuple] | None = None
) -> Path:
    """Seconds per image and peak memory per method (one bar per method and device)."""
    labels = [f"{r['method']}\n{r['device']}" for r in rows]
    colours = colours or method_colours(sorted({str(r["method"]) for r in rows}))
    bar_colours = [colours[str(r["method"])] for r in rows]
    fig, axes = _grid(2, columns=2, width=max(3.2, 0.6 * len(rows) + 1.0))
    for ax, key, title in (
        (axes[0], "s_per_image", "seconds per image"),
        (axes[1], "peak_memory_mib", "peak memory (MiB)"),
    ):
        values = [float(r[key]) if r.get(key) is not None else np.nan for r in rows]
        ax.bar(range(len(rows)), values, color=bar_colours)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _zoom_box(shape: tuple[int, ...], fraction: float = 0.35) -> tuple[slice, slice]:
    """A centred square crop covering ``fraction`` of the image side."""
    h, w = shape[:2]
    side = max(8, int(min(h, w) * fraction))
    top, left = (h - side) // 2, (w - side) // 2
    return slice(top, top + side), slice(left, left + side)


def _show(ax: plt.Axes, image: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap=None if image.ndim == 3 else "gray", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def image_panel(
    sources: Mapping[str, np.ndarray],
    fused: Mapping[str, np.ndarray],
    path: Path,
    title: str = "",
    zoom: tuple[slice, slice] | None = None,
) -> Path:
    """Sources and each method's fusion (top row) and the same zoomed crop of each (bottom).

    Images are float arrays in ``[0, 1]``, grey ``(H, W)`` or colour ``(H, W, 3)``.
    """
    images = {**{f"source {k}": v for k, v in sources.items()}, **fused}
    first = next(iter(images.values()))
    rows, cols = _zoom_box(first.shape) if zoom is None else zoom
    count = len(images)
    fig, axes = plt.subplots(2, count, figsize=(1.9 * count, 4.0), squeeze=False)
    for column, (name, image) in enumerate(images.items()):
        image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        _show(axes[0, column], image, name)
        axes[0, column].add_patch(
            plt.Rectangle(
                (cols.start, rows.start),
                cols.stop - cols.start,
                rows.stop - rows.start,
                fill=False,
                edgecolor="yellow",
                linewidth=0.8,
            )
        )
        _show(axes[1, column], image[rows, cols], "zoom")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
