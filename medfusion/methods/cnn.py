"""The ``cnn`` fusion method: the MONAI bundle's network, loaded from the bundle's config.

There is no second copy of the network here: the bundle's ``configs/inference.json`` defines
``network_def`` and ``inferer`` (a sliding window whose ``roi_size`` is the paper's block size
``i``), and ``models/model.pt`` is read with ``torch.load(weights_only=True)``. When
``network_def`` is plain (a ``_target_`` in the bundle's ``scripts`` package and literal
arguments) it is built by importing that one class, which keeps start-up free of MONAI's import
(seconds); any other config goes through ``monai.bundle.ConfigParser``, which also builds the
``inferer`` when a slice needs the sliding window. The network then runs through
:mod:`medfusion.methods.backend` (ONNX Runtime when installed, checked against torch). Every
problem with the bundle becomes a one-line :class:`~medfusion.errors.ModelError`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from medfusion.errors import InputError, ModelError
from medfusion.methods import backend

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "monai_bundle"
CONFIG = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
MIN_SOURCES = 2
REQUIRED_KEYS = ("network_def", "inferer", "block_size", "overlap")


def use_bundle_scripts(bundle_dir: str | Path) -> None:
    """Make ``import scripts`` resolve to this bundle's ``scripts/`` package.

    Bundles all name their custom code package ``scripts``; a package of that name imported from
    another bundle is dropped from ``sys.modules`` so the configs get this bundle's code.
    """
    bundle_dir = Path(bundle_dir).resolve()
    loaded = sys.modules.get("scripts")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", "") or "").resolve()
        if bundle_dir not in origin.parents:
            for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
                del sys.modules[name]
    root = str(bundle_dir)
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)


def _is_literal(value: Any) -> bool:
    """JSON literal without config syntax (``@`` references, ``$`` expressions, ``%`` macros,
    nested ``_target_``/``_requires_``... keys) that ``ConfigParser`` would have to resolve."""
    if isinstance(value, str):
        return not value.startswith(("@", "$", "%"))
    if isinstance(value, list):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(not str(k).startswith("_") and _is_literal(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float))


def _plain_config(config_file: Path) -> dict[str, Any] | None:
    """The config as a dict when its ``network_def``, ``block_size`` and ``overlap`` need no
    ``ConfigParser`` (``_target_`` in the bundle's ``scripts`` package, literal arguments);
    None otherwise (YAML, references, expressions, other targets: the full parser decides)."""
    if config_file.suffix.lower() != ".json":
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the full parser gives the proper error
    if not isinstance(config, dict) or any(key not in config for key in REQUIRED_KEYS):
        return None
    network_def = config["network_def"]
    if not isinstance(network_def, dict):
        return None
    target = network_def.get("_target_")
    if not isinstance(target, str) or not target.startswith("scripts."):
        return None
    arguments = {k: v for k, v in network_def.items() if k != "_target_"}
    if not _is_literal(arguments):
        return None
    if not all(_is_literal(config[key]) and not isinstance(config[key], (dict, list))
               for key in ("block_size", "overlap")):
        return None
    return config


def _check_block(block_size: Any, overlap: Any) -> tuple[int, float]:
    try:
        block, lap = int(block_size), float(overlap)
    except (TypeError, ValueError):
        message = f"block size {block_size!r} / overlap {overlap!r} are not numbers"
        raise InputError(message) from None
    if block < 8:
        raise InputError(f"block size must be at least 8 pixels, got {block}")
    if not 0.0 <= lap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {lap}")
    return block, lap


class CNNFusion:
    """Callable fusion method ``(B, K, H, W) -> (B, H, W)`` backed by the bundle's CNN.

    Args:
        bundle_dir: bundle folder (``configs/inference.json``, ``models/model.pt``); default
            the shipped ``monai_bundle/``.
        device: torch device for the network.
        block_size: sliding-window size ``i`` in pixels; default the bundle's ``block_size``.
        overlap: sliding-window overlap in [0, 1); default the bundle's ``overlap``.
    """

    name = "cnn"
    # peak working memory per input pixel of one source (activations; FusionNet measured 510 B
    # under torch, 650-680 B under ONNX Runtime): the engine sizes its calls from it
    bytes_per_source_pixel = 680

    def __init__(
        self,
        bundle_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        block_size: int | None = None,
        overlap: float | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir if bundle_dir is not None else DEFAULT_BUNDLE).resolve()
        self.device = torch.device(device)
        config_file = self.bundle_dir / CONFIG
        weights_file = self.bundle_dir / WEIGHTS
        if not self.bundle_dir.is_dir():
            raise ModelError(f"CNN bundle folder not found: {self.bundle_dir}")
        if not config_file.is_file():
            raise ModelError(f"not a MONAI bundle (no {CONFIG}): {self.bundle_dir}")
        if not weights_file.is_file():
            raise ModelError(f"CNN bundle has no trained weights ({WEIGHTS}): {self.bundle_dir}")
        self._config_file = config_file
        self._inferer: Any = None
        plain = _plain_config(config_file)
        if plain is not None:  # light path: import only the bundle's network class
            chosen = {"block_size": block_size, "overlap": overlap}
            self.block_size, self.overlap = _check_block(
                *(plain[k] if chosen[k] is None else chosen[k] for k in chosen))
            network = self._build_plain(plain["network_def"])
        else:
            parser = self._parser(config_file, block_size, overlap)
            self.block_size, self.overlap = _check_block(parser["block_size"], parser["overlap"])
            parser["block_size"], parser["overlap"] = self.block_size, self.overlap
            network = self._parsed(parser, "network_def")
            self._inferer = self._parsed(parser, "inferer")
        self.module = self._load_weights(network, weights_file).to(self.device).eval()
        # what __call__ runs: the module through the fastest checked backend (backend.py)
        self.network = backend.accelerate(self.module, self.device)

    @property
    def inferer(self) -> Any:
        """The bundle's sliding-window inferer, built through ``ConfigParser`` on first use."""
        if self._inferer is None:
            parser = self._parser(self._config_file, self.block_size, self.overlap)
            self._inferer = self._parsed(parser, "inferer")
        return self._inferer

    def _parsed(self, parser: Any, key: str) -> Any:
        try:
            return parser.get_parsed_content(key, instantiate=True)
        except Exception as error:  # any config/code problem of a foreign bundle
            message = f"cannot build the network of bundle {self.bundle_dir}: {error}"
            raise ModelError(message) from error

    def _build_plain(self, network_def: dict) -> torch.nn.Module:
        """Instantiate a plain ``network_def`` as ``ConfigParser`` would: import the
        ``_target_`` from this bundle's ``scripts`` package, call it with the other keys."""
        arguments = {k: v for k, v in network_def.items() if k != "_target_"}
        module_name, _, class_name = network_def["_target_"].rpartition(".")
        use_bundle_scripts(self.bundle_dir)
        try:
            factory = getattr(importlib.import_module(module_name), class_name)
            return factory(**arguments)
        except Exception as error:  # any config/code problem of a foreign bundle
            message = f"cannot build the network of bundle {self.bundle_dir}: {error}"
            raise ModelError(message) from error

    def _parser(self, config_file: Path, block_size: int | None, overlap: float | None):
        from monai.bundle import ConfigParser

        use_bundle_scripts(self.bundle_dir)
        parser = ConfigParser()
        try:
            parser.read_config(str(config_file))
        except Exception as error:
            raise ModelError(f"cannot read bundle config {config_file}: {error}") from error
        for key in REQUIRED_KEYS:
            if key not in parser:
                raise ModelError(f"bundle config {config_file} defines no '{key}'")
        parser["bundle_root"] = str(self.bundle_dir)
        if block_size is not None:
            parser["block_size"] = block_size
        if overlap is not None:
            parser["overlap"] = overlap
        if "sw_batch_size" in parser:
            parser["sw_batch_size"] = self._windows_per_call(parser["block_size"],
                                                             parser["sw_batch_size"])
        return parser

    def _windows_per_call(self, block: Any, configured: Any) -> int:
        """Sliding windows per network call: the bundle's ``sw_batch_size``, lowered so that
        the activations of one call (two sources) fit the engine's memory budget."""
        from medfusion.engine import memory_budget_bytes

        try:
            most, block = max(1, int(configured)), max(1, int(block))
        except (TypeError, ValueError):
            return configured  # an expression: ConfigParser resolves it
        per_window = 2 * block * block * self.bytes_per_source_pixel
        return max(1, min(most, int(memory_budget_bytes() // per_window)))

    def _load_weights(self, network: torch.nn.Module, weights_file: Path) -> torch.nn.Module:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelError(f"cannot read CNN weights {weights_file}: {error}") from error
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise ModelError(f"CNN weights {weights_file} are not a state dict")
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ModelError(
                f"weights {weights_file} do not match the bundle's network ({first})"
            ) from error
        return network

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, K, H, W)`` float sources in [0, 1] into ``(B, H, W)`` on the same device."""
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ModelError(f"the CNN expects a (B, K, H, W) batch of sources, got {shape}")
        if batch.shape[1] < MIN_SOURCES:
            raise ModelError(
                f"the CNN fuses {MIN_SOURCES} or more single-channel sources, got "
                f"{batch.shape[1]} channel(s); colour inputs must enter as luminance"
            )
        source_device = batch.device
        inputs = batch.to(self.device, torch.float32)
        with torch.inference_mode():
            if max(inputs.shape[-2:]) <= self.block_size:
                # One window covers the slice: the sliding-window blend would only divide the
                # network's output by its own weights, so skip it (same result, ~25 % faster).
                fused = self.network(inputs)
            else:
                fused = self.inferer(inputs, self.network)
        return fused[:, 0].clamp(0.0, 1.0).to(source_device)


def build_method(device: str | torch.device = "cpu", **options: Any) -> CNNFusion:
    """Registry entry point (``medfusion.methods.get_method("cnn", ...)``)."""
    return CNNFusion(device=device, **options)
