"""RGB <-> YCbCr (ITU-R BT.601 full range, as in JPEG), on float arrays in [0, 1].

Pseudo-colour PET/SPECT inputs are fused through their luminance Y; their chroma (Cb, Cr) is put
back afterwards so the result keeps the colour map. The functions live in the shipped bundle's
``scripts/colour.py``, because the bundle used on its own (without ``medfusion``) must give the
same colour output as the core; this module loads that one file, so nothing is written twice.
"""

from __future__ import annotations

from medfusion.resources import bundle_dir, load_bundle_script

_colour = load_bundle_script(bundle_dir(), "scripts/colour.py", "medfusion._bundle_colour")
is_colour = _colour.is_colour
rgb_to_ycbcr = _colour.rgb_to_ycbcr
ycbcr_to_rgb = _colour.ycbcr_to_rgb
luminance = _colour.luminance
merge_chroma = _colour.merge_chroma

__all__ = ["is_colour", "luminance", "merge_chroma", "rgb_to_ycbcr", "ycbcr_to_rgb"]
