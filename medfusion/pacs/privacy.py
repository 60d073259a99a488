"""Keep patient identifiers out of the logs.

pynetdicom logs whole query identifiers (patient name, ID, birth date) at INFO/DEBUG level, and
urllib3 logs every request URL, query string included (``?PatientID=...``), at DEBUG level.
MedFusion's own log lines name studies and series by UID only; these third-party loggers are
capped so ``medfusion -v`` stays free of patient data. Our :class:`~medfusion.errors.PacsError`
messages carry what their errors said, without identifiers.
"""

from __future__ import annotations

import logging

_NOISY_LOGGERS = {"pynetdicom": logging.CRITICAL, "urllib3": logging.WARNING}


def quiet_third_party_loggers() -> None:
    """Raise the level of loggers that would print identifiers (idempotent)."""
    for name, level in _NOISY_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)
