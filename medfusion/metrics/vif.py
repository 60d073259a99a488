"""VIF: Sheikh & Bovik's pixel-domain multiscale visual information fidelity, summed over
sources."""

from __future__ import annotations

import numpy as np

from medfusion.metrics import _compiled
from medfusion.metrics._common import (
    GREY_MAX,
    filter_valid,
    gaussian_kernel,
    prepare,
    reduce_over_sources,
    too_small,
    undefined,
)

_SIGMA_NSQ = 2.0  # HVS noise variance of vifp_mscale.m, defined on the 0-255 scale
_EPS = 1e-10
_MIN_SIZE = 41  # the four scales need 17 + (9 + 5 + 3 - 3) * 2**k pixels; 41 is enough


def _vifp_terms(images: list[np.ndarray], sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator information sums of ``vifp_mscale`` over the four scales for
    each source (reference) against the fused image (distorted), the last of ``images``.

    Images are filtered one by one: a 2D image and its temporaries stay in the CPU cache,
    which a stacked call's do not (measured slower).
    """
    num = np.zeros(sources)
    den = np.zeros(sources)
    for scale in range(1, 5):
        size = 2 ** (4 - scale + 1) + 1
        kernel = gaussian_kernel(size, size / 5.0)
        if scale > 1:
            images = [filter_valid(x, kernel, step=2) for x in images]
        mu, var = zip(*(_compiled.moments_valid(x, kernel, 1.0) for x in images), strict=True)
        for k in range(sources):
            sigma12 = _compiled.covariance_valid(images[k], images[sources], kernel, mu[k],
                                                 mu[sources], 1.0)
            part_num, part_den = _compiled.vif_information(var[k], var[sources], sigma12,
                                                           _EPS, _SIGMA_NSQ)
            num[k] += np.log10(part_num, out=part_num).sum()
            den[k] += np.log10(part_den, out=part_den).sum()
    return num, den


def vif(fused: object, *sources: object, data_range: float = GREY_MAX,
        reduce: str = "sum") -> float:
    """VIF: ``sum_S VIFP(S -> F)``, Sheikh & Bovik's pixel-domain multiscale VIF per source.

    ``VIFP = sum_scales sum_w log10(1 + g^2 s_S^2 / (s_v^2 + s_n^2)) / sum_scales sum_w
    log10(1 + s_S^2 / s_n^2)`` over four scales (Gaussian windows 17/9/5/3, sd N/5, 'valid',
    dyadic downsampling), ``s_n^2 = 2`` on the 0-255 scale. Reference: Sheikh & Bovik, IEEE TIP
    15 (2006), ``vifp_mscale.m`` (LIVE); summed over the sources as in Tang et al.'s and Zhou
    et al.'s fusion tables (``reduce="mean"`` averages). Range [0, ~K] (1 per source for F equal
    to it, above 1 for contrast-enhanced F); higher is better. NaN + warning for a constant
    source (no information to preserve) and for images smaller than 41x41 (the four scales).
    """
    image, checked = prepare(fused, sources, data_range)
    if min(image.shape) < _MIN_SIZE:
        return too_small("VIF", image.shape, _MIN_SIZE)
    num, den = _vifp_terms([*checked, image], len(checked))
    if (den == 0).any():
        return undefined("VIF", "a source image is constant")
    return reduce_over_sources(list(num / den), reduce)
