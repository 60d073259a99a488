"""Pick the series to fuse from a study: by SeriesInstanceUID, or by rules.

A selector is written as a UID (``1.2.840...``) or as comma-separated rules, like MONAI Deploy's
series selector: ``modality=MR``, ``modality=PT,description=(?i)fdg``, ``number=4``.
``modality`` may list alternatives with ``|`` (``modality=PT|NM``); ``description`` is a regular
expression searched in SeriesDescription (case-insensitive). Series made by MedFusion are never
candidates, and each series is used at most once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from medfusion.errors import InputError, PacsError
from medfusion.pacs.derived import is_medfusion_series
from medfusion.pacs.records import SeriesInfo, check_uid

_UID_LIKE = re.compile(r"^[0-9.]+$")
_KEYS = ("modality", "description", "number")


@dataclass(frozen=True)
class SeriesSelector:
    """One series choice: a UID, or rules that must all match."""

    series_uid: str | None = None
    modality: tuple[str, ...] = ()
    description: str | None = None
    number: int | None = None

    @classmethod
    def parse(cls, text: str) -> SeriesSelector:
        """``1.2.3.4`` or ``modality=MR,description=T1,number=3``."""
        text = text.strip()
        if not text:
            raise InputError("empty series selector; give a SeriesInstanceUID or modality=...")
        if _UID_LIKE.match(text):
            return cls(series_uid=check_uid(text, "series UID"))
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in _KEYS or not value.strip():
                raise InputError(
                    f"bad series selector {text!r}: use a UID or key=value pairs with keys "
                    f"{', '.join(_KEYS)} (e.g. modality=MR,description=t1)"
                )
            if key in fields:
                raise InputError(f"bad series selector {text!r}: {key} given twice")
            fields[key] = value.strip()
        description = fields.get("description")
        if description is not None:
            try:
                re.compile(description)
            except re.error as error:
                raise InputError(f"bad description pattern {description!r}: {error}") from None
        number = fields.get("number")
        if number is not None and not number.isdigit():
            raise InputError(f"bad series selector {text!r}: number must be an integer")
        modality = tuple(m.strip().upper() for m in fields.get("modality", "").split("|") if m)
        return cls(
            modality=modality,
            description=description,
            number=None if number is None else int(number),
        )

    def matches(self, series: SeriesInfo) -> bool:
        if self.series_uid is not None:
            return series.series_uid == self.series_uid
        if self.modality and series.modality.upper() not in self.modality:
            return False
        if self.number is not None and series.series_number != self.number:
            return False
        if self.description is not None and not re.search(
            self.description, series.description, flags=re.IGNORECASE
        ):
            return False
        return True

    def __str__(self) -> str:
        if self.series_uid is not None:
            return self.series_uid
        parts = []
        if self.modality:
            parts.append(f"modality={'|'.join(self.modality)}")
        if self.description is not None:
            parts.append(f"description={self.description}")
        if self.number is not None:
            parts.append(f"number={self.number}")
        return ",".join(parts) or "any series"


def select_series(
    series: Sequence[SeriesInfo], selector: SeriesSelector, exclude: Sequence[str] = ()
) -> SeriesInfo:
    """The one series of a study that ``selector`` picks; PacsError when none or several do."""
    study = series[0].study_uid if series else "?"
    if selector.series_uid is not None and selector.series_uid in exclude:
        raise PacsError(f"series {selector.series_uid} is selected twice; fuse distinct series")
    candidates = [
        item
        for item in series
        if not is_medfusion_series(item.description) and item.series_uid not in exclude
    ]
    found = [item for item in candidates if selector.matches(item)]
    if selector.series_uid is not None and not found:
        raise PacsError(f"series {selector.series_uid} not found in study {study}")
    if not found:
        raise PacsError(
            f"no series in study {study} matches {selector} (series there: "
            f"{describe(candidates) or 'none'})"
        )
    if len(found) > 1:
        raise PacsError(
            f"{len(found)} series in study {study} match {selector} ({describe(found)}); "
            "narrow it with description=..., number=... or a SeriesInstanceUID"
        )
    return found[0]


def select_sources(
    series: Sequence[SeriesInfo],
    reference: SeriesSelector,
    others: Sequence[SeriesSelector],
) -> tuple[SeriesInfo, list[SeriesInfo]]:
    """Reference series first, then one distinct series per other selector."""
    if not others:
        raise InputError("choose at least one series to fuse with the reference")
    chosen = [select_series(series, reference)]
    for selector in others:
        chosen.append(select_series(series, selector, exclude=[s.series_uid for s in chosen]))
    return chosen[0], chosen[1:]


def describe(series: Sequence[SeriesInfo]) -> str:
    """``MR #3 'T1 MPRAGE' (176)``, joined by ``; `` (no patient data)."""
    labels = []
    for item in series:
        label = item.modality or "?"
        if item.series_number is not None:
            label += f" #{item.series_number}"
        if item.description:
            label += f" {item.description!r}"
        if item.n_instances is not None:
            label += f" ({item.n_instances})"
        labels.append(label)
    return "; ".join(labels)
