"""Fusion methods behind one batch interface, and the registry that builds them.

A method is a callable with a ``name``: ``method(batch) -> fused`` where ``batch`` is a float32
``torch.Tensor`` (B, K, H, W) in [0, 1] holding K >= 2 co-registered single-channel sources and
``fused`` is (B, H, W) float32 in [0, 1] on the same device. Classical baselines live in
:mod:`medfusion.methods.classical`; the bundle's CNN in :mod:`medfusion.methods.cnn`, imported
only when asked for (it loads MONAI and the weights).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from medfusion.errors import InputError, ModelError

CLASSICAL_METHODS = ("average", "max", "laplacian", "gff")
CLASSICAL_FALLBACK = "laplacian"
# learned methods: name -> module with build_method(device, **options), imported when asked for
LEARNED_METHODS = {"cnn": "medfusion.methods.cnn", "sesf": "medfusion.methods.sesf"}


class FusionMethod(Protocol):
    """What the engine calls: a named callable from (B, K, H, W) to (B, H, W)."""

    name: str

    def __call__(self, batch: Any) -> Any: ...


def available_methods() -> list[str]:
    """Names accepted by :func:`get_method` (``cnn`` first: it is the default)."""
    return [*LEARNED_METHODS, *CLASSICAL_METHODS]


def resolve_device(device: str | Any = "auto"):
    """``auto`` -> first CUDA GPU if there is one, else CPU; ``cpu``; ``cuda`` or ``cuda:N``.

    Raises InputError for an unknown name or a CUDA device that this machine does not have.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but no CUDA GPU is available; use cpu")
        index = chosen.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif chosen.type != "cpu":
        raise InputError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return chosen


def get_method(name: str, device: str | Any = "cpu", **options: Any) -> FusionMethod:
    """Build the fusion method ``name`` for ``device``.

    Classical methods take no options (the learned methods' options such as ``block_exponent`` are
    ignored for them). ``cnn`` and ``sesf`` take ``bundle_dir``, ``block_exponent`` (decisions on
    ``2^i x 2^i`` blocks, 0..6) and ``memory_budget_mb`` (default ``MEDFUSION_MEMORY_BUDGET_MB``). A
    missing or broken bundle raises :class:`ModelError` whose message names the classical fallback.
    """
    torch_device = resolve_device(device)
    if name in CLASSICAL_METHODS:
        from medfusion.methods import classical

        return classical.build(name, torch_device)
    if name not in LEARNED_METHODS:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(available_methods())}")
    options = {key: value for key, value in options.items() if value is not None}
    try:
        module = importlib.import_module(LEARNED_METHODS[name])
    except ModuleNotFoundError as error:
        raise ModelError(
            f"the {name} method is not installed ({error}); use --method {CLASSICAL_FALLBACK}"
        ) from error
    try:
        return module.build_method(device=torch_device, **options)
    except ModelError as error:
        message = str(error)
        if CLASSICAL_FALLBACK not in message:
            message = f"{message}; use --method {CLASSICAL_FALLBACK} for a classical fusion"
            raise ModelError(message) from error
        raise
