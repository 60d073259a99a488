"""Score fusions in worker processes while the main process keeps fusing.

The full metric table costs far more than a classical fusion (FMI alone is about a second per
256×256 image), so a benchmark spends most of its time in metrics. :class:`Scorer` hands each
score to a pool of ``workers`` processes (see :mod:`processes`) and bounds the work
in flight so memory stays flat. The numbers are the same for any worker count: each score is
one call of :func:`medfusion.report.fusion.score_arrays` on the same arrays.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from medfusion.report.fusion import score_arrays
from medfusion.report.processes import worker_context


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """A pool of ``workers`` metric processes, or None to score in this process."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=worker_context())


class Scorer:
    """``submit`` a score; ``on_done(row, values)`` is called (in order) with the metrics.

    ``pool``: a :func:`worker_pool` (shared by the stages, owned by the caller) or None.
    """

    def __init__(
        self,
        pool: ProcessPoolExecutor | None,
        names: Sequence[str],
        on_done: Callable[[dict, dict], None],
    ):
        self.names = list(names)
        self.on_done = on_done
        self._pool = pool
        self._pending: deque[tuple[dict, Future]] = deque()
        self._limit = max(4, 8 * getattr(pool, "_max_workers", 1))

    def submit(
        self,
        row: dict,
        fused: np.ndarray,
        references: Sequence[np.ndarray],
        axis: int | None = None,
    ) -> None:
        """Queue the score of ``fused`` against ``references``; ``row`` is handed back."""
        if self._pool is None:
            self.on_done(row, score_arrays(fused, references, self.names, axis))
            return
        future = self._pool.submit(score_arrays, fused, list(references), self.names, axis)
        self._pending.append((row, future))
        while len(self._pending) > self._limit:
            self._finish_one()

    def _finish_one(self) -> None:
        row, future = self._pending.popleft()
        self.on_done(row, future.result())

    def drain(self) -> None:
        """Wait for every queued score."""
        while self._pending:
            self._finish_one()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.drain()
            return
        for _, future in self._pending:  # an error or a cancel: drop the queued work
            future.cancel()
        self._pending.clear()
