"""RGB <-> YCbCr (ITU-R BT.601 full range, as in JPEG), on float arrays in [0, 1].

Pseudo-colour PET/SPECT inputs are fused through their luminance Y; their chroma (Cb, Cr) is put
back afterwards so the result keeps the colour map. The functions live in the shipped bundle's
``scripts/colour.py``, because the bundle used on its own (without ``medfusion``) must give the
same colour output as the core; this module loads that one file, so nothing is written twice.
"""

from __future__ import annotations

import importlib.util
import sys

from medfusion.resources import bundle_dir

_NAME = "medfusion._bundle_colour"


def _load():
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, bundle_dir() / "scripts" / "colour.py")
    if spec is None or spec.loader is None:  # pragma: no cover - broken installation
        raise ImportError(f"the shipped bundle has no scripts/colour.py ({bundle_dir()})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)
    return module


_colour = _load()
is_colour = _colour.is_colour
rgb_to_ycbcr = _colour.rgb_to_ycbcr
ycbcr_to_rgb = _colour.ycbcr_to_rgb
luminance = _colour.luminance
merge_chroma = _colour.merge_chroma

__all__ = ["is_colour", "luminance", "merge_chroma", "rgb_to_ycbcr", "ycbcr_to_rgb"]
