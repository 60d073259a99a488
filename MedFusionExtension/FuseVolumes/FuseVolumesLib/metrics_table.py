"""The metrics CSV written by ``medfusion fuse --metrics`` read into typed columns.

A table node needs to know, per column, whether it holds numbers or text (numbers sort and plot
as numbers). Reading the CSV here keeps the module's part to copying columns into a vtkTable.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MetricsTable:
    """Column names, a numeric flag per column, and rows (floats in numeric columns)."""

    columns: list[str]
    numeric: list[bool]
    rows: list[list[float | str]]

    def column(self, name: str) -> list[float | str]:
        """All values of one column."""
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


def _as_float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if not math.isinf(number) or value.strip().lower() in {"inf", "-inf"} else None


def read_metrics_csv(path: str | Path) -> MetricsTable:
    """Read a CSV with a header row; a column is numeric when every non-empty cell is a number."""
    with open(path, newline="", encoding="utf-8") as handle:
        records = [row for row in csv.reader(handle) if row]
    if not records:
        raise ValueError(f"metrics file {Path(path).name} is empty")
    header, body = records[0], records[1:]
    width = len(header)
    body = [(row + [""] * width)[:width] for row in body]
    numeric = [
        all(_as_float(row[i]) is not None for row in body if row[i].strip()) and
        any(row[i].strip() for row in body)
        for i in range(width)
    ]
    rows: list[list[float | str]] = [
        [(_as_float(cell) if cell.strip() else math.nan) if numeric[i] else cell
         for i, cell in enumerate(row)]
        for row in body
    ]
    return MetricsTable(columns=header, numeric=numeric, rows=rows)
