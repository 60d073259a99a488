"""The engine bounds a method's working set: calls get as many slices as the memory budget
allows (``MEDFUSION_MEMORY_BUDGET_MB`` and the method's ``bytes_per_source_pixel``), with the
same fused volume as one call per batch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from medfusion import engine
from medfusion.errors import InputError
from medfusion.methods import get_method


class _Recording:
    """The classical ``max`` method, declaring a large working set and recording its calls."""

    name = "max"

    def __init__(self, bytes_per_source_pixel: float) -> None:
        self.inner = get_method("max")
        self.bytes_per_source_pixel = bytes_per_source_pixel
        self.calls: list[int] = []

    def __call__(self, batch):
        self.calls.append(int(batch.shape[0]))
        return self.inner(batch)


def _volumes(depth: int = 20, size: int = 64) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(1)
    a = rng.random((depth, size, size), dtype=np.float32)
    b = rng.random((depth, size, size), dtype=np.float32)
    return sitk.GetImageFromArray(a), sitk.GetImageFromArray(b)


def test_calls_fit_the_memory_budget_and_give_the_same_volume(monkeypatch):
    reference, other = _volumes()
    whole = sitk.GetArrayFromImage(engine.fuse_volumes(
        reference, [other], method="max", batch_size=16, device="cpu", normalisation="none"))
    # 1 MB budget, 64 B per source pixel: 2 sources x 64 x 64 x 64 B = 0.5 MB per slice
    monkeypatch.setenv(engine.MEMORY_BUDGET_ENV, "1")
    method = _Recording(64.0)
    assert engine.slices_per_call(method, 2, 64, 64) == 2
    split = sitk.GetArrayFromImage(engine.fuse_volumes(
        reference, [other], method=method, batch_size=16, device="cpu", normalisation="none"))
    assert method.calls and max(method.calls) == 2 and sum(method.calls) == 20
    np.testing.assert_array_equal(split, whole)


def test_a_slice_larger_than_the_budget_still_goes_through_alone(monkeypatch):
    monkeypatch.setenv(engine.MEMORY_BUDGET_ENV, "1")
    assert engine.slices_per_call(_Recording(1e6), 2, 512, 512) == 1


def _peak_growth(network: str, shape: tuple[int, ...]) -> int:
    """Bytes the peak RSS of a fresh process grows by while ``network`` (code naming a built
    method's network, warmed up on a small input) runs one ``torch.rand(shape)`` batch; plain
    torch (the largest working set of the backends)."""
    import subprocess
    import sys

    code = ("import resource, torch; from medfusion.methods import get_method; "
            f"m = {network}; m(torch.rand(1, 2, 32, 32)); x = torch.rand{shape}; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "with torch.inference_mode(): m(x)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "MEDFUSION_BACKEND": "torch",
                                           # the whole slice at once: no row strips, whose
                                           # size would follow from the declared number
                                           "MEDFUSION_MEMORY_BUDGET_MB": "100000"},
                          timeout=300)
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("name, network, shape", [
    ("cnn", "get_method('cnn').module", (4, 2, 512, 512)),
    ("cnn", "get_method('cnn').module", (2, 6, 512, 512)),  # pairwise softmax: K^2 maps
    ("sesf", "get_method('sesf')", (1, 2, 512, 512)),  # encoder and decision
])
def test_a_learned_method_declares_its_working_set(name, network, shape):
    """The declared bytes per source pixel cover the method's real peak (fresh process)."""
    declared = get_method(name).bytes_per_source_pixel
    batch, sources, height, width = shape
    assert _peak_growth(network, shape) <= 1.25 * declared * batch * sources * height * width
    assert engine.slices_per_call(get_method(name), sources, height, width) >= 1


def test_a_bad_budget_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(engine.MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(InputError, match="MEDFUSION_MEMORY_BUDGET_MB"):
        engine.memory_budget_bytes()
