"""Fusion quality metrics: the field's full set as plain NumPy/SciPy functions, plus tables.

Plain functions take 2D arrays, ``metric(fused, *sources, data_range=255.0, ...)`` (or
``metric(img, ...)`` for single-image metrics), and return a float. Inputs may be in any range:
``data_range`` is the value that means white (255 for 8-bit images, 1.0 for the engine's
[0, 1] floats); every metric maps inputs to the 0-255 grey scale first, so the numbers match
the field's 8-bit tables whatever the input scale. ``compute_metrics`` builds a table of a
named selection; ``volume_metrics`` does it per slice of 3D volumes. Conventions, references
and ranges: ``docs/metrics.md``. No torch import: usable from training validation as is.
"""

from medfusion.metrics._common import MetricInputError, MetricUndefinedWarning
from medfusion.metrics.fidelity import mse, psnr, relative_error, rmse
from medfusion.metrics.information import (
    cross_entropy,
    entropy,
    feature_mutual_information,
    mutual_information,
    normalized_mutual_information,
    qncie,
)
from medfusion.metrics.per_source import (
    per_source_qabf,
    stronger_source_share,
    weaker_source_share,
)
from medfusion.metrics.statistics import (
    average_gradient,
    correlation_coefficient,
    edge_intensity,
    energy_of_gradient,
    mean_intensity,
    scd,
    spatial_frequency,
    standard_deviation,
)
from medfusion.metrics.structural import piella_q0, piella_qe, piella_qw, qabf, ssim
from medfusion.metrics.table import (
    METRICS,
    TARGET_SUFFIX,
    MetricSpec,
    available_metrics,
    compute_metrics,
    direction,
    resolve_name,
    volume_metrics,
)
from medfusion.metrics.vif import vif

# Short aliases matching the field's abbreviations.
fmi = feature_mutual_information
nmi = normalized_mutual_information
q0 = piella_q0
qw = piella_qw
qe = piella_qe

__all__ = [
    "METRICS", "TARGET_SUFFIX", "MetricInputError", "MetricSpec", "MetricUndefinedWarning",
    "available_metrics", "average_gradient", "compute_metrics", "correlation_coefficient",
    "cross_entropy", "direction", "edge_intensity", "energy_of_gradient", "entropy",
    "feature_mutual_information", "fmi", "mean_intensity", "mse", "mutual_information", "nmi",
    "normalized_mutual_information", "per_source_qabf", "piella_q0", "piella_qe", "piella_qw",
    "psnr", "q0",
    "qabf", "qe", "qncie", "qw", "relative_error", "resolve_name", "rmse", "scd",
    "spatial_frequency", "ssim", "standard_deviation", "stronger_source_share", "vif",
    "volume_metrics", "weaker_source_share",
]
