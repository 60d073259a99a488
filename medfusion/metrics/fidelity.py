"""Fidelity metrics against a reference: MSE, RMSE, PSNR, REL.

In the fusion form the references are the sources (values combined over sources, as VIFB
does); in the target form the single reference is a target fused image (Li et al. 2021).
Errors are expressed on the 0-255 grey scale unless ``scale`` says otherwise.
"""

from __future__ import annotations

import numpy as np

from medfusion.metrics._common import GREY_MAX, MetricInputError, prepare, shared, undefined


def _per_source_mse(fused: object, sources: tuple[object, ...], data_range: float) -> list[float]:
    """Each source's ``mean((S - F)^2)``, shared by MSE, RMSE and PSNR of one
    ``compute_metrics`` call."""
    image, checked = prepare(fused, sources, data_range)

    def mse_of(source: np.ndarray) -> float:
        difference = source - image
        difference *= difference
        return float(difference.mean())

    return [shared(("mse",), (s, image), lambda s=s: mse_of(s)) for s in checked]


def _unit(scale: float) -> float:
    value = float(scale)
    if not np.isfinite(value) or value <= 0:
        raise MetricInputError(f"scale must be a positive number, got {scale!r}")
    return value / GREY_MAX


def mse(fused: object, *sources: object, data_range: float = GREY_MAX,
        scale: float = GREY_MAX) -> float:
    """MSE: mean over sources of ``mean((S - F)^2)``.

    Reference: Jagalingam & Hegde, Aquatic Procedia 4 (2015); VIFB ``metricsMse``. Expressed for
    images whose full scale is ``scale`` (255: grey levels, default; 1.0: VIFB's [0, 1] units).
    Range [0, scale^2]; lower is better.
    """
    return float(np.mean(_per_source_mse(fused, sources, data_range))) * _unit(scale) ** 2


def rmse(fused: object, *sources: object, data_range: float = GREY_MAX,
         scale: float = GREY_MAX) -> float:
    """RMSE: mean over sources of ``sqrt(mean((S - F)^2))``.

    Reference: VIFB ``metricsRmse`` (mean of the per-source RMSEs). ``scale`` as for
    :func:`mse`. Range [0, scale]; lower is better.
    """
    values = np.sqrt(_per_source_mse(fused, sources, data_range))
    return float(np.mean(values)) * _unit(scale)


def psnr(fused: object, *sources: object, data_range: float = GREY_MAX) -> float:
    """PSNR: ``10 log10(255^2 / MSE)`` with MSE averaged over sources first.

    Reference: VIFB/MEFB ``metricsPsnr``; for one reference it equals scikit-image's
    ``peak_signal_noise_ratio`` with the same ``data_range``. Unit dB, range [0, inf]
    (``inf`` when F equals every reference); higher is better.
    """
    error = float(np.mean(_per_source_mse(fused, sources, data_range)))
    if error == 0:
        return float("inf")
    return float(10.0 * np.log10(GREY_MAX**2 / error))


def relative_error(fused: object, *sources: object, data_range: float = GREY_MAX) -> float:
    """REL: relative L2 error ``||F - R||_2 / ||R||_2``, mean over references R.

    The seed paper (Li et al. 2021) reports REL against the target image without a formula;
    MedFusion uses the relative Frobenius-norm error, independent of the grey scale. Range
    [0, inf); lower is better. NaN + warning when a reference is all zero.
    """
    image, checked = prepare(fused, sources, data_range)
    values = []
    for reference in checked:
        norm = float(np.sqrt((reference * reference).sum()))
        if norm == 0:
            return undefined("REL", "a reference image is all zero")
        difference = image - reference
        values.append(float(np.sqrt((difference * difference).sum())) / norm)
    return float(np.mean(values))
