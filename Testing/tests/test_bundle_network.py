"""The bundle's FusionNet itself: its fused-image formula and its gradients at every block size."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import numba  # (loaded: the network's compiled CPU loops then serve calls of any size)
import numpy as np
import pytest
import torch

from medfusion.methods import get_method


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    """The shipped bundle's network, loaded as the cnn method loads it."""
    return get_method("cnn").module


def _softmax_form(x, base, logit, gain, max_prior):
    """The documented formula, written the plain way: F = sum_k w_k x_k + s_k (1 - w_k) d_k."""
    weights = torch.softmax(logit + max_prior * x, dim=1)
    share = torch.sigmoid(gain)
    detail = x - base
    return (weights * x + share * (1 - weights) * detail).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("sources", [2, 3, 5])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0, 200.0])
def test_combination_is_the_softmax_formula(network, sources: int, logit_scale: float) -> None:
    """The matrix-product form equals the softmax form, also where logits differ by hundreds
    (there the capped exponent must still give the selected source weight 1)."""
    combine = sys.modules[type(network).__module__].combine_sources
    generator = torch.Generator().manual_seed(sources)
    shape = (2, sources, 17, 23)
    x, base = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    logit = (torch.rand(shape, generator=generator) - 0.5) * logit_scale
    gain = torch.randn(shape, generator=generator) * 3
    prior = network.max_prior.detach()
    fused = combine(x, base, logit, gain, prior)
    assert fused.shape == (2, 1, 17, 23)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, _softmax_form(x, base, logit, gain, prior),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("exponent", range(7))
def test_gradients_are_finite_at_every_block_exponent(network, exponent: int) -> None:
    """Training can use any block exponent: at i = 0 (one pixel per block) the spread statistic
    once went through sqrt(0), whose gradient is NaN."""
    net = copy.deepcopy(network).train()
    sys.modules[type(net).__module__].set_block_exponent(net, exponent)
    x = torch.rand(2, 2, 64, 48, requires_grad=True)
    net(x).mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("scale", [2, 4, 8, 64])
def test_upsampling_is_torch_bilinear(network, scale: int) -> None:
    """The network's matrix-product upsampling gives torch's bilinear (align_corners=False)
    result, edges included, on odd sizes."""
    upsample = sys.modules[type(network).__module__].upsample_bilinear
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(scale))
    expected = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(upsample(x, scale), expected, atol=1e-6, rtol=0)


def _kernels(network):
    kernels = sys.modules[type(network).__module__]._cpu_kernels()
    assert kernels is not None, "numba is a dependency of medfusion: the compiled path must load"
    return kernels


def _both_paths(network, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output on ``x`` with its compiled CPU loops and with its torch code."""
    net = copy.deepcopy(network)
    with torch.inference_mode():
        assert net._compiled_cpu_path(x)
        compiled = net(x)
        net.compiled_cpu_kernels = False
        assert not net._compiled_cpu_path(x)
        return compiled, net(x)


@pytest.mark.parametrize("fused", [True, False], ids=["onednn-layers", "torch-layers"])
@pytest.mark.parametrize("exponent", range(7))
@pytest.mark.parametrize("shape", [(1, 2, 96, 128), (3, 2, 37, 53), (2, 3, 40, 72)])
def test_compiled_cpu_path_gives_the_torch_codes_image(network, exponent: int, shape,
                                                       fused: bool, monkeypatch) -> None:
    """Inference on the CPU runs the full-resolution passes as compiled loops
    (scripts/cpu_kernels.py); at every block exponent, on sizes that need padding, for batches
    and for three sources (compiled statistics, torch combination) the fused image is the torch
    code's within float32 rounding (the head's last layer sums its taps in another order than
    oneDNN, on selection logits in the hundreds: up to ~4e-5 on these inputs; 1e-4 is the
    backends' tolerance); with the block CNN's layers as oneDNN calls and the stacked head
    (as shipped where torch has them) and with torch's layers."""
    kernels = _kernels(network)
    if fused and not kernels.ONEDNN_LAYERS:
        pytest.skip("this torch has no oneDNN layers with fused activations")
    monkeypatch.setattr(kernels, "ONEDNN_LAYERS", fused)
    net = copy.deepcopy(network)
    sys.modules[type(net).__module__].set_block_exponent(net, exponent)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(exponent))
    compiled, reference = _both_paths(net, x)
    assert compiled.shape == reference.shape == (shape[0], 1, shape[2], shape[3])
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2, 64, 64, 24), (3, 1, 5, 24), (1, 7, 1, 8), (4, 2, 2, 3)])
def test_compiled_conv3x3_is_torchs(network, shape) -> None:
    """The compiled path's 3x3 convolution (tap planes by one matrix product, summed shifted
    with zeros beyond the edges) is torch's ``conv2d`` with padding 1, on maps down to one row
    or column."""
    generator = torch.Generator().manual_seed(shape[1] * shape[2])
    features = torch.randn(shape, generator=generator)
    weight = torch.randn(2, shape[3], 3, 3, generator=generator)
    bias = torch.randn(2, generator=generator)
    out = _kernels(network).conv3x3(features, weight, bias)
    expected = torch.nn.functional.conv2d(features.permute(0, 3, 1, 2), weight, bias, padding=1)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_conv3x3_is_torchs(network, groups: int) -> None:
    """The tap planes of a grouped 3x3 convolution (block-diagonal tap matrix: each group's
    outputs read its own inputs only) are torch's grouped ``conv2d``."""
    generator = torch.Generator().manual_seed(groups)
    features = torch.randn(2, 9, 11, 8 * groups, generator=generator)
    weight = torch.randn(2 * groups, 8, 3, 3, generator=generator)
    bias = torch.randn(2 * groups, generator=generator)
    out = _kernels(network).conv3x3(features, weight, bias, groups=groups)
    expected = torch.nn.functional.conv2d(features.permute(0, 3, 1, 2), weight, bias, padding=1,
                                          groups=groups)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["onednn-layers", "torch-layers"])
def test_fused_layers_are_torchs_layers(network, fused: bool, monkeypatch) -> None:
    """The compiled path's convolution and 1x1 layer with their activation in one call (oneDNN
    where torch has it, with the encoder's weight reordered once or as it is; torch's layers
    otherwise), and its product by a transposed matrix, against torch's modules."""
    kernels = _kernels(network)
    if fused and not kernels.ONEDNN_LAYERS:
        pytest.skip("this torch has no oneDNN layers with fused activations")
    monkeypatch.setattr(kernels, "ONEDNN_LAYERS", fused)
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for conv in network.encoder[0], network.encoder[2]:
            x = torch.rand(3, conv.in_channels, 21, 34, generator=generator)
            x = x.contiguous(memory_format=torch.channels_last)
            expected = torch.nn.functional.leaky_relu(conv(x), 0.1)
            for weight in None, kernels.onednn_weight(conv):
                torch.testing.assert_close(kernels.conv_leaky(x, conv, 0.1, weight), expected,
                                           atol=1e-5, rtol=1e-5)
        x, weight = torch.randn(37, 72, generator=generator), torch.randn(48, 72,
                                                                          generator=generator)
        bias = torch.randn(48, generator=generator)
        torch.testing.assert_close(kernels.linear_leaky(x, weight, bias, 0.1),
                                   torch.nn.functional.leaky_relu(x @ weight.t() + bias, 0.1),
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(kernels.times_transposed(weight, x), weight @ x.t(),
                                   atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="zero-padded"):
        kernels.conv_leaky(x, torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 0.1)


@pytest.mark.parametrize("sources", [2, 3, 4, 5])
def test_stacked_head_gives_the_per_source_block_maps(network, sources: int) -> None:
    """The block CNN on the compiled path with oneDNN layers and the head as one stacked product
    (up to STACKED_HEAD_MAX_SOURCES sources; more take the per-source products) gives the block
    maps of torch's layers and per-source products, also after the weights change: in place
    (their versions), through ``.data`` (seen at the next ``eval()``, as evaluators call it) and
    by a cast there and back (the cache is dropped by moves)."""
    kernels = _kernels(network)
    if not kernels.ONEDNN_LAYERS:
        pytest.skip("this torch has no oneDNN layers with fused activations")
    module = sys.modules[type(network).__module__]
    net = copy.deepcopy(network)
    x = torch.rand(2, sources, 64, 96, generator=torch.Generator().manual_seed(sources))
    block = 1 << net.block_exponent
    stacked = sources <= module.STACKED_HEAD_MAX_SOURCES

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            stats, _ = kernels.block_stats(x, block, net.base_pool)
            fused = net._compiled_block_maps(kernels, stats, 2, sources)
            assert (sources in module._FUSED_LAYERS.get(net, {})) == stacked
            with kernels.torch_layers():
                plain = net._compiled_block_maps(kernels, stats, 2, sources)
        return fused, plain

    fused, plain = both()
    assert fused.shape == (2, 2 * sources, 64 // block, 96 // block)
    torch.testing.assert_close(fused, plain, atol=2e-4, rtol=1e-5)
    previous = fused
    for change in ("in place", ".data", "cast"):
        with torch.no_grad():
            for layer in net.encoder[2], net.head[0], net.head[2]:
                if change == "in place":
                    layer.weight.mul_(-0.5)
                elif change == ".data":
                    layer.weight.data.mul_(-0.5)  # (no version counter sees this)
        if change == ".data":
            net.eval()
        elif change == "cast":
            net.double().float()
            with torch.no_grad():
                net.head[2].weight.data.mul_(-0.5)  # (and the cast alone changes no value)
            net.eval()
        changed, plain_changed = both()
        torch.testing.assert_close(changed, plain_changed, atol=2e-4, rtol=1e-5, msg=change)
        assert (changed - previous).abs().max() > 1e-2, change  # the new weights were used
        previous = changed


def test_stacked_head_only_on_small_block_grids(network) -> None:
    """Calls of more than STACKED_HEAD_MAX_POSITIONS block positions (i = 0 on a 512^2 pair)
    keep the per-source products, with the same maps as torch's layers."""
    kernels = _kernels(network)
    module = sys.modules[type(network).__module__]
    net = copy.deepcopy(network)
    x = torch.rand(1, 2, 512, 512, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        stats, _ = kernels.block_stats(x, 1, net.base_pool)
        assert stats.shape[-2] * stats.shape[-1] > module.STACKED_HEAD_MAX_POSITIONS
        maps = net._compiled_block_maps(kernels, stats, 1, 2)
        assert net not in module._FUSED_LAYERS
        reference = net._block_maps(stats, 1, 2)
    torch.testing.assert_close(maps, reference, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize(("refused", "sources"), [("conv_leaky", 2), ("times_transposed", 2),
                                                  ("times_transposed", 5)])
def test_a_fused_layer_that_fails_gives_way_to_torchs_layers(network, monkeypatch, refused: str,
                                                             sources: int) -> None:
    """Where a oneDNN build refuses one of its operations at run time (an encoder layer on the
    stacked path; the tap planes' product, which the per-source path of five sources also
    uses), the call and every later one run torch's layers (the same image) instead of
    failing the fusion; an error that torch's layers raise too is raised, the layers kept."""
    kernels = _kernels(network)
    if not kernels.ONEDNN_LAYERS:
        pytest.skip("this torch has no oneDNN layers with fused activations")
    monkeypatch.setattr(kernels, "ONEDNN_LAYERS", True)
    shipped = getattr(kernels, refused)

    def refuse(*args, **kwargs):
        if kernels.ONEDNN_LAYERS:
            raise RuntimeError("could not create a primitive descriptor")
        return shipped(*args, **kwargs)

    net = copy.deepcopy(network)
    x = torch.rand(1, sources, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = net(x)
        monkeypatch.setattr(kernels, refused, refuse)
        assert torch.equal(net(x), _torch_layers(net, kernels, x))
        assert not kernels.ONEDNN_LAYERS
        torch.testing.assert_close(net(x), expected, atol=2e-4, rtol=0)
        kernels.ONEDNN_LAYERS = True

        def broken(*args, **kwargs):
            raise RuntimeError("not oneDNN's doing")

        monkeypatch.setattr(kernels, "conv3x3_taps", broken)  # (both paths call it)
        with pytest.raises(RuntimeError, match="not oneDNN's doing"):
            net(x)
        assert kernels.ONEDNN_LAYERS


def test_a_network_built_under_inference_mode_keeps_the_fused_layers(network) -> None:
    """Weights made under ``inference_mode`` have no version counter: the fused layers' cache
    reads their identity and address alone (reading the version raised, and that error turned
    the fused layers off for the process)."""
    kernels = _kernels(network)
    if not kernels.ONEDNN_LAYERS:
        pytest.skip("this torch has no oneDNN layers with fused activations")
    module = sys.modules[type(network).__module__]
    with torch.inference_mode():
        net = copy.deepcopy(network)
        for parameter in net.parameters():
            parameter.data = parameter.data.clone()  # (inference tensors)
        assert net.head[0].weight.is_inference()
        x = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(7))
        fused = net(x)
        assert 2 in module._FUSED_LAYERS.get(net, {}) and kernels.ONEDNN_LAYERS
        torch.testing.assert_close(fused, _torch_layers(net, kernels, x), atol=2e-4, rtol=0)


def _torch_layers(net, kernels, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` on the compiled path with torch's layers."""
    with kernels.torch_layers():
        return net(x)


def test_two_threads_loading_the_compiled_loops_at_once_both_get_them() -> None:
    """The first compiled calls of two threads at once, in a fresh process: one loads the loops,
    the other waits for the whole module (it used to see a half-executed one)."""
    script = textwrap.dedent("""
        import sys, threading, numba, torch
        from medfusion.methods.bundle import use_bundle_scripts
        from medfusion.resources import bundle_dir
        use_bundle_scripts(bundle_dir())
        from scripts.network import FusionNet
        net = FusionNet(block_exponent=3).eval()
        x = torch.rand(1, 2, 64, 64)
        barrier, errors = threading.Barrier(2), []
        def fuse():
            barrier.wait()
            try:
                with torch.inference_mode():
                    net(x)
            except Exception as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=fuse) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(errors, sys.modules[type(net).__module__]._KERNELS[0] is not None)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[] True", result.stdout


def test_a_child_forked_while_the_loops_load_runs_the_torch_code() -> None:
    """A fork while another thread is inside the first load of the compiled loops (a
    DataLoader worker started then): the child fuses, with the torch code, instead of waiting
    forever on the loading lock or on the import the dead loader thread held (numba's)."""
    script = textwrap.dedent("""
        import os, sys, threading, time, torch
        from medfusion.methods.bundle import use_bundle_scripts
        from medfusion.resources import bundle_dir
        use_bundle_scripts(bundle_dir())
        from scripts.network import FusionNet
        torch.set_num_threads(1)
        net = FusionNet(block_exponent=3).eval()
        network = sys.modules[type(net).__module__]
        x = torch.rand(1, 2, 512, 512, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = net(x)  # (a call below the size limit: torch code, numba not loaded)
        assert "numba" not in sys.modules and not network._KERNELS
        loader = threading.Thread(target=network._cpu_kernels)
        loader.start()
        while "numba" not in sys.modules:  # the loader is inside numba's import now
            time.sleep(0.001)
        pid = os.fork()
        if pid == 0:
            with torch.inference_mode():
                same = torch.allclose(net(x), expected, atol=1e-4, rtol=0)
            os._exit(0 if same and network._KERNELS == [None] else 3)
        _, status = os.waitpid(pid, 0)
        loader.join()
        print(os.waitstatus_to_exitcode(status), network._KERNELS[0] is not None)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "0 True", result.stdout + result.stderr[-2000:]


def test_hooks_on_the_block_cnns_layers_run_and_see_the_same_image(network) -> None:
    """Forward hooks on the encoder, the head or any of their layers (and global module hooks)
    take the call off the compiled path and the folded head: every hooked module runs as a
    module, once per call, and the fused image is the unhooked one (to float32 rounding)."""
    net = copy.deepcopy(network)
    x = torch.rand(1, 2, 512, 512, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain = net(x)
        assert net._compiled_cpu_path(x)
    seen: dict[str, list] = {}
    modules = dict(net.named_modules())
    names = [name for name in modules if name.startswith(("encoder", "head"))]
    handles = [modules[name].register_forward_hook(
        lambda module, args, out, name=name: seen.setdefault(name, []).append(out.shape))
        for name in names]
    with torch.inference_mode():
        assert not net._compiled_cpu_path(x)
        hooked = net(x)
    assert sorted(seen) == sorted(names) and all(len(v) == 1 for v in seen.values()), seen
    grid = 512 >> net.block_exponent
    assert seen["head.0"][0] == (2, 24, grid, grid)  # (B K, C, h, w)
    torch.testing.assert_close(hooked, plain, atol=1e-4, rtol=0)  # (the backends' tolerance)
    for handle in handles:
        handle.remove()
    pre = net.head[0].register_forward_pre_hook(lambda module, args: seen.clear())
    assert net.layers_hooked()
    pre.remove()
    assert not net.layers_hooked()
    calls: list = []
    every = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module).__name__))
    try:
        assert net.layers_hooked()
        with torch.inference_mode():
            torch.testing.assert_close(net(x), plain, atol=1e-4, rtol=0)
    finally:
        every.remove()
    assert calls.count("Conv2d") == 4 and not net.layers_hooked()
    with torch.inference_mode():
        assert net._compiled_cpu_path(x)


@pytest.mark.parametrize("exponent", range(7))
def test_compiled_block_statistics_are_torchs(network, exponent: int) -> None:
    """The block means (and the base layer's means) are torch's avg_pool2d to the bit, summed
    in its order: a flat block's spread is a difference of rounded numbers, and another order
    moved the fused image by up to 1e-3. The spread is within one float32 step."""
    block = 1 << exponent
    x = torch.rand(2, 3, 128, 64, generator=torch.Generator().manual_seed(block))
    x[:, :, :32] = 0.7  # flat blocks: spreads near 0
    stats, coarse = _kernels(network).block_stats(x, block, network.base_pool)
    expected_stats, expected_coarse = network._block_stats(x, block)
    assert stats.shape == expected_stats.shape
    assert stats.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(coarse, expected_coarse)
    assert torch.equal(stats[:, 0], expected_stats[:, 0])
    torch.testing.assert_close(stats[:, 1], expected_stats[:, 1], atol=0, rtol=1.2e-7)


@pytest.mark.parametrize("logit_scale", [1.0, 30.0, 200.0])
def test_compiled_combination_is_the_torch_formula(network, logit_scale: float) -> None:
    """Upsampling and two-source combination in one compiled loop, against the torch code on
    random block maps, also where the logits lie hundreds apart (weights exactly 0 and 1)."""
    module = sys.modules[type(network).__module__]
    generator = torch.Generator().manual_seed(int(logit_scale))
    x = torch.rand(2, 2, 64, 96, generator=generator)
    coarse = torch.rand(2, 2, 16, 24, generator=generator)
    prior = network.max_prior.detach()
    for block in (1, 2, 4, 8, 16):
        maps = torch.randn(2, 4, 64 // block, 96 // block, generator=generator) * logit_scale
        fused = _kernels(network).compose_two(x, maps, coarse, prior, block, 4)
        up = module.upsample_bilinear(maps, block) if block > 1 else maps
        up = up.reshape(2, 2, 2, 64, 96)
        expected = module.combine_sources(x, module.upsample_bilinear(coarse, 4), up[:, :, 0],
                                          up[:, :, 1], prior).clamp(0.0, 1.0)
        torch.testing.assert_close(fused, expected, atol=2e-5, rtol=0)


def test_compiled_combination_leaves_out_dead_details_only(network, monkeypatch) -> None:
    """Where every gain's sigmoid is below ``DEAD_GAIN_SIGMOID`` (the shipped weights') the
    compiled loop combines the selection alone: the torch formula's image to float32 rounding,
    and the full loop's; live gains, or a NaN gain, keep the detail terms."""
    module = sys.modules[type(network).__module__]
    kernels = _kernels(network)
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(1, 2, 64, 64, generator=generator)
    x[:, :, :16] = 0.0  # black rows: a detail term of 1e-13 would show there
    coarse = torch.rand(1, 2, 16, 16, generator=generator)
    prior = network.max_prior.detach()
    maps = torch.randn(1, 4, 8, 8, generator=generator) * 20.0
    maps[:, 1::2] = -30.0 - 10.0 * torch.rand(1, 2, 8, 8, generator=generator)
    assert kernels._largest_gain_sigmoid(maps.numpy()) < kernels.DEAD_GAIN_SIGMOID
    up = module.upsample_bilinear(maps, 8).reshape(1, 2, 2, 64, 64)
    expected = module.combine_sources(x, module.upsample_bilinear(coarse, 4), up[:, :, 0],
                                      up[:, :, 1], prior).clamp(0.0, 1.0)
    selection = kernels.compose_two(x, maps, coarse, prior, 8, 4)
    torch.testing.assert_close(selection, expected, atol=2e-5, rtol=0)
    monkeypatch.setattr(kernels, "DEAD_GAIN_SIGMOID", -1.0)  # every gain counts as live
    full = kernels.compose_two(x, maps, coarse, prior, 8, 4)
    torch.testing.assert_close(selection, full, atol=1e-7, rtol=0)
    monkeypatch.undo()

    live = maps.clone()
    live[0, 3] = 0.0  # source 1's details re-injected by half where source 0 is selected
    up = module.upsample_bilinear(live, 8).reshape(1, 2, 2, 64, 64)
    expected = module.combine_sources(x, module.upsample_bilinear(coarse, 4), up[:, :, 0],
                                      up[:, :, 1], prior).clamp(0.0, 1.0)
    fused = kernels.compose_two(x, live, coarse, prior, 8, 4)
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=0)
    assert (fused - selection).abs().max() > 1e-3
    live[0, 1, 0, 0] = float("nan")
    assert math.isnan(kernels._largest_gain_sigmoid(live.numpy()))


@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("with_detail", [False, True])
def test_row_bands_give_the_serial_loops_result_to_the_bit(network, parts: int,
                                                           with_detail: bool) -> None:
    """The two full-resolution loops split into row bands run in parallel (``_compose_bands``,
    ``_moments_bands``) write every row as the serial loop does, also where the bands split an
    image or a batch unevenly and a band starts between two block rows."""
    kernels = _kernels(network)
    generator = torch.Generator().manual_seed(parts)
    x = torch.rand(3, 2, 72, 40, generator=generator).numpy()  # 216 rows over 3 images
    maps = (torch.randn(3, 4, 9, 5, generator=generator) * 20.0).numpy()
    coarse = torch.rand(3, 2, 18, 10, generator=generator).numpy()
    prior = np.float32(network.max_prior.detach())  # the loops' float32 signature
    serial, banded = np.full((3, 1, 72, 40), -1.0, np.float32), np.full((3, 1, 72, 40), -1.0,
                                                                        np.float32)
    kernels._compose_rows(x, maps, coarse, prior, 8, 4, with_detail, serial, 0, 3 * 72)
    kernels._compose_bands(x, maps, coarse, prior, 8, 4, with_detail, banded, parts)
    assert (serial >= 0).all() and np.array_equal(serial, banded)
    images = x.reshape(6, 72, 40)
    means = [np.full((6, 18, 10), -1.0, np.float32) for _ in range(4)]
    kernels._moments(images, 4, means[0], means[1], 0, 6 * 18)
    kernels._moments_bands(images, 4, means[2], means[3], parts)
    assert (means[0] >= 0).all() and np.array_equal(means[0], means[2])
    assert np.array_equal(means[1], means[3])


def test_loops_split_into_bands_only_where_they_pay(network, monkeypatch) -> None:
    """One band per torch thread (at most numba's count), each of at least
    ``MIN_ROWS_PER_BAND`` rows, with numba's OpenMP layer; one band (the calling thread) with
    one torch thread, numba set to one thread, another layer or none that loads; and a network
    call gives the serial loops' image."""
    kernels = _kernels(network)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.bands(4096) == 1
        torch.set_num_threads(2)
        if numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("numba runs one thread here")
        minimum = kernels.MIN_ROWS_PER_BAND
        assert kernels.bands(2 * minimum - 1) == 1
        split = kernels.bands(2 * minimum)
        assert split == (2 if kernels._LAYER == ["omp"] else 1)  # (the layer is read by now)
        x = torch.rand(2, 2, 256, 128, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            banded = network(x)
            with monkeypatch.context() as serial_only:
                serial_only.setattr(kernels, "bands", lambda rows: 1)
                assert torch.equal(network(x), banded)
        numba_threads = numba.get_num_threads()
        numba.set_num_threads(1)  # the caller's own numba setting is kept
        try:
            assert kernels.bands(4096) == 1
        finally:
            numba.set_num_threads(numba_threads)
        monkeypatch.setattr(kernels, "_LAYER", ["workqueue"])
        assert kernels.bands(4096) == 1

        def no_layer() -> str:
            raise ValueError("No threading layer could be loaded.")
        monkeypatch.setattr(kernels, "_LAYER", [])
        monkeypatch.setattr(numba, "threading_layer", no_layer)
        assert kernels.bands(4096) == 1 and kernels._LAYER == [""]  # serial, no error
    finally:
        torch.set_num_threads(threads)


def test_network_output_needs_no_clamp(network) -> None:
    """The cnn method leaves out its own clamp for a network that declares its output in
    [0, 1]: every path of FusionNet clamps, also for sources that push the combination out."""
    assert type(network).output_in_unit_range is True
    module = sys.modules[type(network).__module__]
    x = torch.zeros(1, 2, 64, 64)
    x[:, :, ::2] = 1.0  # striped sources: each one's details added to the other's bright rows
    net = copy.deepcopy(network)
    with torch.no_grad():
        net.head[2].weight[1] = 0.0  # every gain 10: details re-injected in full
        net.head[2].bias[1] = 10.0
        stats, coarse = net._block_stats(x, 1 << net.block_exponent)
        maps = module.upsample_bilinear(net._block_maps(stats, 1, 2), 1 << net.block_exponent)
        maps = maps.reshape(1, 2, 2, 64, 64)
        unclamped = module.combine_sources(x, module.upsample_bilinear(coarse, net.base_pool),
                                           maps[:, :, 0], maps[:, :, 1], net.max_prior)
    assert unclamped.max() > 1.2  # what a missing clamp would let through
    for compiled in (True, False):
        net.compiled_cpu_kernels = compiled
        with torch.inference_mode():
            fused = net(x)
        assert fused.min() >= 0.0 and fused.max() <= 1.0


def test_compiled_sigmoid_is_torchs(network) -> None:
    """The vectorising float32 sigmoid of the compiled loops, over and beyond its clamp."""
    z = torch.cat([torch.linspace(-120.0, 120.0, 100_001), torch.tensor([-1e30, 1e30, 0.0])])
    out = torch.empty_like(z)
    _kernels(network).sigmoid_of_array(z.numpy(), out.numpy())
    expected = torch.sigmoid(z)
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=4e-7)


def test_training_tracing_and_scripting_run_the_torch_code(network) -> None:
    """The compiled loops serve inference only: with gradients, under the tracer (the ONNX
    export) and in TorchScript the network runs its torch code, with the same result."""
    net = copy.deepcopy(network)
    x = torch.rand(1, 2, 64, 64)
    with torch.inference_mode():
        compiled = net(x)
    assert not net._compiled_cpu_path(x.clone().requires_grad_())
    with torch.inference_mode():
        assert not net._compiled_cpu_path(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 maps: the torch code
            assert not net._compiled_cpu_path(x)
            assert net(x).shape == compiled.shape
    # grads on; 1e-4: the compiled path's float32 rounding (its last layer sums taps in another
    # order) on logits in the hundreds, the backends' tolerance
    torch.testing.assert_close(net(x).detach(), compiled, atol=1e-4, rtol=0)
    net.max_prior.requires_grad_(False)  # fine-tuning with the prior frozen still trains
    net(x).mean().backward()
    assert net.head[2].weight.grad is not None
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        scripted = torch.jit.script(net)
        for run in (traced, scripted):
            torch.testing.assert_close(run(x), compiled, atol=1e-4, rtol=0)


def test_without_numba_the_network_runs_its_torch_code(network, monkeypatch) -> None:
    """A bundle used where numba is not installed (its kernels fail to import) still fuses."""
    module = sys.modules[type(network).__module__]
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        compiled = network(x)
    monkeypatch.setattr(module, "_KERNELS", [None])
    assert not network._compiled_cpu_path(x)
    with torch.inference_mode():
        torch.testing.assert_close(network(x), compiled, atol=1e-4, rtol=0)


def test_before_numba_is_loaded_only_large_calls_take_the_compiled_loops() -> None:
    """Loading numba costs more than its loops save on one image pair: a fresh process keeps the
    torch code (and does not import numba) for a call below COMPILED_MIN_SOURCE_PIXELS, and
    takes the compiled loops from a call of that size."""
    script = textwrap.dedent("""
        import sys, torch
        from medfusion.methods import get_method
        net = get_method("cnn").module
        torch.set_grad_enabled(False)  # inference, as the methods call it
        limit = sys.modules[type(net).__module__].COMPILED_MIN_SOURCE_PIXELS
        small = torch.rand(1, 2, 256, 256)
        assert small.numel() < limit
        print(net._compiled_cpu_path(small), "numba" in sys.modules)
        large = torch.rand(limit // (2 * 512 * 512), 2, 512, 512)
        print(net._compiled_cpu_path(large), "numba" in sys.modules)
        print(net._compiled_cpu_path(small))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.split("\n")[:3] == ["False False", "True True", "True"], result.stdout


def test_a_child_forked_after_parallel_loops_fuses_with_one_torch_thread() -> None:
    """After the loops ran in row bands (two torch threads), a forked child that sets torch to
    one thread, as torch's OpenMP pool requires of it (DataLoader workers do), fuses the same
    image on the calling thread alone, and the parent goes on in bands."""
    script = textwrap.dedent("""
        import os, sys, numba, torch
        from medfusion.methods import get_method
        torch.set_num_threads(2)
        net = get_method("cnn").module
        kernels = sys.modules[type(net).__module__]._cpu_kernels()
        x = torch.rand(1, 2, 256, 256, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            torch.set_num_threads(1)  # the child's reference: torch's own numbers at one thread
            one_thread = net(x)
            torch.set_num_threads(2)
            parent = net(x)
        print(kernels.bands(256), flush=True)
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            with torch.inference_mode():
                same = torch.equal(net(x), one_thread) and kernels.bands(256) == 1
            os._exit(0 if same else 3)
        _, status = os.waitpid(pid, 0)
        with torch.inference_mode():
            print(os.waitstatus_to_exitcode(status), torch.equal(net(x), parent))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=True)
    lines = result.stdout.split("\n")
    if lines[0] != "2":
        pytest.skip("the loops do not split here (numba's layer is not OpenMP, or one thread)")
    assert lines[1] == "0 True", result.stdout + result.stderr


def test_compiled_loops_load_after_another_bundle_took_the_scripts_name() -> None:
    """A process that builds the sesf bundle after the cnn bundle (both name their code
    ``scripts``; MedFusion's report runs them side by side) still runs the cnn's compiled loops
    whose cached machine code numba reads only then: numba imports a loop's module by name at
    that moment, and ``medfusion benchmark`` with both methods failed with ``No module named
    'scripts.cpu_kernels'``. The first process fills numba's cache; in the second, the loops in
    row bands (two threads, a 512^2 pair) first run after the sesf bundle is loaded; in the
    third, numba and the loops are first imported then (the network used to fall back to its
    torch code there, silently). The backend is pinned to torch: ``auto`` times ONNX Runtime
    against torch on its first 512^2 call and may keep either (their sums differ by rounding),
    so the three processes are compared on the compiled loops' own result."""
    script = textwrap.dedent("""
        import sys, torch
        if sys.argv[1] != "late":
            import numba
        from medfusion.methods import get_method
        torch.set_num_threads(2)
        cnn = get_method("cnn")  # (its check runs the serial loops on a small probe)
        network = sys.modules[type(cnn.module).__module__]
        if sys.argv[1] != "first":
            get_method("sesf")
            assert "sesf_bundle" in sys.modules["scripts"].__file__
        import numba  # ("late": only now, so the loops are first imported here)
        x = torch.rand(1, 2, 512, 512, generator=torch.Generator().manual_seed(0))
        fused = float(cnn(x).sum())
        kernels = network._KERNELS[0]  # (None: the call fell back to the torch code)
        print(kernels is not None and kernels.bands(512), fused)
    """)
    env = {**os.environ, "MEDFUSION_BACKEND": "torch"}
    runs = [subprocess.run([sys.executable, "-c", script, which], capture_output=True,
                           text=True, timeout=300, env=env)
            for which in ("first", "second", "late")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    if runs[0].stdout.startswith("1 "):
        pytest.skip("the loops do not split here (numba's layer is not OpenMP, or one thread)")
    assert runs[0].stdout.startswith("2 "), runs[0].stdout
    assert runs[1].stdout == runs[0].stdout and runs[2].stdout == runs[0].stdout


def test_compiled_loops_refuse_shapes_that_do_not_fit(network) -> None:
    """The loops index without bounds checks: their entry points refuse mismatched shapes."""
    kernels = _kernels(network)
    x = torch.rand(1, 2, 64, 64)
    with pytest.raises(ValueError, match="multiples"):
        kernels.block_stats(torch.rand(1, 2, 60, 64), 8, 4)
    with pytest.raises(ValueError, match="compose_two"):
        kernels.compose_two(x, torch.rand(1, 4, 4, 8), torch.rand(1, 2, 16, 16),
                            network.max_prior.detach(), 8, 4)
    with pytest.raises(ValueError, match="compose_two"):
        kernels.compose_two(x, torch.rand(1, 4, 8, 8), torch.rand(1, 2, 8, 16),
                            network.max_prior.detach(), 8, 4)


@pytest.mark.parametrize("sources", [2, 3])
def test_bounded_logits_differ_by_less_than_twice_the_bound(network, sources: int) -> None:
    """With ``logit_bound`` L each block's selection logits are centred over the sources and
    bounded, ``L tanh(centred / L)``: two sources' logits never differ by 2 L or more (so the
    selection cannot switch within a pixel on the logits alone, the 3-source patchwork), the
    gains are untouched, and both paths (compiled, torch) agree."""
    module = sys.modules[type(network).__module__]
    unbounded, net = copy.deepcopy(network), copy.deepcopy(network)
    bound = 2.0
    unbounded.logit_bound, net.logit_bound = 0.0, bound
    x = torch.rand(2, sources, 64, 48, generator=torch.Generator().manual_seed(sources))
    with torch.inference_mode():
        stats, _ = net._block_stats(x, 1 << net.block_exponent)
        free = unbounded._block_maps(stats, 2, sources).reshape(2, sources, 2, 8, 6)
        bounded = net._block_maps(stats, 2, sources).reshape(2, sources, 2, 8, 6)
    assert (free[:, :, 0].amax(1) - free[:, :, 0].amin(1)).max() > 2 * bound  # bound binds
    logits = bounded[:, :, 0]
    assert (logits.amax(1) - logits.amin(1)).max() < 2 * bound
    centred = free[:, :, 0] - free[:, :, 0].mean(1, keepdim=True)
    torch.testing.assert_close(logits, bound * torch.tanh(centred / bound))
    torch.testing.assert_close(bounded[:, :, 1], free[:, :, 1])
    compiled, reference = _both_paths(net, x)
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=0)
    assert module.FusionNet(3, logit_bound=bound).logit_bound == bound
