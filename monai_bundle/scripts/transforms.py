"""Dictionary transforms of the fusion bundle's training: load a group as luminance, pack the loss
label (inference reads and writes with ``scripts/inference.py``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image


def _luminance(path: str) -> np.ndarray:
    """Read an 8-bit image as float32 luminance in [0, 1] (colour: BT.601 Y, as JPEG)."""
    with Image.open(path) as img:
        if img.mode in ("L", "I;16", "I", "F"):
            arr = np.asarray(img, dtype=np.float32)
            return arr / (65535.0 if img.mode == "I;16" else 255.0)
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    try:
        from medfusion.color import luminance
    except ImportError:  # bundle used without the medfusion package: same BT.601 weights
        return np.clip(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0, 0, 1)
    return np.clip(np.asarray(luminance(rgb / 255.0), dtype=np.float32), 0.0, 1.0)


class LoadFusionGroupd(MapTransform):
    """Load ``sources`` into ``image`` (K, H, W) and an optional ``target`` into (1, H, W).

    Groups without a target get an all-zero ``target`` and ``has_target = 0`` so batches of
    mixed groups collate.
    """

    def __init__(self, sources_key: str = "sources", target_key: str = "target") -> None:
        super().__init__(keys=[sources_key])
        self.sources_key, self.target_key = sources_key, target_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        planes = [_luminance(str(p)) for p in d[self.sources_key]]
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise ValueError(f"sources of {d.get('name', '?')} differ in size: {sorted(shapes)}")
        d["image"] = torch.from_numpy(np.stack(planes))
        target = d.get(self.target_key)
        if target:
            d["target"] = torch.from_numpy(_luminance(str(target))[None])
            d["has_target"] = 1.0
        else:
            d["target"] = torch.zeros((1, *planes[0].shape), dtype=torch.float32)
            d["has_target"] = 0.0
        return d


class PackFusionLabeld(MapTransform):
    """``label = cat[image (K), target (1), has_target mask (1)]`` for ``FusionLoss``."""

    def __init__(self) -> None:
        super().__init__(keys=["image"])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d["image"])
        target = torch.as_tensor(d["target"])
        mask = torch.full_like(target, float(d["has_target"]))
        d["label"] = torch.cat([image, target, mask], dim=0)
        return d
