"""``medfusion demo``: fuse the shipped PET-MRI sample; write the result, a panel and metrics.

The README's first command. It uses the default method (the bundle's CNN); only when the CNN
weights are missing does it fall back to the ``laplacian`` baseline, and it says so.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.errors import InputError, ModelError, OutputError
from medfusion.resources import demo_dir

logger = logging.getLogger("medfusion")

DEMO_DIR = demo_dir()  # package data: medfusion/demo (see medfusion.resources)
DEMO_INPUTS = ("mri.png", "pet.png")
FALLBACK = "laplacian"


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="fuse the shipped PET-MRI sample; write fused image, panel and metrics",
        description="Fuse the Whole Brain Atlas PET-MRI pair shipped with MedFusion and "
        "write fused.png, panel.png (sources beside the result) and metrics.json.",
    )
    parser.add_argument("-o", "--output-dir", default="medfusion-demo",
                        help="output folder, created if missing (default: ./medfusion-demo)")
    from medfusion.methods import available_methods

    parser.add_argument("--method", default="cnn", choices=available_methods(),
                        help="fusion method (default: cnn)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.set_defaults(func=run_demo)


def weights_missing() -> bool:
    """True when the shipped bundle has no weights file (so ``cnn`` cannot run yet)."""
    try:
        from medfusion.methods import cnn
    except ImportError:
        return True
    return not (cnn.DEFAULT_BUNDLE / cnn.WEIGHTS).is_file()


def demo_method(name: str, device: str):
    """Build ``name``; fall back to the Laplacian baseline only if the CNN weights are missing."""
    from medfusion.methods import get_method

    try:
        return get_method(name, device=device)
    except ModelError as error:
        if name != "cnn" or not weights_missing():
            raise
        reason = str(error).split("; use --method")[0]
        logger.warning("the CNN weights are missing (%s): using the classical '%s' method "
                       "instead", reason, FALLBACK)
        return get_method(FALLBACK, device=device)


def run_demo(args: argparse.Namespace) -> int:
    """Fuse the sample and write ``fused.png``, ``panel.png`` and ``metrics.json``: all three
    or, when one fails, none (and no output folder when the command made it)."""
    from medfusion.engine import fuse_images
    from medfusion.io.atomic import OutputSet, missing_folders, remove_empty_folders
    from medfusion.io.images import read_image, write_image

    inputs = [DEMO_DIR / name for name in DEMO_INPUTS]
    for path in inputs:
        if not path.is_file():
            raise InputError(f"demo sample not found: {path} (the installation is incomplete: "
                             "reinstall medfusion)")
    method = demo_method(args.method, args.device)  # before the folder: a refusal leaves none
    out = Path(args.output_dir)
    made = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        remove_empty_folders(made)
        raise OutputError(f"cannot create output folder {out}: {error.strerror}") from error
    written = [("fused image", out / "fused.png"), ("panel", out / "panel.png")]
    try:
        with OutputSet() as outputs:
            result = fuse_images(inputs, method=method, device=args.device)
            write_image(outputs.stage(out / "fused.png"), result.to_uint8())
            panel = _panel([read_image(p) for p in inputs], result.to_uint8(),
                           ["MRI", "PET", f"fused ({method.name})"])
            write_image(outputs.stage(out / "panel.png"), panel)
            try:
                from medfusion.cli.fuse import image_metrics, write_metrics

                values = image_metrics(result)
            except ImportError as error:
                logger.warning("metrics not written: the metrics module is unavailable (%s)",
                               error)
            else:
                write_metrics(outputs.stage(out / "metrics.json"), values,
                              info={"inputs": [str(p) for p in inputs], "method": method.name})
                written.append(("metrics", out / "metrics.json"))
    except BaseException:
        remove_empty_folders(made)
        raise
    for what, path in written:
        print(f"{what}: {path}")
    return 0


def _panel(sources: list[np.ndarray], fused: np.ndarray, titles: list[str]) -> np.ndarray:
    """Sources and result side by side (RGB), each with a title bar above it."""
    from PIL import Image, ImageDraw

    from medfusion.io.images import to_uint8

    tiles = [to_uint8(_rgb(a)) for a in [*sources, fused]]
    height, width = tiles[0].shape[:2]
    bar, gap = 22, 4
    canvas = Image.new("RGB", (len(tiles) * width + (len(tiles) - 1) * gap, height + bar))
    draw = ImageDraw.Draw(canvas)
    for index, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        left = index * (width + gap)
        canvas.paste(Image.fromarray(tile), (left, bar))
        draw.text((left + 6, 5), title, fill=(255, 255, 255))
    return np.asarray(canvas)


def _rgb(array: np.ndarray) -> np.ndarray:
    from medfusion.io.images import to_unit_range

    unit = array if array.dtype == np.float32 and array.max() <= 1.0 else to_unit_range(array)
    return unit if unit.ndim == 3 else np.repeat(unit[..., None], 3, axis=-1)
