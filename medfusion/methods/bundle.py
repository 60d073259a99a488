"""Load a MONAI bundle's network: the one loading path of every learned method (cnn, sesf).

A bundle folder holds ``configs/inference.json`` (it defines ``network_def`` and whatever else a
method reads, e.g. ``block_exponent``) and ``models/model.pt``, a state dict. ``ConfigParser``
builds the objects (the bundle's own ``scripts`` package made importable first) and the weights
are read with ``torch.load(weights_only=True)``: no pickled code is ever run. Every problem
becomes a one-line :class:`~medfusion.errors.ModelError` naming the method (``what``).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from medfusion.errors import InputError, ModelError

CONFIG = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"


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


MAX_BLOCK_EXPONENT = 6


def check_exponent(value: Any) -> int:
    """The block exponent ``i`` of a learned method (decisions on ``2^i x 2^i`` blocks), checked:
    an integer 0..6 (one-line InputError otherwise). One rule for ``cnn`` and ``sesf``."""
    message = f"block exponent must be an integer 0..{MAX_BLOCK_EXPONENT}, got {value!r}"
    if isinstance(value, bool):  # True == 1: a flag is no exponent
        raise InputError(message)
    try:
        exponent = int(value)
    except (TypeError, ValueError):
        raise InputError(message) from None
    if exponent != value and str(value).strip() != str(exponent):
        raise InputError(message)
    if not 0 <= exponent <= MAX_BLOCK_EXPONENT:
        raise InputError(f"block exponent must be in 0..{MAX_BLOCK_EXPONENT} (blocks of "
                         f"1..{2**MAX_BLOCK_EXPONENT} pixels), got {exponent}")
    return exponent


def bundle_files(bundle_dir: Path, what: str = "CNN") -> tuple[Path, Path]:
    """``(config_file, weights_file)`` of ``bundle_dir``; ModelError when one is missing."""
    config_file, weights_file = bundle_dir / CONFIG, bundle_dir / WEIGHTS
    if not bundle_dir.is_dir():
        raise ModelError(f"{what} bundle folder not found: {bundle_dir}")
    if not config_file.is_file():
        raise ModelError(f"not a MONAI bundle (no {CONFIG}): {bundle_dir}")
    if not weights_file.is_file():
        raise ModelError(f"{what} bundle has no trained weights ({WEIGHTS}): {bundle_dir}")
    return config_file, weights_file


def read_config(
    bundle_dir: Path,
    config_file: Path,
    required: Iterable[str] = ("network_def",),
    overrides: Mapping[str, Any] | None = None,
):
    """A ``ConfigParser`` of ``config_file`` with ``bundle_root`` and ``overrides`` set
    (``None`` values are left as the bundle has them); ModelError for an unreadable config or
    a missing ``required`` key."""
    from monai.bundle import ConfigParser

    use_bundle_scripts(bundle_dir)
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
    except Exception as error:
        raise ModelError(f"cannot read bundle config {config_file}: {error}") from error
    for key in required:
        if key not in parser:
            raise ModelError(f"bundle config {config_file} defines no '{key}'")
    parser["bundle_root"] = str(bundle_dir)
    for key, value in (overrides or {}).items():
        if value is not None:
            parser[key] = value
    return parser


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


def _resolve_reference(value: Any, config: Mapping[str, Any]) -> Any:
    """``"@key"`` naming a top-level key whose value is a plain scalar: that value (the one
    reference form a plain config may use); anything else unchanged."""
    if isinstance(value, str) and value.startswith("@") and "#" not in value:
        target = config.get(value[1:], value)
        if target is not value and _is_literal(target) and not isinstance(target, (dict, list)):
            return target
    return value


def plain_config(
    config_file: Path,
    required: Iterable[str] = ("network_def",),
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The config as a dict when building its ``network_def`` needs no ``ConfigParser``: a
    ``_target_`` in the bundle's ``scripts`` package, literal arguments or ``@key`` references
    to top-level scalars, and scalar ``required`` keys. ``overrides`` (``None``: keep) are applied
    first and references resolved. None otherwise (YAML, expressions, other targets): the full
    parser decides, and gives the proper error for a broken config."""
    if config_file.suffix.lower() != ".json":
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or any(key not in config for key in required):
        return None
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    network_def = config["network_def"]
    if not isinstance(network_def, dict):
        return None
    target = network_def.get("_target_")
    if not isinstance(target, str) or not target.startswith("scripts."):
        return None
    arguments = {k: _resolve_reference(v, config) for k, v in network_def.items()
                 if k != "_target_"}
    if not _is_literal(arguments):
        return None
    if not all(_is_literal(config[key]) and not isinstance(config[key], (dict, list))
               for key in required if key != "network_def"):
        return None
    config["network_def"] = {"_target_": target, **arguments}
    return config


def build_plain_network(bundle_dir: Path, network_def: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate a plain ``network_def`` as ``ConfigParser`` would: import the ``_target_``
    from this bundle's ``scripts`` package and call it with the other keys."""
    arguments = {k: v for k, v in network_def.items() if k != "_target_"}
    module_name, _, class_name = str(network_def["_target_"]).rpartition(".")
    use_bundle_scripts(bundle_dir)
    try:
        factory = getattr(importlib.import_module(module_name), class_name)
        return factory(**arguments)
    except Exception as error:  # any config/code problem of a foreign bundle
        raise ModelError(f"cannot build the network of bundle {bundle_dir}: {error}") from error


def build_network(
    bundle_dir: Path,
    config_file: Path,
    required: Iterable[str] = ("network_def",),
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, torch.nn.Module]:
    """``(settings, network)`` without weights: the light path of :func:`plain_config` when it
    applies, else ``ConfigParser`` (``settings`` is then the parser; both answer ``[key]`` and
    ``.get(key, default)``)."""
    required = tuple(required)
    plain = plain_config(config_file, required, overrides)
    if plain is not None:
        return plain, build_plain_network(bundle_dir, plain["network_def"])
    parser = read_config(bundle_dir, config_file, required, overrides)
    return parser, parsed(parser, "network_def", bundle_dir)


def parsed(parser, key: str, bundle_dir: Path) -> Any:
    """Instantiate ``key`` of the config (e.g. ``network_def``, ``inferer``); ModelError on any
    config or code problem of a foreign bundle."""
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as error:
        message = f"cannot build the network of bundle {bundle_dir}: {error}"
        raise ModelError(message) from error


def weights_error_reason(error: Exception) -> str:
    """One line saying why torch could not read the weights, without torch's multi-line advice
    (which suggests ``weights_only=False``: MedFusion never unpickles arbitrary objects)."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        return "the file holds Python objects besides tensors, which MedFusion never unpickles"
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:200]


def load_weights(
    network: torch.nn.Module, weights_file: Path, what: str = "CNN"
) -> torch.nn.Module:
    """Load a state dict (bare or under ``"model"``, as MONAI's CheckpointSaver writes it)
    strictly into ``network`` with ``torch.load(weights_only=True)``."""
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = weights_error_reason(error)
        raise ModelError(f"cannot read {what} weights {weights_file}: {reason}") from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"{what} weights {weights_file} are not a state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ModelError(
            f"weights {weights_file} do not match the bundle's network ({first})"
        ) from error
    return network


def load_network(
    bundle_dir: str | Path,
    device: str | torch.device = "cpu",
    what: str = "CNN",
    required: Iterable[str] = ("network_def",),
    overrides: Mapping[str, Any] | None = None,
):
    """``(parser, network)``: the bundle's ``network_def`` with its trained weights, in eval
    mode on ``device``; the parser lets the method read its other settings."""
    bundle_dir = Path(bundle_dir).resolve()
    config_file, weights_file = bundle_files(bundle_dir, what)
    parser = read_config(bundle_dir, config_file, required, overrides)
    network = parsed(parser, "network_def", bundle_dir)
    network = load_weights(network, weights_file, what).to(torch.device(device)).eval()
    return parser, network
