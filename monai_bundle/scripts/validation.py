"""Ignite metrics for the bundle's validation: fused ``pred`` against the ``image`` sources.

``FusionScoreMetric`` (the CheckpointSaver key metric, Q^{AB/F} + min_S Q^{S/F} + VIF / K),
``WeakerSourceShareMetric`` (min_S Q^{S/F}),
``EdgePreservationMetric`` (Q^{AB/F}) and ``VisualFidelityMetric`` (VIF) run in torch with the
loss's functions (they match ``medfusion.metrics`` to 1e-3), so validation stays fast on CPU;
``FusionQualityMetric`` averages any ``medfusion.metrics`` function on 0-255 luminance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from scripts.losses import edge_preservation, per_source_edge_preservation, visual_fidelity

SOURCE_FREE = {"entropy", "standard_deviation", "spatial_frequency", "average_gradient"}


class _MeanMetric(Metric):
    """Mean of a per-sample score over the epoch; ``output`` is ``(pred, image)`` batches."""

    def __init__(
        self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu"
    ) -> None:
        self._sum = 0.0
        self._count = 0
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        raise NotImplementedError

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        pred, image = output
        if isinstance(pred, (list, tuple)):  # decollated
            pred, image = torch.stack(list(pred)), torch.stack(list(image))
        scores = self._scores(pred.detach().float(), image.detach().float())
        self._sum += float(sum(scores))
        self._count += len(scores)

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return self._sum / max(self._count, 1)


class EdgePreservationMetric(_MeanMetric):
    """Mean Q^{AB/F} (edge preservation from all sources into the fused image), in [0, 1]."""

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        return edge_preservation(pred, image).tolist()


class FusionQualityMetric(_MeanMetric):
    """Mean of ``medfusion.metrics.<name>(fused, *sources, data_range=255)`` on 0-255 luminance."""

    def __init__(self, name: str, output_transform: Callable = lambda x: x, device="cpu"):
        import medfusion.metrics as fm

        self._fn, self._name = getattr(fm, name), name
        super().__init__(output_transform=output_transform, device=device)

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        out = []
        for p, s in zip(pred.cpu().numpy() * 255.0, image.cpu().numpy() * 255.0, strict=True):
            if self._name in SOURCE_FREE:
                out.append(float(self._fn(p[0], data_range=255.0)))
            else:
                out.append(float(self._fn(p[0], *s, data_range=255.0)))
        return out


class VisualFidelityMetric(_MeanMetric):
    """Mean pixel-domain multiscale VIF summed over sources (torch, same formula as the loss)."""

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        return visual_fidelity(pred, image).tolist()


class WeakerSourceShareMetric(_MeanMetric):
    """Mean min_S Q^{S/F}: the edge preservation of the worst-kept source, in [0, 1]."""

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        return per_source_edge_preservation(pred, image).amin(dim=1).tolist()


class FusionScoreMetric(_MeanMetric):
    """Checkpoint key metric: Q^{AB/F} + min_S Q^{S/F} + VIF / K per image (the measures to
    win: edges overall, edges of the worst-kept source, visual information)."""

    def _scores(self, pred: torch.Tensor, image: torch.Tensor) -> list[float]:
        k = image.shape[1]
        share = per_source_edge_preservation(pred, image).amin(dim=1)
        return (edge_preservation(pred, image) + share
                + visual_fidelity(pred, image) / k).tolist()
