"""Standalone decision-map fusion of the SESF bundle (``configs/inference.json``, no medfusion).

- :func:`fusion_groups`: what to fuse, from a MONAI-style datalist file
  (``{"testing": [{"sources": ["mri.png", "pet.png"], "name": "out.png"}]}``, reference first,
  paths relative to the datalist's folder) or from the atlas layout's ``splits.json``.
- :class:`DecisionFuser`: the encoder with the shipped weights (``torch.load(weights_only=True)``)
  and ``scripts/fusion.py``'s decision procedure, the same code ``medfusion fuse --method sesf``
  runs. Writes the fused luminance as an 8-bit PNG and, optionally, the decision map
  (``<name>_decision.png``, 1 = the reference wins, 2 = the next source, ...).

2D images only; colour sources are fused through their luminance and the result is grey (the
``medfusion`` CLI also puts the chroma back and fuses volumes). Problems with the inputs are
``ValueError`` / ``FileNotFoundError`` with a one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts import fusion
from scripts.atomic_files import atomic_output
from scripts.datalist import build_groups, subsample
from scripts.one_line_errors import check_not_constant
from scripts.transforms import load_luminance, source_size

MAX_BLOCK_EXPONENT = 6


def _group(sources: Any, name: Any, where: str) -> dict:
    if not isinstance(sources, list) or len(sources) < 2:
        raise ValueError(f"{where}: 'sources' needs a reference and at least one other file")
    for path in sources:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{where}: file not found: {path}")
    return {"sources": [str(p) for p in sources],
            "name": str(Path(str(name or Path(sources[0]).name)).with_suffix(".png"))}


def fusion_groups(
    datalist: str = "",
    key: str = "testing",
    dataset_dir: str = "",
    split: str = "validation",
    pairs: list[str] | None = None,
    limit: int = 0,
) -> list[dict]:
    """``[{"sources": [reference, other, ...], "name": relative output PNG}]``: the items of
    ``datalist`` when given, else the ``split`` groups of the atlas folder ``dataset_dir``."""
    if not datalist:
        groups = build_groups(dataset_dir, "train" if split == "training" else split, pairs)
        return [_group(g["sources"], g["name"], str(dataset_dir))
                for g in subsample(groups, limit)]
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (ValueError, AttributeError):
        entries = None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"datalist {path} has no '{key}' list of "
                         '{"sources": [reference, other, ...]} items')
    groups = []
    for index, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {"sources": entry}
        sources = entry.get("sources")
        if isinstance(sources, list):
            sources = [s if Path(s).is_absolute() else str(path.parent / s) for s in sources]
        groups.append(_group(sources, entry.get("name"), f"datalist {path}, item {index}"))
    return subsample(groups, limit)


def _decision_path(target: Path) -> Path:
    """Where the decision map of the fused image ``target`` goes: ``<name>_decision.png``."""
    return target.with_name(f"{target.stem}_decision.png")


def _save_png(image: Any, target: Path) -> None:
    """Save a PIL image as PNG ``target`` through a temporary file beside it (atomic)."""
    with atomic_output(target, ".png") as temporary:
        image.save(temporary, format="PNG")


class DecisionFuser:
    """The bundle's encoder and decision procedure: fuse groups of 2D images into PNG files."""

    def __init__(
        self,
        network: torch.nn.Module,
        weights: str,
        block_exponent: int,
        settings: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        network.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self._energy = fusion.FeatureEnergy(self.network).eval()
        if str(block_exponent).strip() not in {str(i) for i in range(MAX_BLOCK_EXPONENT + 1)}:
            raise ValueError(f"block_exponent must be an integer 0..{MAX_BLOCK_EXPONENT}, "
                             f"got {block_exponent!r}")
        self.block_exponent = int(block_exponent)
        self.settings = fusion.check_settings(settings)

    def fuse(self, sources: np.ndarray) -> fusion.Decision:
        """(K, H, W) float32 luminance in [0, 1] -> the decision (tensors on the CPU)."""
        batch = torch.from_numpy(np.ascontiguousarray(sources, dtype=np.float32))[None]
        with torch.inference_mode():
            decision = fusion.decision_fusion(batch.to(self.device), self._energy,
                                              self.block_exponent, self.settings)
        return fusion.Decision(*(t.cpu() for t in decision))

    def fuse_all(self, groups: list[dict], output_dir: str, save_decision_map: bool = True
                 ) -> list[str]:
        """Fuse every group; write ``output_dir/<name>`` (and its decision map); the paths."""
        from PIL import Image

        root = Path(output_dir).resolve()
        targets = [(root / group["name"]).resolve() for group in groups]
        for group, target in zip(groups, targets, strict=True):
            if root not in target.parents:
                raise ValueError(f"output name {group['name']!r} leaves {output_dir}")
        if len(set(targets)) != len(targets):
            raise ValueError("two groups would write the same output name; give them names")
        maps = [_decision_path(t) for t in targets] if save_decision_map else []
        clash = sorted({str(t.relative_to(root)) for t in targets} & {str(m.relative_to(root))
                                                                      for m in maps})
        if clash:
            raise ValueError(f"output {clash[0]} would be both a fused image and another group's "
                             "decision map (<name>_decision.png); rename that group")
        for group in groups:  # every group readable and fusible before anything is written
            sizes = {source_size(p) for p in group["sources"]}
            if len(sizes) != 1:
                raise ValueError(f"sources of {group['name']} differ in size: {sorted(sizes)}")
            for path in group["sources"]:
                check_not_constant(load_luminance(path), path)
        written = []
        for group, target in zip(groups, targets, strict=True):
            planes = [load_luminance(p) for p in group["sources"]]
            decision = self.fuse(np.stack(planes))
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.rint(decision.fused[0].numpy() * 255.0), 0, 255)
            _save_png(Image.fromarray(pixels.astype(np.uint8)), target)
            written.append(str(target))
            if save_decision_map:
                labels = _decision_path(target)
                _save_png(Image.fromarray(decision.winners[0].numpy()), labels)
        print(f"fused {len(written)} group(s) into {output_dir} "
              f"(block exponent {self.block_exponent})")
        return written
