"""Block fusion CNN with the paper's block size ``i`` (Li et al. 2021), for K >= 2 sources.

Why this design: the network decides, block by block, how much of each source to keep. Each
source is split into a smooth *base* (local mean) and a *detail* layer at full resolution;
block statistics (mean and standard deviation over ``2^i x 2^i`` pixels) feed a small CNN
that runs at the block grid, with weights shared by all sources and features pooled across
sources by max and mean (order-free: 2, 3 or more modalities with one set of weights). Per
source it predicts a selection logit and a detail gain, which are upsampled bilinearly to
pixels (smooth maps: no block seams). The fused image is::

    F = sum_k w_k * base_k + sum_k c_k * detail_k,   w = softmax_k(up(logit_k) + beta * x_k),
    c_k = w_k + (1 - w_k) * sigmoid(up(gain_k))

so it starts as a soft pixel maximum (``beta * x_k``) and learns where to re-inject the
details of the source that is not selected (what keeps the weaker source's edges).

Block exponent ``i``: the CNN runs on ``(H / 2^i) x (W / 2^i)`` positions, so its work falls
4x per step of ``i``; a small ``i`` follows structures more precisely, a large ``i`` is faster.
One set of weights serves every ``i`` (training draws ``i`` at random per batch).
"""

from __future__ import annotations

import importlib.util
import logging
import operator
import os
import sys
import threading
import weakref
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MAX_BLOCK_EXPONENT = 6
STATS = 2  # block mean and block variance of each source
BASE_POOL = 4  # the base layer is the bilinear upsampling of 4x4 block means
# source pixels per call (two 512^2 pairs) from which the compiled CPU loops are used before
# numba is loaded: loading it (0.7 s once per process on an idle machine, up to ~2 s under load;
# ~10 s once to compile into an empty cache) costs what the loops save on 150-500 512^2 slice
# pairs (~4 ms each), so a single image pair keeps the torch code; volumes and batches reach it
COMPILED_MIN_SOURCE_PIXELS = 1 << 20
# sources up to which the compiled path runs the head as one stacked product (_fused_layers:
# its FLOPs grow as K (K + 1) against the per-source products' K + 2). Two sources: the block
# CNN in 0.75x the time. From three on the torch combination dominates a call (5.9 ms for a
# 512^2 slice of 3 sources): the method took the same time within 3 % either way at K = 3..6
# (8.04 against 8.31 ms at K = 4), the block CNN alone 0.83x at K = 3; 4 keeps the stacked
# product within 3.3x the per-source FLOPs (2-core VM, session 40)
STACKED_HEAD_MAX_SOURCES = 4
# ... and block positions per call (B h w) up to which it does: on larger grids (i = 0 on a 512^2
# pair, 2^18) its concatenated input and its products run out of the caches and the method took
# 1.02-1.15x the time; at i = 1 on two 512^2 pairs (2^17) 0.82x, at i = 3 0.78x
STACKED_HEAD_MAX_POSITIONS = 1 << 17
# torch's hooks on every module's forward (empty dicts unless someone registers one;
# FusionNet.layers_hooked): private names, so read where this torch has them
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name)
                      for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
                      if isinstance(getattr(torch.nn.modules.module, name, None), dict))


class FusedLayers(NamedTuple):
    """:meth:`FusionNet._fused_layers`: the encoder's two weights in oneDNN's layout, the 1x1
    layer's weight ``(K C, (K + 1) C)`` and bias ``(K C)`` for all sources at once, and the
    last layer's block-diagonal tap matrix ``(K 2 9, K C)`` and bias ``(2 K)``."""

    first: torch.Tensor
    second: torch.Tensor
    mixing: torch.Tensor
    bias: torch.Tensor
    taps: torch.Tensor
    last_bias: torch.Tensor


# per network: source count -> (the weights, their versions and addresses, views of their
# storage, their FusedLayers)
_FUSED_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FusionNet(nn.Module):
    """Fuse ``(B, K, H, W)`` co-registered single-channel sources in [0, 1] into ``(B, 1, H, W)``.

    Args:
        block_exponent: ``i``; the CNN works on blocks of ``2^i x 2^i`` pixels (0..6).
        features: channels of the block CNN.
        min_sources: inputs with fewer channels are rejected (fusion needs at least two).
        max_prior: initial ``beta`` (weight of each source's intensity in its selection logit).
        logit_bound: ``L > 0`` bounds each block's selection logits to ``L tanh((l_k - mean_j
            l_j) / L)`` (so two sources' logits differ by less than ``2 L``); 0 leaves them
            unbounded.
    """

    # forward clamps its result to [0, 1] on every path (torch code, compiled loops, exports), so
    # callers (medfusion's cnn method) need not clamp it again (a full-size pass: ~3 % of a slice)
    output_in_unit_range = True

    def __init__(
        self,
        block_exponent: int = 2,
        features: int = 24,
        min_sources: int = 2,
        max_prior: float = 8.0,
        logit_bound: float = 0.0,
    ) -> None:
        super().__init__()
        self.logit_bound = float(logit_bound)
        self.block_exponent = check_block_exponent(block_exponent)
        self.base_pool = BASE_POOL
        self.stats = STATS
        self.min_sources = int(min_sources)
        self.max_prior = nn.Parameter(torch.tensor(float(max_prior)))
        self.encoder = nn.Sequential(
            nn.Conv2d(STATS, features, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(features, features, 3, padding=2, dilation=2),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.head = nn.Sequential(
            nn.Conv2d(3 * features, features, 1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(features, 2, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)  # start as the soft pixel maximum
        with torch.no_grad():
            self.head[-1].bias.copy_(torch.tensor([0.0, -2.0]))
        # the block CNN runs channels-last (weights here, inputs in forward): oneDNN's NCHW
        # kernels for these few channels were 3-5x slower on CPU (a dilated 24->24 3x3 conv on
        # 64x64 maps, batch 16: 37 ms NCHW, 10 ms channels-last); loaded weights keep the layout
        self.to(memory_format=torch.channels_last)
        # float32 CPU inference runs the full-resolution passes as compiled loops where numba is
        # installed (scripts/cpu_kernels.py; the same numbers to float32 rounding); False runs
        # the torch code on every call (see _compiled_cpu_path)
        self.compiled_cpu_kernels = True

    @property
    def input_multiple(self) -> int:
        """Height and width multiple that needs no padding (inputs of other sizes are
        replicate-padded to it inside ``forward``; an exported graph needs it done outside)."""
        return max(1 << self.block_exponent, self.base_pool)

    def extra_repr(self) -> str:
        # (the inference backends' cache key reads this: another bound is another graph)
        return f"block_exponent={self.block_exponent}, logit_bound={self.logit_bound:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fused image ``(B, 1, H, W)`` in [0, 1]."""
        if x.dim() != 4 or x.shape[1] < self.min_sources:
            raise ValueError(
                f"FusionNet expects (B, K>={self.min_sources}, H, W) input, got {x.shape}"
            )
        if not torch.jit.is_scripting():  # (TorchScript compiles none of this block)
            if self._compiled_cpu_path(x):
                return self._forward_compiled(x)
        h, w = x.shape[2], x.shape[3]
        block = 1 << self.block_exponent
        x = self._padded(x)
        stats, coarse = self._block_stats(x, block)
        maps = self._block_maps(stats, x.shape[0], x.shape[1])
        return self._compose(x, maps, coarse, block)[..., :h, :w]

    def _forward_compiled(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the full-resolution passes as compiled CPU loops
        (:mod:`scripts.cpu_kernels`; three or more sources keep the torch combination)."""
        kernels = _cpu_kernels()
        b, k, h, w = x.shape
        block = 1 << self.block_exponent
        x = self._padded(x)
        stats, coarse = kernels.block_stats(x, block, self.base_pool)
        maps = self._compiled_block_maps(kernels, stats, b, k)
        if k == 2:
            fused = kernels.compose_two(x, maps, coarse, self.max_prior, block, self.base_pool)
        else:
            fused = self._compose(x, maps, coarse, block)
        return fused[..., :h, :w]

    def _compiled_block_maps(self, kernels, stats: torch.Tensor, b: int, k: int  # noqa: ANN001
                             ) -> torch.Tensor:
        """:meth:`_block_maps` on the compiled path: for up to :data:`STACKED_HEAD_MAX_SOURCES`
        sources on block grids of up to :data:`STACKED_HEAD_MAX_POSITIONS` the layers as oneDNN
        calls with fused activations and the head as one product (:meth:`_stacked_hidden`,
        weights of :meth:`_fused_layers`); the head's last layer and the logits' bound as
        compiled loops (:func:`scripts.cpu_kernels.conv3x3_taps`, ``bound_logits``)."""
        maps = kernels.with_torch_layers_fallback(
            lambda: self._onednn_or_torch_block_maps(kernels, stats, b, k))
        maps = maps.reshape(b, 2 * k, maps.shape[-2], maps.shape[-1])
        if self.logit_bound > 0:
            maps = kernels.bound_logits(maps, k, self.logit_bound)
        return maps

    def _onednn_or_torch_block_maps(self, kernels, stats: torch.Tensor, b: int,  # noqa: ANN001
                                    k: int) -> torch.Tensor:
        """The block CNN's output before its reshape and bound: the stacked oneDNN head where
        it serves (:data:`STACKED_HEAD_MAX_SOURCES`, :data:`STACKED_HEAD_MAX_POSITIONS`), else
        torch's layers and per-source products (the last layer's tap planes by oneDNN's
        product while its layers are on)."""
        positions = b * stats.shape[-2] * stats.shape[-1]
        if (kernels.onednn_layers() and k <= STACKED_HEAD_MAX_SOURCES
                and positions <= STACKED_HEAD_MAX_POSITIONS):
            layers = self._fused_layers(kernels, k)
            return kernels.conv3x3_taps(self._stacked_hidden(kernels, stats, b, k, layers),
                                        layers.taps, layers.last_bias)
        last = self.head[2]
        return kernels.conv3x3(self._block_hidden(stats, b, k), last.weight, last.bias)

    def _stacked_hidden(self, kernels, stats: torch.Tensor, b: int, k: int,  # noqa: ANN001
                        layers: FusedLayers) -> torch.Tensor:
        """:meth:`_block_hidden` as four oneDNN calls: the encoder's two convolutions with
        their activations, then the head's 1x1 layer for all sources at once on
        ``[f_1, ..., f_K, max_k f_k]`` (a ``(K + 1) C`` vector per block) with its activation;
        returns ``(B, h, w, K C)``, source ``k``'s hidden features in channels ``k C`` to
        ``(k + 1) C``."""
        first, second = self.encoder[0], self.encoder[2]
        features = kernels.conv_leaky(stats, first, self.encoder[1].negative_slope, layers.first)
        features = kernels.conv_leaky(features, second, self.encoder[3].negative_slope,
                                      layers.second)
        hb, wb, width = features.shape[-2], features.shape[-1], features.shape[1]
        feats = features.permute(0, 2, 3, 1).reshape(b, k, hb * wb, width)
        per_source = feats.unbind(1)  # (one operation for the K views)
        most = torch.maximum(*per_source) if k == 2 else feats.amax(dim=1)
        stacked = torch.cat(per_source + (most,), dim=-1)
        hidden = kernels.linear_leaky(stacked.reshape(b * hb * wb, (k + 1) * width),
                                      layers.mixing, layers.bias, self.head[1].negative_slope)
        return hidden.reshape(b, hb, wb, k * width)

    def _fused_layers(self, kernels, k: int) -> FusedLayers:  # noqa: ANN001
        """The weights of :meth:`_stacked_hidden` and of the last layer's tap planes for ``k``
        sources, made once per network, source count and version of the weights.

        Source ``o``'s hidden layer is ``A f_o + B max_j f_j + C / K sum_j f_j + c``, with
        ``[A, B, C]`` the 1x1 layer's weight over ``[own, max, mean]``: so the row block of
        ``o`` holds ``A + C / K`` over ``f_o``, ``C / K`` over every other ``f_j`` and ``B``
        over the maximum. Why: one product of ``(K + 1) C`` by ``K C`` columns (its FLOPs grow
        as ``K (K + 1)`` against ``K + 2``: 1.5x at K = 2) took 0.6x the time of the five small
        products, sums and activation it replaces on a 512^2 pair; the encoder's weights
        reordered once for oneDNN save a reorder per call (~10 us each).

        The cache follows each weight's identity, storage and autograd version (in-place
        updates, ``load_state_dict``, ``.data =``), and is dropped by ``train()``/``eval()`` and
        by moves (``to``, ``half``, ...): so writes that no version counter sees (a fused
        optimizer's step, ``.data.mul_()``) count from the next ``eval()``, as evaluators call
        it; :meth:`drop_fused_layers` drops it at once."""
        # (the layers through their modules' dicts: Sequential's indexing took ~2 us a call)
        encoder, head = self.encoder._modules, self.head._modules
        first, second, mixing_layer, last = encoder["0"], encoder["2"], head["0"], head["2"]
        tensors = (first.weight, first.bias, second.weight, second.bias, mixing_layer.weight,
                   mixing_layer.bias, last.weight, last.bias)
        # (inference tensors, of a network built under inference_mode, have no version counter)
        versions = tuple((-1 if t.is_inference() else t._version, t.data_ptr()) for t in tensors)
        cached = _FUSED_LAYERS.get(self, {}).get(k)
        if (cached is not None and cached[1] == versions
                and all(map(operator.is_, cached[0], tensors))):
            return cached[3]
        with torch.no_grad():
            width = mixing_layer.weight.shape[0]
            mixing = mixing_layer.weight.detach().reshape(width, 3 * width)
            own, most, mean = (mixing[:, :width], mixing[:, width:2 * width],
                               mixing[:, 2 * width:] / k)
            rows = [torch.cat([own + mean if j == o else mean for j in range(k)] + [most], dim=1)
                    for o in range(k)]
            layers = FusedLayers(
                first=kernels.onednn_weight(first), second=kernels.onednn_weight(second),
                mixing=torch.cat(rows, dim=0).contiguous(),
                bias=mixing_layer.bias.detach().repeat(k),
                taps=kernels.tap_matrix(last.weight.repeat(k, 1, 1, 1), k),
                last_bias=last.bias.detach().repeat(k))
        # (the tensors themselves are kept, so a replaced weight is another object, never one
        # whose id was reused; and views of their storage, so a storage replaced through
        # ``.data =`` is another address, never one freed and reused)
        storages = tuple(t.detach() for t in tensors)
        _FUSED_LAYERS.setdefault(self, {})[k] = (tensors, versions, storages, layers)
        return layers

    def drop_fused_layers(self) -> None:
        """Forget the weights :meth:`_fused_layers` made (they are made again at the next
        compiled call)."""
        _FUSED_LAYERS.pop(self, None)

    def train(self, mode: bool = True) -> FusionNet:
        self.drop_fused_layers()  # (a training step may write weights no version counter sees)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 (torch's)
        self.drop_fused_layers()  # moves and casts (to, half, float, ...) replace the weights
        return super()._apply(fn, *args, **kwargs)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` replicate-padded at the bottom and right to :attr:`input_multiple`."""
        h, w = x.shape[2], x.shape[3]
        multiple = max(1 << self.block_exponent, self.base_pool)
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x

    def _block_maps(self, stats: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """The block CNN: per source a selection logit and a detail gain at the block grid,
        ``(B, 2 K, H / block, W / block)`` (logit, gain of source 0, then of source 1, ...),
        from the block statistics of :meth:`_block_stats`."""
        if not torch.jit.is_scripting():  # (hooks are Python-only)
            if self.layers_hooked():
                return self._as_maps(self.head(self._head_input(stats, b, k)), b, k)
        hidden = self._block_hidden(stats, b, k)
        return self._as_maps(self.head[2](hidden.permute(0, 3, 1, 2)), b, k)

    def _block_hidden(self, stats: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """The block CNN up to the head's last layer: its input ``(B * K, h, w, features)``
        (channels-last memory, contiguous in this view)."""
        hb, wb = stats.shape[-2], stats.shape[-1]
        # channels-last (N, C, H, W) is (N, H, W, C) in memory: features are pooled over the
        # sources and concatenated along the last axis of that view, with no layout copies
        feats = self.encoder(stats).permute(0, 2, 3, 1).reshape(b, k, hb, wb, -1)
        # the head's 1x1 layer on [own features, max and mean over the sources] as one matrix
        # product per source plus two shared by all sources (no concatenated copies; the mean's
        # 1 / K folded into the product: 8-10 % faster than a concatenated [max, mean])
        width = feats.shape[-1]
        mixing, bias = self.head[0].weight.reshape(width, 3 * width), self.head[0].bias
        assert bias is not None
        rows = (-1, width)
        shared = torch.addmm(bias, _source_max(feats).reshape(rows),
                             mixing[:, width:2 * width].t())
        shared = torch.addmm(shared, _source_sum(feats).reshape(rows),
                             mixing[:, 2 * width:].t() / k)
        hidden = torch.matmul(feats, mixing[:, :width].t())
        hidden += shared.reshape(b, 1, hb, wb, width)
        return self.head[1](hidden).reshape(b * k, hb, wb, width)

    def _head_input(self, stats: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """The head's input as its modules take it: the encoder's features of each source with
        their maximum and mean over the sources, ``(B * K, 3 C, h, w)`` ([own, max, mean]).
        The plain form of :meth:`_block_hidden` (which folds the pooling into products and
        calls the head's 1x1 layer's weights, not the module)."""
        features = self.encoder(stats)
        per_source = features.reshape(b, k, *features.shape[1:])
        pooled = (per_source.amax(dim=1, keepdim=True).expand_as(per_source),
                  per_source.mean(dim=1, keepdim=True).expand_as(per_source))
        stacked = torch.cat((per_source,) + pooled, dim=2)
        return stacked.reshape(b * k, -1, *features.shape[2:])

    def layers_hooked(self) -> bool:
        """Whether a forward hook or pre-hook is registered on the block CNN's modules (the
        encoder, the head and their layers) or on every module (``torch.nn.modules.module``'s
        global hooks). Such a call runs each of those modules as a module, so the hooks see
        their inputs and outputs (feature maps for a visualisation, say): the compiled path and
        the torch path's folded head call their weights directly, and hooks would not run."""
        if _GLOBAL_HOOKS and any(_GLOBAL_HOOKS):
            return True
        encoder, head = self.encoder, self.head
        return any(module._forward_hooks or module._forward_pre_hooks
                   for module in (encoder, head, *encoder._modules.values(),
                                  *head._modules.values()))

    def _as_maps(self, last: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """The head's last layer's ``(B * K, 2, h, w)`` output as the block maps
        ``(B, 2 K, h, w)``, the logits bounded where :attr:`logit_bound` says so."""
        maps = last.contiguous().reshape(b, k * 2, last.shape[-2], last.shape[-1])
        return self._bounded(maps, b, k) if self.logit_bound > 0 else maps

    def _bounded(self, maps: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """``maps`` with each block's selection logits centred on their mean over the sources
        and bounded by :attr:`logit_bound` (``L tanh(l / L)``); the gains as they are."""
        pairs = maps.reshape(b, k, 2, maps.shape[-2], maps.shape[-1])
        logits = pairs[:, :, 0]
        centred = logits - _source_sum(logits) / k
        bounded = self.logit_bound * torch.tanh(centred / self.logit_bound)
        return torch.stack([bounded, pairs[:, :, 1]], dim=2).reshape(maps.shape)

    def _compose(self, x: torch.Tensor, maps: torch.Tensor, coarse: torch.Tensor, block: int
                 ) -> torch.Tensor:
        """The fused image in [0, 1] from the (padded) sources, the block maps and the base
        layer's block means: both upsampled bilinearly to pixels, then :func:`combine_sources`."""
        b, k, hp, wp = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        if block == self.base_pool:  # one upsampling pass for the maps and the base layer
            up = upsample_bilinear(torch.cat([maps, coarse], dim=1), block)
            maps, base = up[:, : 2 * k], up[:, 2 * k :]
        else:
            base = upsample_bilinear(coarse, self.base_pool)
            if block > 1:
                maps = upsample_bilinear(maps, block)
        maps = maps.reshape(b, k, 2, hp, wp)
        fused = combine_sources(x, base, maps[:, :, 0], maps[:, :, 1], self.max_prior)
        return fused.clamp(0.0, 1.0)

    def _block_stats(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block CNN's input, ``(B * K, 2, H / block, W / block)`` channels-last: each
        block's mean and spread ``sqrt(mean(x^2) - mean^2)``; and the base layer's
        ``base_pool`` means ``(B, K, H / base_pool, W / base_pool)``."""
        b, k = x.shape[0], x.shape[1]
        mean, square, coarse = self._pooled(x, block)
        if block > 1:
            spread = (square - mean * mean).clamp_min(0.0).sqrt()
        else:  # one pixel per block: no spread (and no sqrt at 0, whose gradient is NaN)
            spread = torch.zeros_like(x)
        stats = torch.stack([mean, spread], dim=2)
        stats = stats.reshape(b * k, self.stats, stats.shape[-2], stats.shape[-1])
        return stats.contiguous(memory_format=torch.channels_last), coarse

    def _pooled(self, x: torch.Tensor, block: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block means of ``x`` and ``x^2`` (``x`` itself, unused, at one pixel per block) and
        the base layer's ``base_pool`` means. Each full-resolution image is pooled once: the
        coarser of the two grids is pooled from the finer one's means (a mean of equal-size
        block means is the mean), and ``x^2`` on its own (a concatenated copy cost more)."""
        fine = min(block, self.base_pool)
        mean = F.avg_pool2d(x, fine) if fine > 1 else x
        square = F.avg_pool2d(x * x, fine) if fine > 1 else x
        if block > fine:  # blocks coarser than the base layer's grid
            return (F.avg_pool2d(mean, block // fine), F.avg_pool2d(square, block // fine),
                    mean)
        coarse = mean if fine == self.base_pool else F.avg_pool2d(mean, self.base_pool // fine)
        return mean, square, coarse

    def inference_path(self, x: torch.Tensor) -> str:
        """Which code a call on ``x`` in the current grad mode runs: "compiled" (the CPU loops
        of :mod:`scripts.cpu_kernels`) or "torch"; it loads nothing (numba counts as usable
        until an import of it failed). An inference backend that times itself against this
        module (MedFusion's ``auto``, which asks under ``inference_mode`` as it calls) decides
        each path apart: the compiled loops can be several times faster than the torch code."""
        return "compiled" if self._compiled_cpu_path(x, load=False) else "torch"

    def _compiled_cpu_path(self, x: torch.Tensor, load: bool = True) -> bool:
        """Whether this call runs the full-resolution passes as compiled CPU loops
        (:mod:`scripts.cpu_kernels`): float32 inference on the CPU with gradients off
        (``torch.no_grad`` or ``inference_mode``, as the methods call it), no autocast, not
        traced, exported or compiled, numba importable, ``compiled_cpu_kernels`` left on, and
        either numba already loaded or a call of at least :data:`COMPILED_MIN_SOURCE_PIXELS`
        (``load``: import the loops now if they are needed, else only say whether they would
        serve)."""
        if not self.compiled_cpu_kernels or x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return False
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if self.layers_hooked():
            return False  # (the compiled path calls the layers' weights, not the modules)
        if x.numel() < COMPILED_MIN_SOURCE_PIXELS and "numba" not in sys.modules:
            return False  # a small job: numba's start would cost more than its loops save
        if not load:  # (``load=False``: say so without importing them)
            return _KERNELS[0] is not None if _KERNELS else find_spec("numba") is not None
        return _cpu_kernels() is not None


_KERNELS: list = []  # the cpu_kernels module once imported, or None where it cannot be
_KERNELS_LOCK = threading.Lock()


_LOADING_AT_FORK = [False]


def _note_loading_before_fork() -> None:
    _LOADING_AT_FORK[0] = _KERNELS_LOCK.locked()


def _new_kernels_lock() -> None:
    """A fresh loading lock in a forked child. A fork while another thread loaded the loops (a
    DataLoader worker started during the first load) left the child's copy of the lock held
    forever; and the import the loader was in (numba's, or the loops' module) stays locked in
    the child too, its thread gone. So such a child does not load them at all: its network
    runs the torch code (the same image to float32 rounding)."""
    global _KERNELS_LOCK
    _KERNELS_LOCK = threading.Lock()
    if _LOADING_AT_FORK[0] and not _KERNELS:
        _KERNELS.append(None)


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(before=_note_loading_before_fork, after_in_child=_new_kernels_lock)


def _cpu_kernels():  # noqa: ANN202 (a module or None)
    """:mod:`scripts.cpu_kernels`, imported on first use; None (once, logged) where numba is not
    installed or cannot load them (e.g. no writable folder for its cache): the torch code then
    serves every call.

    Loaded from this file's folder, and put back in ``sys.modules`` under its name at every
    call where that name is free: bundles all call their code ``scripts``, and a process that
    loads another bundle after this one (MedFusion drops the other ``scripts`` modules then;
    its report runs the sesf bundle beside this one) must still find these loops. numba reads a
    loop's cached machine code on its first call with new argument types and then imports the
    loop's module by name; that import failed there (``No module named 'scripts.cpu_kernels'``)."""
    if not _KERNELS:
        with _KERNELS_LOCK:  # (one thread loads them; the others wait for the whole module)
            if not _KERNELS:
                try:
                    cpu_kernels = _load_kernels()
                except Exception as error:  # ImportError, numba's RuntimeError, OSError
                    logging.getLogger(__name__).info(
                        "compiled CPU loops unavailable (%s: %s); the network runs its torch "
                        "code", type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "")
                    cpu_kernels = None
                _KERNELS.append(cpu_kernels)
    kernels = _KERNELS[0]
    if kernels is not None and sys.modules.get(kernels.__name__) is None:
        sys.modules[kernels.__name__] = kernels
    return kernels


def _kernels_name() -> str:
    """The name this bundle's ``cpu_kernels`` module has in ``sys.modules``."""
    return f"{__package__}.cpu_kernels" if __package__ else "cpu_kernels"


def _load_kernels():  # noqa: ANN202 (a module)
    """This bundle's ``cpu_kernels`` module: the one in ``sys.modules`` if it is this folder's,
    else executed from this folder's file (whatever package holds the name ``scripts`` now)."""
    name = _kernels_name()
    path = Path(__file__).resolve().with_name("cpu_kernels.py")
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (numba's cache reads it back by name while it compiles)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if sys.modules.get(name) is module:
            del sys.modules[name]
        raise
    return module


def upsample_bilinear(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)`` for an
    integer ``scale``, as two matrix products with three columns of weights.

    Output pixel ``scale * j + r`` mixes cells ``j - 1, j, j + 1`` of the edge-padded input with
    weights that depend on the phase ``r`` only, first along the width, then the height. Why:
    the same numbers (to float rounding) in 10-20 % less time than ONNX Runtime's Resize for the
    network's maps (torch's own kernel: about the same).
    """
    n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    offset = (torch.arange(scale, dtype=x.dtype, device=x.device) + 0.5) / scale - 0.5
    before = offset < 0  # phases left of their cell's centre mix it with the cell before
    zero = torch.zeros_like(offset)
    weights = torch.stack([torch.where(before, -offset, zero),
                           torch.where(before, 1.0 + offset, 1.0 - offset),
                           torch.where(before, zero, offset)], dim=1)  # (scale, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    columns = torch.stack([padded[..., 0:w], padded[..., 1:w + 1], padded[..., 2:w + 2]], dim=-1)
    wide = torch.matmul(columns, weights.t()).reshape(n, c, h + 2, w * scale)
    rows = torch.stack([wide[:, :, 0:h], wide[:, :, 1:h + 1], wide[:, :, 2:h + 2]], dim=-2)
    return torch.matmul(weights, rows).reshape(n, c, h * scale, w * scale)


def combine_sources(x: torch.Tensor, base: torch.Tensor, logit: torch.Tensor, gain: torch.Tensor,
                    max_prior: torch.Tensor) -> torch.Tensor:
    """The fused image ``(B, 1, H, W)`` from the sources ``x``, their base layers and the
    upsampled selection logits and detail gains (all ``(B, K, H, W)``)::

        F = sum_k w_k x_k + s_k (1 - w_k) d_k,  w = softmax_k(logit_k + max_prior * x_k),
        d_k = x_k - base_k,  s_k = sigmoid(gain_k)

    (c_k = w_k + (1 - w_k) s_k: the unselected share of source k's detail comes back as much as
    s_k says). Computed as ``sum_k s_k d_k + sum_k w_k (x_k - s_k d_k)`` with the softmax
    written pairwise, ``w_k = 1 / sum_j exp(z_j - z_k)``, and every sum over the sources a matrix
    product. Why: ONNX Runtime's Softmax and ReduceSum over the source axis took 5-10x longer
    than matrix products, and the ReduceMax over sources that a max-shifted softmax needs was its
    slowest node (1.1 ms of a 512^2 slice); the pairwise form needs no maximum and stays exact
    where the trained logits lie ~100 apart: the j = k term is 1, so the sum never vanishes, and
    an overflowing exp gives w_k = 1 / inf = 0, the right limit. It costs K^2 instead of K
    exponentials; two sources take the shorter :func:`_combine_two_sources`.
    """
    if x.shape[1] == 2:
        return _combine_two_sources(x, base, logit, gain, max_prior)
    logits = torch.addcmul(logit, max_prior, x)
    pairwise = torch.exp(logits.unsqueeze(1) - logits.unsqueeze(2))  # [k, j] = exp(z_j - z_k)
    totals = _source_sum(pairwise.flatten(0, 1))  # sum over j, one row per (batch, k)
    weights = torch.reciprocal(totals).reshape(x.shape)
    kept_detail = torch.sigmoid(gain) * (x - base)  # s_k d_k
    return _source_sum(kept_detail) + _source_sum(weights * (x - kept_detail))


def _combine_two_sources(x: torch.Tensor, base: torch.Tensor, logit: torch.Tensor,
                         gain: torch.Tensor, max_prior: torch.Tensor) -> torch.Tensor:
    """:func:`combine_sources` for two sources in fewer full-resolution passes: the softmax of
    two logits is ``w_0 = sigmoid(z_0 - z_1)``, ``w_1 = 1 - w_0``, so::

        F = a + w_0 (b - a),  a = x_1 + s_0 d_0,  b = x_0 + s_1 d_1

    (one sigmoid instead of four exponentials, no sums over the sources; the same numbers to
    float rounding, and exact 0 / 1 weights where the logits lie far apart). Why: the network's
    time on a 512^2 slice is mostly such full-resolution passes, not its convolutions. An
    exported graph holds one branch: :mod:`medfusion.methods.backend` exports per source count.
    """
    kept_detail = torch.sigmoid(gain) * (x - base)  # s_k d_k
    first, second = x[:, 0:1], x[:, 1:2]
    keep_second = second + kept_detail[:, 0:1]  # w_0 = 0: source 1 and source 0's detail
    keep_first = first + kept_detail[:, 1:2]
    difference = torch.addcmul(logit[:, 0:1] - logit[:, 1:2], max_prior, first - second)
    return torch.addcmul(keep_second, torch.sigmoid(difference), keep_first - keep_second)


def _source_max(values: torch.Tensor) -> torch.Tensor:
    """Maximum of ``(B, K, ...)`` over the K sources as ``(B, 1, ...)``; for two sources an
    elementwise maximum (ONNX Runtime's ReduceMax over that axis took ~0.3 ms on the 64x64x24
    features of a 512^2 slice, the elementwise Max a quarter of that)."""
    if values.shape[1] == 2:
        return torch.maximum(values[:, 0:1], values[:, 1:2])
    return values.amax(dim=1, keepdim=True)


def _source_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``(B, K, ...)`` over the K sources as ``(B, 1, ...)``: for two sources an
    elementwise sum, else a matrix product (ONNX Runtime's ReduceSum over that axis was slow)."""
    if values.shape[1] == 2:
        return values[:, 0:1] + values[:, 1:2]
    b, k = values.shape[0], values.shape[1]
    total = torch.matmul(values.new_ones((1, k)), values.reshape(b, k, -1))
    return total.reshape([b, 1] + list(values.shape[2:]))


def check_block_exponent(value: object) -> int:
    """``value`` as a valid block exponent ``i`` (an integer 0..6), else ``ValueError``."""
    not_an_integer = ValueError(f"block exponent must be an integer 0..{MAX_BLOCK_EXPONENT}, "
                                f"got {value!r}")
    try:
        exponent = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise not_an_integer from None
    # True == 1, but a flag is no exponent; 2.5 or "2.5" is no integer
    if isinstance(value, bool) or (
            exponent != value and not (isinstance(value, str) and value.strip() == str(exponent))):
        raise not_an_integer
    if not 0 <= exponent <= MAX_BLOCK_EXPONENT:
        raise ValueError(f"block exponent must be in 0..{MAX_BLOCK_EXPONENT}, got {exponent}")
    return exponent


def set_block_exponent(network: nn.Module, exponent: int) -> None:
    """Switch a built network to blocks of ``2^exponent`` pixels (same weights)."""
    network.block_exponent = check_block_exponent(exponent)
