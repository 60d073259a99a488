"""Inference backends (medfusion.methods.backend): each forced backend gives plain torch's output
on a real atlas pair, ``auto`` picks ONNX Runtime when installed, exports are cached by the
weights' hash, and a backend that cannot serve a network falls back to torch."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medfusion import color
from medfusion.errors import InputError
from medfusion.methods import backend, get_method

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
needs_ort = pytest.mark.skipif(not backend.onnxruntime_available(),
                               reason="onnxruntime is not installed")


def _luminance(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return color.luminance(rgb)  # the project's BT.601 Y, not a second copy of its weights


@pytest.fixture(scope="module")
def atlas_batch(aanlib: Path) -> torch.Tensor:
    """A real SPECT-MRI pair and a PET-MRI pair, cropped to odd sizes: (2, 2, 250, 246)."""
    planes = []
    for pair, name in (("PET-MRI", "25020.png"), ("SPECT-MRI", None)):
        folder = aanlib / pair
        name = name or sorted(p.name for p in (folder / "MRI").glob("*.png"))[0]
        modalities = ("MRI", "PET") if pair == "PET-MRI" else ("MRI", "SPECT")
        planes.append(np.stack([_luminance(folder / m / name)[3:253, 5:251]
                                for m in modalities]))
    return torch.from_numpy(np.stack(planes))


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    """The shipped bundle's network, loaded by the cnn method (the bundle is its definition)."""
    return get_method("cnn").module


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for this module's tests (an export takes seconds)."""
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(backend.CACHE_ENV, str(shared_cache))
    return shared_cache


def _plain(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(batch)


@needs_ort
def test_onnxruntime_matches_torch_on_a_real_pair_and_caches_the_export(
        network, atlas_batch, cache, monkeypatch):
    runner = backend.accelerate(network, "cpu", backend="onnxruntime")
    assert runner.prepare() == "onnxruntime"
    fused = runner(atlas_batch)
    assert fused.shape == (2, 1, 250, 246) and fused.dtype == torch.float32
    assert float((fused - _plain(network, atlas_batch)).abs().max()) <= backend.TOLERANCE
    # other batch sizes, source counts and sizes through the same exported model
    three = torch.cat([atlas_batch[:1], atlas_batch[1:, :1]], dim=1)[:, :, :120, :97]
    assert float((runner(three) - _plain(network, three)).abs().max()) <= backend.TOLERANCE
    exported = list(cache.glob(f"*{backend.model_key(network)}*.onnx"))
    assert sorted(path.name.split("-")[2] for path in exported) == ["k2", "k3"]  # one per count
    assert not list(cache.glob(".tmp-*"))  # written atomically: no temporary left

    # a second load reads the cache: exporting again would fail here
    def no_export(module, sources):
        raise AssertionError("exported twice")

    monkeypatch.setattr(backend, "export_onnx", no_export)
    again = backend.accelerate(network, "cpu", backend="onnxruntime")
    assert again.prepare() == "onnxruntime"
    assert torch.equal(again(atlas_batch), fused)


@needs_ort
def test_onnxruntime_sessions_keep_no_memory_arena(network, atlas_batch, cache):
    """The sessions run without ONNX Runtime's CPU memory arena, which kept the largest run's
    intermediates for the whole process (auto's timing call cost a volume job ~50 MB of peak
    memory) and bought no speed here."""
    runner = backend.accelerate(network, "cpu", backend="onnxruntime")
    assert runner.prepare() == "onnxruntime"
    runner(atlas_batch)
    session = runner._built["onnxruntime"].runs[2].run.session
    assert session.get_session_options().enable_cpu_mem_arena is False


@needs_ort
def test_a_backend_failing_at_run_time_falls_back_to_torch(network, atlas_batch, cache):
    runner = backend.accelerate(network, "cpu", backend="onnxruntime")
    assert runner.prepare() == "onnxruntime"
    # the session is gone: running it raises
    runner._built["onnxruntime"].runs[2].run.session = None
    with torch.inference_mode():  # as the methods call it
        fused = runner(atlas_batch)
    assert runner.backend == "torch"
    assert torch.equal(fused, _plain(network, atlas_batch))


def test_torch_backend_is_the_module_itself(network, atlas_batch):
    runner = backend.accelerate(network, "cpu", backend="torch")
    assert runner.prepare() == "torch"
    with torch.inference_mode():  # as the methods call it (with gradients on, the network
        fused = runner(atlas_batch)  # runs its torch code instead of its compiled CPU loops)
    assert torch.equal(fused, _plain(network, atlas_batch))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDFUSION_TEST_COMPILE") != "1",
                    reason="torch.compile takes minutes on a 2-core CPU: MEDFUSION_TEST_COMPILE=1")
def test_compile_matches_torch_on_a_real_pair(network, atlas_batch):
    """Forced torch.compile: same output as torch (or, where Inductor cannot build or
    recompile, the runner's fallback to torch: same output too)."""
    runner = backend.accelerate(network, "cpu", backend="compile")
    name = runner.prepare()
    if name != "compile":  # no working C++ toolchain: the fallback must then be plain torch
        assert name == "torch"
    with torch.inference_mode():
        fused = runner(atlas_batch)
    assert float((fused - _plain(network, atlas_batch)).abs().max()) <= backend.TOLERANCE


def test_auto_takes_onnxruntime_only_where_it_pays(network, cache, monkeypatch):
    """``auto`` times ONNX Runtime against torch once and keeps the faster; the timing itself
    is real (a bool from two measured runs), the choice is checked both ways."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    if backend.onnxruntime_available():
        session = backend.accelerate(network, "cpu", backend="onnxruntime")
        session.prepare()
        onnx = session._built["onnxruntime"]
        assert isinstance(backend._pays(onnx, network, torch.device("cpu")), bool)
    for pays, expected in ((True, "onnxruntime"), (False, "torch")):
        monkeypatch.setattr(backend, "_pays", lambda *args, pays=pays: pays)
        monkeypatch.setattr(backend, "_AUTO_CHOICES", {})
        runner = backend.accelerate(network, "cpu")
        assert runner.requested == "auto"
        chosen = expected if backend.onnxruntime_available() else "torch"
        assert runner.prepare() == chosen
        # the choice holds for the process: another runner of the same network is not re-timed
        monkeypatch.setattr(backend, "_pays", lambda *args, pays=pays: not pays)
        assert backend.accelerate(network, "cpu").prepare() == chosen


@needs_ort
def test_auto_times_the_backends_on_the_first_calls_input(network, cache, monkeypatch):
    """``auto`` decides on what the caller runs: the bundle's network takes compiled CPU loops
    only on calls large enough to pay for loading numba, so a fixed small probe could time
    another path than a volume's slices take. Without an input (``prepare()``) it times the 384²
    two-source probe."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    timed = []

    def record(runs, probe):
        timed.append(tuple(probe.shape))
        return [1.0, 2.0]  # the candidate "wins"

    monkeypatch.setattr(backend, "_best_times", record)
    for first_input, expected in ((torch.rand(2, 2, 80, 96), (2, 2, 80, 96)),
                                  (torch.rand(1, 3, 64, 64), (1, 3, 64, 64)),
                                  (None, backend.TIMING_SHAPE)):
        monkeypatch.setattr(backend, "_AUTO_CHOICES", {})
        runner = backend.accelerate(network, "cpu")
        with torch.inference_mode():
            if first_input is None:
                runner.prepare()
            else:
                runner(first_input)
        assert runner.backend == "onnxruntime"
        assert timed[-1] == expected


@needs_ort
def test_auto_decides_each_call_class_apart(network, cache, monkeypatch):
    """A small first call, or one pair before numba is loaded, must not fix the backend of the
    process: ``auto`` times each :func:`call_class` (size in powers of 4, sources, the path)
    apart, once per process. Here ONNX Runtime "wins" on small calls and "loses" on large ones
    (the timing is replaced; each class's real timing is a bool, checked above)."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backend, "_AUTO_CHOICES", {})
    timed = []

    def record(runs, probe):
        timed.append(tuple(probe.shape))
        return [1.0, 2.0] if probe.shape[-1] <= 128 else [2.0, 1.0]

    monkeypatch.setattr(backend, "_best_times", record)
    runner = backend.accelerate(network, "cpu")
    small, large = torch.rand(1, 2, 64, 64), torch.rand(2, 2, 512, 512)
    with torch.inference_mode():
        kinds = [backend.call_class(network, small)]
        runner(small)
        assert runner.backend == "onnxruntime"
        runner(torch.rand(1, 2, 80, 64))  # the small class again: decided, not timed again
        assert runner.backend == "onnxruntime"
        fused = runner(large)
        assert runner.backend == "torch"
        assert torch.equal(fused, network(large))  # the module itself ran
        kinds.append(backend.call_class(network, large))
    assert timed == [(1, 2, 64, 64), (2, 2, 512, 512)]
    assert kinds[0][0] == 6 and kinds[1][0] == 9 and kinds[0] != kinds[1]
    # another runner of the same network follows the choices without timing
    again = backend.accelerate(network, "cpu")
    with torch.inference_mode():
        again(large)
    assert again.backend == "torch" and len(timed) == 2


def test_the_bundle_network_declares_its_path(network, monkeypatch):
    """call_class sees the path the network then takes: a large float32 call without gradients
    runs the compiled CPU loops where they load, a call with gradients the torch code."""
    kernels = sys.modules[type(network).__module__]._cpu_kernels()
    large = torch.rand(2, 2, 512, 512)
    taken = []
    compiled = network._forward_compiled
    monkeypatch.setattr(network, "_forward_compiled",
                        lambda x: taken.append("compiled") or compiled(x))
    with torch.inference_mode():
        kind = backend.call_class(network, large)
        network(large)
    assert kind == (9, 2, "compiled" if kernels is not None else "torch")
    assert taken == (["compiled"] if kernels is not None else [])
    assert network.inference_path(large) == "torch"  # gradients on: the differentiable code


@needs_ort
def test_a_failed_timing_decides_nothing(network, cache, monkeypatch):
    """Where timing the call fails (the input's fault), torch serves that call and the class
    stays open: ONNX Runtime is neither dropped nor replaced by an untimed "torch" choice."""
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backend, "_AUTO_CHOICES", {})
    outcomes = iter([RuntimeError("bad input"), [1.0, 2.0]])

    def timing(runs, probe):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(backend, "_best_times", timing)
    runner = backend.accelerate(network, "cpu")
    small = torch.rand(1, 2, 64, 64)
    with torch.inference_mode():
        assert torch.equal(runner(small), network(small))
        assert runner.backend == "torch" and not backend._AUTO_CHOICES
        runner(small)  # timed again: ONNX Runtime "wins" now
    assert runner.backend == "onnxruntime"
    assert list(backend._AUTO_CHOICES.values()) == ["onnxruntime"]


def test_environment_forces_a_backend_and_rejects_unknown_names(network, monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    assert backend.accelerate(network).prepare() == "torch"
    method = get_method("cnn")
    assert method.network.prepare() == "torch"
    monkeypatch.setenv(backend.BACKEND_ENV, "tensorrt")
    with pytest.raises(InputError, match="unknown inference backend"):
        backend.accelerate(network)


def test_weights_and_settings_change_the_cache_key(network):
    bound = network.logit_bound
    other = type(network)(block_exponent=network.block_exponent, logit_bound=bound)
    other.load_state_dict(network.state_dict())
    assert backend.model_key(other) == backend.model_key(network)
    coarser = type(network)(block_exponent=network.block_exponent + 1, logit_bound=bound)
    coarser.load_state_dict(network.state_dict())  # same weights, another traced graph
    assert backend.model_key(coarser) != backend.model_key(network)
    unbounded = type(network)(block_exponent=network.block_exponent, logit_bound=0.0)
    unbounded.load_state_dict(network.state_dict())  # the logits' bound is in the graph too
    assert backend.model_key(unbounded) != backend.model_key(network)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert backend.model_key(other) != backend.model_key(network)


class _Wrapper(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_the_cache_key_follows_the_code_of_a_wrapped_network(tmp_path, monkeypatch):
    """A wrapper (as sesf wraps its bundle's encode) is defined here, the network elsewhere: the
    key must change when the network's own file changes, weights and repr being the same."""
    import importlib.util

    keys = []
    for body in ("return x * self.scale", "return x * self.scale + 1"):
        source = tmp_path / f"inner_{len(keys)}.py"
        source.write_text("import torch\n\nclass Inner(torch.nn.Module):\n"
                          "    def __init__(self):\n        super().__init__()\n"
                          "        self.scale = torch.nn.Parameter(torch.tensor(2.0))\n\n"
                          f"    def forward(self, x):\n        {body}\n")
        name = f"medfusion_test_inner_{len(keys)}"
        spec = importlib.util.spec_from_file_location(name, source)
        code = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, code)  # as a bundle's scripts are imported
        spec.loader.exec_module(code)
        keys.append(backend.model_key(_Wrapper(code.Inner())))
    assert keys[0] != keys[1]


def test_the_cache_key_reads_the_code_of_the_networks_own_bundle(tmp_path, monkeypatch):
    """Bundles all name their code ``scripts``: after another bundle's module took the name in
    ``sys.modules`` (as MedFusion's report loads the sesf bundle beside the cnn), a network's
    key still hashes its own class's file (it hashed the other bundle's ``network.py``)."""
    import importlib.util

    name = "medfusion_test_scripts.network"

    def load(folder: Path, body: str):
        folder.mkdir()
        source = folder / "network.py"
        source.write_text("import torch\n\nclass Inner(torch.nn.Module):\n"
                          "    @torch.no_grad()  # (a decorator from another file comes first)\n"
                          "    def scaled(self):\n        return self.scale * 1\n\n"
                          "    def __init__(self):\n        super().__init__()\n"
                          "        self.scale = torch.nn.Parameter(torch.tensor(2.0))\n\n"
                          f"    def forward(self, x):\n        {body}\n")
        spec = importlib.util.spec_from_file_location(name, source)
        code = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, code)
        spec.loader.exec_module(code)
        return code

    network = load(tmp_path / "cnn", "return x * self.scale").Inner()
    assert backend._class_source_file(type(network)) == str(tmp_path / "cnn" / "network.py")
    before = backend.model_key(network)
    other = load(tmp_path / "sesf", "return x * self.scale + 1").Inner()
    assert backend.model_key(network) == before
    assert backend.model_key(other) != before


@torch.library.custom_op("medfusion_test::host_square", mutates_args=())
def _host_square(x: torch.Tensor) -> torch.Tensor:
    """An operator of this test only: no ONNX exporter has a translation for it."""
    return torch.from_numpy(np.ascontiguousarray(x.detach().cpu().numpy() ** 2))


@_host_square.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOpNetwork(torch.nn.Module):
    """A network that ONNX cannot serve: its forward calls an operator ONNX does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _host_square(x[:, :1]) * self.scale


@needs_ort
def test_a_network_onnx_cannot_serve_falls_back_to_torch(cache):
    module = _CustomOpNetwork().eval()
    runner = backend.accelerate(module, "cpu", backend="onnxruntime")
    assert runner.prepare() == "torch"
    batch = torch.rand(2, 2, 32, 32)
    assert torch.equal(runner(batch), _plain(module, batch))
    assert not list(cache.glob(f"*{backend.model_key(module)}*"))  # nothing unchecked cached


class _TwoSourceOnlyNetwork(torch.nn.Module):
    """ONNX serves its two-source path only: three or more sources call the unknown operator."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, :1] * self.scale
        return first + x[:, 1:2] if x.shape[1] == 2 else _host_square(first)


@needs_ort
def test_each_source_count_gets_its_own_export_or_torch(cache):
    """A graph traced on two sources holds the two-source path only: three sources get their own
    export, and where that fails torch serves them while two sources stay on ONNX Runtime."""
    module = _TwoSourceOnlyNetwork().eval()
    runner = backend.accelerate(module, "cpu", backend="onnxruntime")
    assert runner.prepare() == "onnxruntime"
    two, three = torch.rand(2, 2, 32, 40), torch.rand(1, 3, 24, 16)
    assert float((runner(two) - _plain(module, two)).abs().max()) <= backend.TOLERANCE
    assert torch.equal(runner(three), _plain(module, three))
    assert runner.backend == "onnxruntime"
    # torch for three sources, ONNX Runtime for two
    assert runner._built["onnxruntime"].runs[3] is module
    assert [p.name.split("-")[2] for p in cache.glob(f"*{backend.model_key(module)}*")] == ["k2"]


@needs_ort
def test_cnn_method_outputs_agree_across_backends(atlas_batch, cache, monkeypatch):
    """The whole method through ONNX Runtime and through torch, at two block exponents, on
    slices whose sizes are no multiple of the block (the network pads them itself in torch; the
    exported graph gets them padded by the runner)."""
    for exponent in (2, 4):
        monkeypatch.setenv(backend.BACKEND_ENV, "onnxruntime")
        fast = get_method("cnn", block_exponent=exponent)
        monkeypatch.setenv(backend.BACKEND_ENV, "torch")
        plain = get_method("cnn", block_exponent=exponent)
        for batch in (atlas_batch, atlas_batch[:, :, :91, :109], atlas_batch[:1, :, :3, :200]):
            fused_fast, fused_plain = fast(batch), plain(batch)
            assert fast.network.backend == "onnxruntime" and plain.network.backend == "torch"
            assert fused_fast.shape == fused_plain.shape == (batch.shape[0], *batch.shape[2:])
            assert float((fused_fast - fused_plain).abs().max()) <= backend.TOLERANCE


@needs_ort
def test_sesf_energy_runs_through_the_backend_with_the_same_fusion(atlas_batch, cache,
                                                                   monkeypatch):
    """The sesf method's activity network (the bundle's encoder and feature energy, one-channel
    images in) goes through the same backends: its energies within the tolerance of torch's
    (relative: they reach hundreds), and the same fused slices."""
    monkeypatch.setenv(backend.BACKEND_ENV, "onnxruntime")
    fast = get_method("sesf")
    monkeypatch.setenv(backend.BACKEND_ENV, "torch")
    plain = get_method("sesf")
    assert fast.energy_network.prepare() == "onnxruntime"
    assert plain.energy_network.prepare() == "torch"
    images = atlas_batch[:, :1]
    with torch.inference_mode():
        energy, expected = fast.energy(images), plain.energy(images)
    assert energy.shape == (2, 1, 250, 246)
    assert float((energy - expected).abs().max() / expected.abs().max()) <= backend.TOLERANCE
    assert float((fast(atlas_batch) - plain(atlas_batch)).abs().max()) <= backend.TOLERANCE
    assert [p.name.split("-")[2] for p in cache.glob("FeatureEnergy-*")] == ["k1"]


def test_plain_config_loads_without_monai_and_other_configs_use_the_parser(tmp_path):
    """The light loader reads the same network_def as ConfigParser; a config with references
    goes through ConfigParser and gives the same network."""
    import subprocess
    import sys

    code = ("import sys; from medfusion.methods import get_method; m = get_method('cnn'); "
            "print(type(m.module).__name__, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["FusionNet", "False"]

    shipped = Path(get_method("cnn").bundle_dir)
    copy = tmp_path / "bundle"
    for part in ("configs", "scripts", "models"):
        shutil.copytree(shipped / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "configs" / "inference.json"
    text = config.read_text()
    assert '"features": 24' in text
    config.write_text(text.replace('"features": 24', '"features": "$12 * 2"'))
    parsed = get_method("cnn", bundle_dir=copy)
    assert parsed.module.encoder[0].out_channels == 24
    for (name, a), (_, b) in zip(parsed.module.state_dict().items(),
                                 get_method("cnn").module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@needs_ort
def test_an_unwritable_cache_still_gives_the_fast_backend(network, atlas_batch, tmp_path,
                                                          monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(backend.CACHE_ENV, str(blocker / "cache"))
    runner = backend.accelerate(network, "cpu", backend="onnxruntime")
    assert runner.prepare() == "onnxruntime"
    assert float((runner(atlas_batch) - _plain(network, atlas_batch)).abs().max()) <= \
        backend.TOLERANCE


def _cudnn_float32_precision() -> str:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def test_full_float32_convolutions_switch_tf32_off_and_back():
    """torch lets cuDNN run float32 convolutions in TF32 by default (the CNN's GPU output was
    3.6e-3 off the CPU's on an H200); inside the guard they run in full float32, and torch's
    setting is back afterwards, also after an error."""
    before = _cudnn_float32_precision()
    with backend.full_float32_convolutions():
        assert _cudnn_float32_precision() == "ieee"
    assert _cudnn_float32_precision() == before
    with pytest.raises(RuntimeError, match="inside"):
        with backend.full_float32_convolutions():
            raise RuntimeError("inside")
    assert _cudnn_float32_precision() == before


def test_full_float32_convolutions_overlapping_in_two_threads():
    """Two threads' guards that overlap (the first leaves while the second is inside): the
    switch stays full float32 until the last leaves, then is what it was before the first (each
    guard put back what it saw: the first left the second in TF32, the last set TF32 "back" to
    full float32 for good)."""
    before = _cudnn_float32_precision()
    first_inside, second_inside, first_left = (threading.Event() for _ in range(3))
    seen: list[str] = []

    def first() -> None:
        with backend.full_float32_convolutions():
            first_inside.set()
            second_inside.wait(10)
        first_left.set()

    def second() -> None:
        first_inside.wait(10)
        with backend.full_float32_convolutions():
            second_inside.set()
            first_left.wait(10)
            seen.append(_cudnn_float32_precision())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == ["ieee"]
    assert _cudnn_float32_precision() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cnn_on_cuda_matches_the_cpu(atlas_batch):
    """The same fused slices on a GPU as on the CPU, to the backends' tolerance."""
    on_cpu = get_method("cnn", device="cpu")(atlas_batch)
    on_gpu = get_method("cnn", device="cuda")(atlas_batch.to("cuda")).cpu()
    assert float((on_gpu - on_cpu).abs().max()) <= backend.TOLERANCE
