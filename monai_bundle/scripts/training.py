"""Training-time handlers of the fusion bundle: which block exponent ``i`` the network uses.

One set of weights serves every ``i`` (``scripts.network``), so training draws ``i`` at random
for each batch (``RandomBlockExponent``) and validation scores the default ``i``
(``FixedBlockExponent``), the one ``medfusion`` runs without options.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from torch import nn

from scripts.network import set_block_exponent


def _unwrap(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel


class RandomBlockExponent:
    """Before every training iteration, set ``network.block_exponent`` to a random choice."""

    def __init__(self, network: nn.Module, exponents: Sequence[int], seed: int = 0) -> None:
        self.network, self.exponents = network, [int(e) for e in exponents]
        self.random = random.Random(seed)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine) -> None:
        set_block_exponent(_unwrap(self.network), self.random.choice(self.exponents))


class FixedBlockExponent:
    """Before every evaluation epoch, set ``network.block_exponent`` to ``exponent``."""

    def __init__(self, network: nn.Module, exponent: int) -> None:
        self.network, self.exponent = network, int(exponent)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        set_block_exponent(_unwrap(self.network), self.exponent)
