"""Run a bundle's network through the fastest available inference backend.

:func:`accelerate` wraps any ``torch.nn.Module`` whose forward maps one float32 tensor to one
tensor (the bundle's ``FusionNet`` and its successors: batch, sources, height and width are all
dynamic) and returns an :class:`InferenceRunner`, a callable with the module's signature:

- ``onnxruntime``: the module exported to ONNX and run by ONNX Runtime (CPU); on this project's
  CPU it ran the fusion network up to 3-5x faster than plain torch while other processes
  competed for the cores, and about as fast (session 21: a little slower) when idle. The export
  (under a second) happens once per network and number of sources (batch, height and width are
  dynamic in the graph; the source count is fixed, because a network may take a shorter path for
  two sources, and a traced graph holds one path): it is checked against plain torch and cached in
  the user cache folder (``MEDFUSION_CACHE_DIR``, else ``$XDG_CACHE_HOME/medfusion``, else
  ``~/.cache/medfusion``) under a key hashed from the module's weights, its class and ``repr``,
  the source files of its and its children's classes, and the torch and ONNX Runtime versions.
  The bundle's
  ``network_def`` and weights stay the one definition of the network: the ONNX file is derived
  from the module they build, never shipped or edited.
- ``compile``: ``torch.compile(dynamic=True)`` (Inductor; needs a C++ compiler, and its first
  call compiles for tens of seconds): only when asked for.
- ``torch``: the module itself.

``MEDFUSION_BACKEND=auto|onnxruntime|compile|torch`` (or the ``backend`` argument) chooses;
``auto`` (the default unless the caller names another, as the sesf method names torch) takes
ONNX Runtime on CPU when it is installed *and* it runs a call faster than plain torch on this
machine, timed on the first call of each :func:`call_class` (the call's size in powers of 4,
its number of sources, and the network's own path: the bundle's network runs compiled CPU loops
on large calls or once numba is loaded) on that call's input (a 384² pair when
:meth:`InferenceRunner.prepare` is called without one), once per network and class in the
process; plain torch otherwise (on CUDA too: the CPU wheel of ONNX Runtime has no GPU provider).
A backend is checked against plain
torch on two probe inputs (max abs difference ``TOLERANCE``; ONNX Runtime once, before its export
is cached); one that fails to build, to run or to match falls back to plain torch with a log
message, so inference never fails for the backend's sake.

On CUDA every call runs its convolutions in full float32 (:func:`full_float32_convolutions`):
torch lets cuDNN use TF32 by default, and the CNN's fused slices on an H200 then differed from
the CPU's by up to 3.6e-3 (4.4e-6 in full float32; ``Testing/benchmarks/bench_gpu.py``).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "compile", "torch")
BACKEND_ENV = "MEDFUSION_BACKEND"
CACHE_ENV = "MEDFUSION_CACHE_DIR"
TOLERANCE = 1e-4
# bumped when the way models are exported changes, so that old cache entries are not reused
EXPORT_FORMAT = 3
# (batch, sources, height, width) inputs on which a backend is compared with plain torch; the
# last is no multiple of any block, so the padding to ``input_multiple`` is checked too
PROBE_SHAPES = ((1, 2, 64, 64), (2, 3, 48, 80), (1, 2, 37, 53))


_FULL_FLOAT32_LOCK = threading.Lock()
_full_float32_depth = 0
_full_float32_before: object = None


def _cudnn_fp32_switch() -> tuple[object, str]:
    """cuDNN's float32-convolution switch: (the object holding it, the attribute's name)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        return conv, "fp32_precision"
    return torch.backends.cudnn, "allow_tf32"


@contextmanager
def full_float32_convolutions() -> Iterator[None]:
    """cuDNN's float32 convolutions in full float32, not TF32, inside the block (then as they
    were): the GPU's fused images then match the CPU's to float32 rounding. These networks are
    small and launch-bound, so full precision costs little. torch's switch is process-wide, so
    blocks of several threads share it: the first to enter sets it, the last to leave puts back
    what was there before the first."""
    global _full_float32_depth, _full_float32_before
    holder, name = _cudnn_fp32_switch()
    with _FULL_FLOAT32_LOCK:
        if _full_float32_depth == 0:
            _full_float32_before = getattr(holder, name)
            setattr(holder, name, "ieee" if name == "fp32_precision" else False)
        _full_float32_depth += 1
    try:
        yield
    finally:
        with _FULL_FLOAT32_LOCK:
            _full_float32_depth -= 1
            if _full_float32_depth == 0:
                setattr(holder, name, _full_float32_before)


def probe_shapes(sources: int) -> tuple[tuple[int, int, int, int], ...]:
    """The probe inputs with ``sources`` sources (an ONNX export serves one source count)."""
    return tuple((batch, sources, height, width) for batch, _, height, width in PROBE_SHAPES)


def input_multiple(module: torch.nn.Module) -> int:
    """The multiple of the input's height and width that a traced graph of ``module`` needs.

    A network that pads odd sizes in Python (``if h % block: pad``) is traced on one shape, so its
    exported graph only holds for sizes whose padding is the same (none): such a network declares
    ``input_multiple`` and every backend but torch gets inputs replicate-padded to it (the same
    padding the network does itself), the output cropped back.
    """
    return max(1, int(getattr(module, "input_multiple", 1)))


class _PaddedRun:
    """Call ``run`` on inputs replicate-padded to a multiple of ``multiple``; crop the output."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], multiple: int) -> None:
        self.run, self.multiple = run, multiple

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        height, width = inputs.shape[-2:]
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        if pad_h or pad_w:
            inputs = torch.nn.functional.pad(inputs, (0, pad_w, 0, pad_h), mode="replicate")
        output = self.run(inputs)
        return output[..., :height, :width] if pad_h or pad_w else output


def requested_backend(backend: str | None = None, default: str = "auto") -> str:
    """The backend asked for: the argument, else ``MEDFUSION_BACKEND``, else ``default``."""
    from medfusion.errors import InputError

    name = (backend or os.environ.get(BACKEND_ENV) or default).strip().lower()
    if name not in ("auto", *BACKENDS):
        raise InputError(f"unknown inference backend {name!r} ({BACKEND_ENV}); use auto, "
                         + ", ".join(BACKENDS))
    return name


def cache_dir() -> Path:
    """Folder for exported models: ``MEDFUSION_CACHE_DIR``, else the user cache folder."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "medfusion"


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _settings(module: torch.nn.Module) -> str:
    """The plain attributes of the module and its children (e.g. a block exponent): they change
    what ``forward`` computes, and so the exported graph, without being weights or in ``repr``."""
    parts = []
    for name, child in module.named_modules():
        for key, value in sorted(vars(child).items()):
            if (not key.startswith("_") and key != "training"
                    and isinstance(value, (bool, int, float, str))):
                parts.append(f"{name}.{key}={value!r}")
    return ";".join(parts)


def _class_source_file(cls: type) -> str | None:
    """The file that defines ``cls``: the code of a function written in its body (decorators
    unwrapped, properties' getters too); None for a class without one (nothing of its own to
    hash: its children's classes are hashed on their own). Why not
    ``inspect.getsourcefile(cls)`` alone: it looks the module up by name, and bundles all name
    their code ``scripts``, so after another bundle was loaded the cnn's key hashed the sesf
    bundle's ``scripts/network.py`` (a key that no longer followed the network's own code)."""
    prefix = f"{cls.__qualname__}."
    for value in vars(cls).values():
        for candidate in (getattr(value, "__func__", None), getattr(value, "fget", None), value):
            if not callable(candidate):
                continue
            try:
                function = inspect.unwrap(candidate)
            except ValueError:  # a cycle of __wrapped__
                continue
            code = getattr(function, "__code__", None)
            if (code is not None and not code.co_filename.startswith("<")
                    and getattr(function, "__qualname__", "").startswith(prefix)):
                return code.co_filename
    return None  # (no function of its own: no code of its own to hash)


def model_key(module: torch.nn.Module) -> str:
    """Hash identifying what the module computes: weights, class, the source files of its and its
    children's classes, versions."""
    digest = hashlib.sha256()
    cls = type(module)
    for part in (f"format={EXPORT_FORMAT}", f"torch={torch.__version__}",
                 f"{cls.__module__}.{cls.__qualname__}", repr(module), _settings(module)):
        digest.update(part.encode() + b"\0")
    # the files defining the module's class and its children's (torch's own: by its version), so
    # that a wrapper's key changes when the network it wraps changes its code
    classes = {type(child) for child in module.modules()}
    for child_cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if child_cls.__module__.startswith("torch."):
            continue
        source = _class_source_file(child_cls)
        try:
            if source:
                digest.update(Path(source).read_bytes())
        except OSError:
            pass
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16
                      else value.float().numpy().tobytes())
    return digest.hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    concurrent reader sees the old file, the new file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, for a one-line log entry ("" when it has none)."""
    return (str(error).strip().splitlines() or [""])[0]


def export_onnx(module: torch.nn.Module, sources: int = 2) -> bytes:
    """The module as a serialised ONNX model for inputs of ``sources`` sources, with the batch,
    height and width dynamic.

    The TorchScript exporter first (``dynamo=False``: well under a second for the fusion
    networks), the dynamo exporter (``dynamo=True``, needs ``onnxscript``; tens of seconds on a
    small CPU) when the first cannot trace the module's code. Either way the result is checked
    against torch before use (:func:`cached_onnx`).
    """
    import warnings

    module = module.cpu().eval()
    example = torch.rand(*probe_shapes(sources)[0])
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stream = io.BytesIO()
            torch.onnx.export(
                module, (example,), stream, dynamo=False, input_names=["sources"],
                output_names=["fused"], opset_version=17,
                dynamic_axes={"sources": {0: "batch", 2: "height", 3: "width"},
                              "fused": {0: "batch", 2: "height", 3: "width"}},
            )
            return stream.getvalue()
        except Exception as error:  # code the tracer cannot follow
            errors.append(f"TorchScript exporter: {_first_line(error)}")
        try:
            from torch.export import Dim

            parameter = next(iter(inspect.signature(module.forward).parameters))
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, input_names=["sources"],
                output_names=["fused"], verbose=False,
                dynamic_shapes={parameter: dict.fromkeys((0, 2, 3), Dim.DYNAMIC)},
            )
            return program.model_proto.SerializeToString()
        except Exception as error:  # exporter missing, or code it cannot trace
            errors.append(f"dynamo exporter: {_first_line(error)}")
    raise RuntimeError("; ".join(errors))


def cached_onnx(module: torch.nn.Module, directory: Path | None = None, sources: int = 2
                ) -> Path | bytes:
    """Path of the module's ONNX export for ``sources`` sources in the cache, exporting it first
    when missing.

    A new export is checked against plain torch on the probe inputs before it is stored, so a
    cache entry (named by :func:`model_key`, the source count and the ONNX Runtime version) is a
    checked one and loading it later costs no probe run. Where the cache cannot be written, the
    checked model itself (bytes) is returned.
    """
    import onnxruntime

    name = (f"{type(module).__name__}-{model_key(module)}-k{sources}"
            f"-ort{onnxruntime.__version__}.onnx")
    path = (directory or cache_dir()) / name
    if not path.is_file():
        logger.info("exporting the network to ONNX once (cached in %s)", path.parent)
        quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.WARNING)
        try:
            model = export_onnx(module, sources)
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)
        difference = _matches(_PaddedRun(_OnnxRuntimeNetwork(model, 1), input_multiple(module)),
                              module, torch.device("cpu"), probe_shapes(sources))
        if difference > TOLERANCE:
            raise RuntimeError(f"ONNX Runtime's outputs differ from torch by {difference:.2g}")
        try:
            _atomic_write(path, model)
        except OSError as error:  # read-only home, full disk: use it now, export again later
            logger.warning("cannot cache the ONNX export in %s (%s)", path.parent, error)
            return model
    return path


class _OnnxRuntimeNetwork:
    """An ONNX Runtime session with the call signature of the torch module (tensor in and out)."""

    def __init__(self, model: Path | bytes, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no memory arena: the arena kept the largest run's full-resolution intermediates for
        # the process (auto's timing of a call of two 512^2 pairs: the 512x512x300 volume's
        # peak RSS 1427 MB against 1376 without it, target 1425; torch alone 1351), and runs
        # took about the same time without it (per 512^2 pair 2.59 against 2.60 ms and 2.85
        # against 2.64 in two interleaved runs, calls of two pairs 5.35 against 5.48 ms)
        options.enable_cpu_mem_arena = False
        # no busy-waiting between runs: spinning ORT threads would steal the cores from the
        # rest of the pipeline (and from torch, when the two are compared)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            model if isinstance(model, bytes) else str(model), options,
            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        (output,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(output).to(inputs.device)


class _OnnxRuntimePerSourceCount:
    """ONNX Runtime sessions of one module, one per number of sources (an export serves one),
    each exported (or read from the cache) when a batch with that many sources first comes."""

    def __init__(self, module: torch.nn.Module, threads: int, cache: Path | None,
                 fallback_level: int = logging.WARNING) -> None:
        self.module, self.threads, self.cache = module, threads, cache
        self.fallback_level = fallback_level
        self.runs: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._lock = threading.Lock()

    def run_for(self, sources: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The padded session for ``sources`` sources (built and checked on first use; calls
        with counts already served do not wait for an export in progress)."""
        run = self.runs.get(sources)
        if run is not None:
            return run
        with self._lock:
            if sources not in self.runs:
                session = _OnnxRuntimeNetwork(cached_onnx(self.module, self.cache, sources),
                                              self.threads)
                self.runs[sources] = _PaddedRun(session, input_multiple(self.module))
            return self.runs[sources]

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        sources = int(inputs.shape[1])
        try:
            run = self.run_for(sources)
        except Exception as error:  # this source count cannot be exported: torch serves it
            logger.log(self.fallback_level,
                       "ONNX Runtime cannot serve %d sources (%s: %s); using torch for them",
                       sources, type(error).__name__, _first_line(error))
            with self._lock:
                run = self.runs.setdefault(sources, self.module)
        return run(inputs)


def _matches(candidate: Callable, module: torch.nn.Module, device: torch.device,
             shapes: tuple[tuple[int, ...], ...] = PROBE_SHAPES) -> float:
    """Largest absolute difference between ``candidate`` and ``module`` on the probe inputs."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.inference_mode():
        for shape in shapes:
            probe = torch.rand(*shape, generator=generator).to(device)
            expected = module(probe)
            got = candidate(probe)
            if got.shape != expected.shape:
                raise RuntimeError(f"output shape {tuple(got.shape)} instead of "
                                   f"{tuple(expected.shape)}")
            worst = max(worst, float((got.float() - expected.float()).abs().max()))
    return worst


TIMING_SHAPE = (1, 2, 384, 384)
TIMING_RUNS = 5


def _best_times(runs: list[Callable[[torch.Tensor], torch.Tensor]], probe: torch.Tensor
                ) -> list[float]:
    """Each run's fastest of :data:`TIMING_RUNS` calls on ``probe``, the calls interleaved (run
    1, run 2, run 1, ...) so that a change of the machine's load or clock between them slows
    every run alike (timed one after the other, 3 calls each, ``auto`` once kept ONNX Runtime at
    block exponents 5 and 6, where it took 1.4-1.7x torch's time)."""
    import time

    best = [float("inf")] * len(runs)
    with torch.inference_mode():
        for run in runs:
            run(probe)  # warm-up (allocations, first-call set-up)
        for _ in range(TIMING_RUNS):
            for index, run in enumerate(runs):
                start = time.perf_counter()
                run(probe)
                best[index] = min(best[index], time.perf_counter() - start)
    return best


def _timing_probe(channels: int, device: torch.device) -> torch.Tensor:
    """The input ``auto`` times when it is given none: a seeded 384² pair (or ``channels``)."""
    shape = (TIMING_SHAPE[0], channels, *TIMING_SHAPE[2:])
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def _pays(candidate: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
          device: torch.device, channels: int = TIMING_SHAPE[1],
          example: torch.Tensor | None = None) -> bool:
    """True when ``candidate`` runs ``example`` (the call being decided), else a 384² pair of
    ``channels`` sources, faster than plain torch here and now.

    Which backend is faster depends on the network, the machine and the input (on this project's
    2-core CPUs ONNX Runtime was 3-5x faster than torch while other processes competed for the
    cores and about 2x slower on an idle machine; the bundle's network runs compiled CPU loops
    in torch only on calls large enough to pay for loading numba, or once numba is loaded), so
    ``auto`` measures instead of guessing, on what the caller runs: a few tens of milliseconds,
    once per loaded network and :func:`call_class`.
    """
    if example is not None and example.dim() == 4:
        probe = example.detach().to(device)
    else:
        probe = _timing_probe(channels, device)
    fast, plain = _best_times([candidate, module], probe)
    logger.debug("backend timing on %s: candidate %.4f s, torch %.4f s", tuple(probe.shape),
                 fast, plain)
    return fast < plain


def call_class(module: torch.nn.Module, inputs: torch.Tensor) -> tuple[int, int, object]:
    """Which calls ``auto`` decides apart: the call's pixels (batch x height x width) in powers
    of 4 (64² is 6, 128² 7, 256² 8, one to three 512² slices 9, four to fifteen 10), its number
    of sources (each has its own export, and three or more take another path through the
    network), and the module's own path for it where the module declares one
    (``inference_path(inputs)``: the bundle's network says whether its compiled CPU loops run;
    asked in the caller's grad mode, which is ``inference_mode`` for the runner's calls).

    Why: the faster backend depends on all three. A process whose first call was a small image
    chose ONNX Runtime for good until session 34, and its later volume batches, where torch runs
    compiled loops, then took ~4x torch's time (6.0 against 1.5 ms per 512² pair on this
    project's Intel VM: ``Testing/benchmarks/bench_backend_choice.py``)."""
    sources = int(inputs.shape[1]) if inputs.dim() >= 2 else 1
    pixels = inputs.numel() // max(1, sources)
    size = (max(1, pixels).bit_length() - 1) // 2
    path = getattr(module, "inference_path", None)
    try:
        kind = path(inputs) if callable(path) else None
        hash(kind)
    except Exception:  # a module's own hook must not fail inference: one class for its paths
        kind = None
    return size, sources, kind


# what ``auto`` chose per network, device and call class in this process: one network, one
# backend for each class of call (so two method objects of the same bundle fuse the same input
# bit-identically); written under _AUTO_LOCK, only for choices that were timed
_AUTO_CHOICES: dict[str, str] = {}
_AUTO_LOCK = threading.Lock()


class InferenceRunner:
    """Callable running ``module`` through a backend; ``backend`` names the one that ran (or was
    chosen for) the latest call.

    The backend is prepared on the first call of each :func:`call_class` (export or cache
    look-up, session, check against plain torch; ``auto`` also times it against torch there), so
    building a method stays cheap; :meth:`prepare` does it at once for one class. A backend that
    fails to build or to match torch is not tried again by this runner; one that fails at run
    time is dropped for every class.
    ``channels``: the module's fixed number of input channels (e.g. 1 for an encoder of single
    images); None for a fusion network that takes any number of sources (probed with 2 and 3).
    ``default``: the backend when neither ``backend`` nor ``MEDFUSION_BACKEND`` names one.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | str = "cpu",
                 backend: str | None = None, cache: Path | None = None,
                 channels: int | None = None, default: str = "auto") -> None:
        self.module = module
        self.device = torch.device(device)
        self.requested = requested_backend(backend, default)
        self.cache = cache
        self.channels = channels
        self.backend: str | None = None
        self._built: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # checked backends
        self._broken: set[str] = set()  # backends that failed to build, match or run
        self._chosen: dict[object, str] = {}  # call class -> backend
        self._lock = threading.Lock()

    def _channels(self) -> int:
        """The input channels to export, time and probe first (the usual source count: 2)."""
        return self.channels or TIMING_SHAPE[1]

    def _fallback_level(self) -> int:
        """Log level of a fall back to torch: a warning where a backend was asked for."""
        return logging.WARNING if self.requested != "auto" else logging.INFO

    def _probes(self) -> tuple[tuple[int, ...], ...]:
        return PROBE_SHAPES if self.channels is None else probe_shapes(self.channels)

    def _kind(self, inputs: torch.Tensor) -> object:
        """The call class of ``inputs``: :func:`call_class` for ``auto``; one class for a
        backend that was asked for (nothing to decide, so nothing to load for the decision)."""
        if self.requested != "auto":
            return ()
        with torch.inference_mode():  # the grad mode the methods call in (it decides the path)
            return call_class(self.module, inputs)

    def _candidates(self) -> list[str]:
        if self.requested != "auto":
            names = [self.requested, "torch"]
        elif self.device.type == "cpu" and onnxruntime_available():
            names = ["onnxruntime", "torch"]
        else:
            names = ["torch"]
        return [name for name in dict.fromkeys(names) if name not in self._broken]

    def _choice_key(self, kind: object) -> str:
        return f"{model_key(self.module)}:{self.device}:{kind}"

    def _build(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if name == "onnxruntime":
            if self.device.type != "cpu":
                raise RuntimeError("the ONNX Runtime backend runs on CPU only")
            sessions = _OnnxRuntimePerSourceCount(self.module, torch.get_num_threads(),
                                                  self.cache, self._fallback_level())
            sessions.run_for(self._channels())  # the usual count: export now, or fail now
            return sessions
        if name == "compile":
            return _PaddedRun(torch.compile(self.module, dynamic=True),
                              input_multiple(self.module))
        return self.module

    def _checked(self, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Backend ``name``, built and checked against torch once per runner; None (logged,
        and not tried again) where it fails to build, to run the probes or to match."""
        if name in self._built:
            return self._built[name]
        try:
            run = self._build(name)
            if name not in ("onnxruntime", "torch"):  # cached ONNX models were checked on export
                difference = _matches(run, self.module, self.device, self._probes())
                if difference > TOLERANCE:
                    raise RuntimeError(f"outputs differ from torch by {difference:.2g}")
        except Exception as error:  # never fail inference for the backend's sake
            self._broken.add(name)
            logger.log(self._fallback_level(), "inference backend %s unavailable (%s: %s); "
                       "using torch", name, type(error).__name__, _first_line(error))
            return None
        self._built[name] = run
        return run

    def prepare(self, example: torch.Tensor | None = None) -> str:
        """Choose and check the backend for calls like ``example`` (of its :func:`call_class`;
        without one, like a 384² pair) now; return its name. ``auto`` times the candidates on
        ``example`` the first time a class comes in this process."""
        if example is None:
            example = _timing_probe(self._channels(), self.device)
        kind = self._kind(example)
        chosen = self._chosen.get(kind)  # decided: no lock (a dict read is atomic)
        if chosen is None:
            with self._lock:
                chosen = self._chosen.get(kind) or self._decide(kind, example)
        self.backend = chosen
        return chosen

    def _decide(self, kind: object, example: torch.Tensor) -> str:
        """The backend for calls of class ``kind`` (under the runner's lock)."""
        if self.requested != "auto":
            chosen = next((name for name in self._candidates()
                           if name == "torch" or self._checked(name) is not None), "torch")
        else:
            with _AUTO_LOCK:  # one decision per network and class, whichever runner asks
                key = self._choice_key(kind)
                chosen = _AUTO_CHOICES.get(key)
                if chosen is None or chosen in self._broken:
                    chosen = self._timed_choice(kind, example)
                    if chosen is None:
                        return "torch"  # this call only: the class stays undecided
                    _AUTO_CHOICES.setdefault(key, chosen)
                elif chosen != "torch" and self._checked(chosen) is None:
                    chosen = "torch"  # this runner cannot build what the others chose
        self._chosen[kind] = chosen
        logger.debug("inference backend for %s calls: %s", kind, chosen)
        return chosen

    def _timed_choice(self, kind: object, example: torch.Tensor) -> str | None:
        """The first candidate that builds and runs ``example`` faster than torch, else
        "torch"; None where the timing itself failed (the input's fault, e.g. an empty
        slice: torch serves it, and the class is decided again by the next call)."""
        for name in self._candidates():
            if name == "torch":
                return "torch"
            run = self._checked(name)
            if run is None:
                continue
            try:
                faster = _pays(run, self.module, self.device, self._channels(), example)
            except Exception as error:
                logger.debug("timing %s on %s calls failed (%s: %s)", name, kind,
                             type(error).__name__, _first_line(error))
                return None
            if faster:
                return name
            logger.debug("inference backend %s slower than torch on %s calls", name, kind)
        return "torch"

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            with full_float32_convolutions():
                return self._call(inputs)
        return self._call(inputs)

    def _call(self, inputs: torch.Tensor) -> torch.Tensor:
        name = self.prepare(inputs)
        if name == "torch":
            return self.module(inputs)
        try:
            return self._built[name](inputs)
        except Exception as error:  # e.g. Inductor failing to recompile for a new shape
            logger.warning("inference backend %s failed (%s: %s); using torch from now on",
                           name, type(error).__name__, _first_line(error))
            with self._lock:
                self._broken.add(name)
                self._chosen = {kind: ("torch" if chosen == name else chosen)
                                for kind, chosen in self._chosen.items()}
                self.backend = "torch"
            return self.module(inputs)

    def __repr__(self) -> str:
        return (f"InferenceRunner({type(self.module).__name__}, requested={self.requested}, "
                f"backend={self.backend or 'not prepared'})")


def accelerate(module: torch.nn.Module, device: torch.device | str = "cpu",
               backend: str | None = None, cache: Path | None = None,
               channels: int | None = None, default: str = "auto") -> InferenceRunner:
    """Wrap an eval-mode module (already on ``device``) in an :class:`InferenceRunner`
    (``channels``: its fixed input channel count, if it has one; ``default``: the backend
    where none is asked for)."""
    return InferenceRunner(module, device, backend, cache, channels, default)
