"""Parsing of the core CLI's ``--progress json`` protocol.

``medfusion fuse ... --progress json`` prints one JSON object per stdout line:
``{"event": "progress", "done": i, "total": n}`` after each batch, then
``{"event": "done", "output": PATH}``. Other lines (or other events, such as a warning the core
may add later) are kept as log text rather than dropped, so nothing the core says is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """One event from the background process.

    ``kind`` is the JSON ``event`` value (``progress``, ``done``, ...) or ``log`` for a line
    that is not a JSON event (stdout text or an stderr line).
    """

    kind: str
    done: int = 0
    total: int = 0
    output: str | None = None
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] (0 when the total is unknown)."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total > 0 else 0.0


def parse_progress_line(line: str) -> ProgressEvent | None:
    """Turn one stdout line into an event; ``None`` for an empty line."""
    text = line.strip()
    if not text:
        return None
    try:
        payload = json.loads(text)
    except ValueError:
        return ProgressEvent("log", text=text)
    if not isinstance(payload, dict) or not isinstance(payload.get("event"), str):
        return ProgressEvent("log", text=text)
    kind = payload["event"]
    try:
        done = int(payload.get("done", 0))
        total = int(payload.get("total", 0))
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 is infinite
        return ProgressEvent("log", text=text)
    output = payload.get("output")
    message = payload.get("message")
    return ProgressEvent(
        kind,
        done=done,
        total=total,
        output=str(output) if output is not None else None,
        text=str(message) if message is not None else "",
        data=payload,
    )
