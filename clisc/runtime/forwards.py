"""A torch module's forward pass run by PyTorch, OpenVINO or ONNX Runtime: `module_forward`.

For the models that run on every slice without gradients (the SAM image encoder, CLIP's image tower, SAM's
prompt encoder and mask decoder). OpenVINO and ONNX Runtime are optional packages; "auto" takes the first of
`AUTO_ORDER` that is installed, so without them the same forward runs in PyTorch. Each forward takes the module's
inputs, each a batch (B, ...), and returns a tuple of float32 CPU tensors, one per output of the module. The
exported runtimes run one sample at a time: the export has a fixed batch of 1 (LiteMedSAM's TinyViT bakes the
batch size into its reshapes when traced). A forward made for batches
(``batched``: CLIP's tower, given every candidate slice at once) runs OpenVINO's samples in parallel streams, a
request per stream (1.2-1.4× the throughput of one request on every thread for CLIP's tower on 2 cores, README
"CPU runtimes"); one for single samples (LiteMedSAM's encoder, a slice at a time) runs one request on every
thread, which is quickest for one sample.

Precision: PyTorch runs under autocast to ``dtype``; OpenVINO runs with ``dtype`` as its inference precision
(bf16 on a CPU with AVX512-BF16 or AMX, which OpenVINO also picks by itself there); ONNX Runtime's CPU kernels
are float32 only, so it runs float32 whatever ``dtype`` says.

Before use, an exported model's outputs on a probe input are compared with the module's own float32 outputs in
PyTorch (once per `module_forward`; PyTorch's are computed at the export and kept in the entry, so a later run
makes one forward in the runtime only): past `TOLERANCE` the runtime is not used and the forward runs in PyTorch
(logged, and said in `describe`).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..errors import EnvironmentProblem, InputError
from ..precision import inference
from .export_cache import entry_folder, export_entry, read_entry

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
AUTO_ORDER = ("openvino", "torch")  # measured fastest first (README "CPU runtimes")
PACKAGES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime", "onnx")}  # what each runtime imports
# Largest relative L2 error ||y - y_torch|| / ||y_torch|| of a runtime's outputs on the probe, by its precision.
# bf16 errors on the probe are a few percent, as torch's own bf16 autocast gives (README "CPU runtimes").
TOLERANCE = {None: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}

Outputs = tuple  # of float32 CPU tensors (B, ...), one per output of the module
PROBE_FILE = "probe.npz"  # in an entry: the probe input and the module's float32 outputs on it


def installed(runtime: str) -> bool:
    """Whether ``runtime``'s packages can be imported (without importing them)."""
    return runtime == "torch" or all(importlib.util.find_spec(name) is not None for name in PACKAGES[runtime])


def choose_runtime(runtime: str, device: torch.device) -> str:
    """The runtime that will run: ``runtime`` itself, or for "auto" the first installed of `AUTO_ORDER`; always
    "torch" off the CPU (the others are used as CPU runtimes here). InputError for an unknown name,
    EnvironmentProblem for a runtime asked for by name whose package is missing."""
    if runtime not in RUNTIMES:
        raise InputError(f"runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if device.type != "cpu":
        return "torch"
    if runtime == "auto":
        return next(r for r in AUTO_ORDER if installed(r))
    if not installed(runtime):
        raise EnvironmentProblem(f"runtime {runtime}: its package is not installed; pip install "
                                 f"{' '.join(PACKAGES[runtime])} (or use --runtime auto, or torch)")
    return runtime


class TorchForward:
    """The module in PyTorch, without gradients, under autocast to ``dtype`` (None: float32)."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype],
                 note: str = "") -> None:
        self.module, self.device, self.dtype, self.note = module, device, dtype, note

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        with inference(self.module, self.device, self.dtype):
            outputs = self.module(*(x.to(self.device) for x in inputs))
        return tuple(o.float() for o in _as_tuple(outputs))

    def describe(self) -> dict:
        precision = str(self.dtype).replace("torch.", "") if self.dtype else "float32"
        return {"runtime": "torch", "precision": precision, **({"note": self.note} if self.note else {})}


# samples, each the module's inputs as float32 arrays (1, ...) → each sample's outputs
RunSamples = Callable[[List[List[np.ndarray]]], List[List[np.ndarray]]]


class ExportedForward:
    """An exported module run by ``run_samples`` on each sample (1, ...) of a batch."""

    def __init__(self, runtime: str, run_samples: RunSamples, details: dict) -> None:
        self.runtime, self.run_samples, self.details = runtime, run_samples, details

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        arrays = [x.float().cpu().numpy() for x in inputs]
        per_sample = self.run_samples([[x[n:n + 1] for x in arrays] for n in range(len(arrays[0]))])
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*per_sample))

    def describe(self) -> dict:
        return {"runtime": self.runtime, **self.details}


def module_forward(module: torch.nn.Module, example, runtime: str, device: torch.device,
                   dtype: Optional[torch.dtype], name: str, batched: bool = False):
    """The forward of ``module`` (eval mode, float32) in the chosen runtime (`choose_runtime`).

    Args:
        module: returns a tensor or a tuple of tensors.
        example: (1, ...) float32 input, or a tuple of them for a module of several inputs, of the shapes every
            sample will have; also the probe the export is checked with, so give values in the inputs' range.
        runtime: one of `RUNTIMES`.
        device: where the module is; off the CPU the forward is always PyTorch's.
        dtype: precision, as an autocast dtype (None: float32).
        name: names the cache entry (e.g. "litemedsam-encoder").
        batched: the forward will mostly get batches of several samples (module docstring).

    Returns:
        A `TorchForward` or an `ExportedForward`; its ``describe()`` says what runs (for the report), with the
        export's seconds (its first-run cost) and the error on the probe.
    """
    chosen = choose_runtime(runtime, device)
    if chosen == "torch":
        return TorchForward(module, device, dtype)
    examples = _as_tuple(example)
    package = PACKAGES[chosen][0]
    version = importlib.metadata.version(package)
    folder = entry_folder(name, module, [x.shape for x in examples], chosen, version)
    record = read_entry(folder)
    exported_now = record is None
    try:
        if exported_now:
            logger.info("exporting %s for %s %s (once; cached in %s)", name, chosen, version, folder)
            export = _export_openvino if chosen == "openvino" else _export_onnx
            with torch.no_grad():
                record = export_entry(folder, lambda out: (export(module, examples, out),
                                                           _save_probe(module, examples, out / PROBE_FILE)))
        run_samples = (_load_openvino if chosen == "openvino" else _load_onnxruntime)(folder, dtype, batched)
        outputs = run_samples([[x.numpy() for x in examples]])[0]
    except Exception as problem:  # noqa: BLE001 - a model the runtime cannot take still runs, in PyTorch
        logger.warning("%s cannot run %s (%s: %s): running it in PyTorch", chosen, name, type(problem).__name__,
                       str(problem)[:300])
        return TorchForward(module, device, dtype, note=f"{chosen} could not run it: {str(problem)[:200]}")
    expected = _probe_outputs(folder / PROBE_FILE, module, examples)
    error = max(_relative_error(got, want) for got, want in zip(outputs, expected))
    precision = "float32" if chosen == "onnxruntime" or dtype is None else str(dtype).replace("torch.", "")
    details = {"version": version, "precision": precision, "exported_now": exported_now,
               "export_seconds": record["export_seconds"], "probe_relative_error": float(f"{error:.3g}")}
    if not error <= TOLERANCE[dtype if precision != "float32" else None]:
        logger.warning("%s in %s differs from PyTorch by %.3g on its probe: running it in PyTorch", name, chosen, error)
        return TorchForward(module, device, dtype, note=f"{chosen} disagreed with torch on the probe ({error:.3g})")
    return ExportedForward(chosen, run_samples, details)


def _save_probe(module: torch.nn.Module, examples: tuple, path) -> None:
    """Keep the probe inputs (``input_0``, ...) and the module's float32 outputs on them (``output_0``, ...)."""
    outputs = [o.float().numpy() for o in _as_tuple(module(*examples))]
    np.savez(path, **{f"input_{n}": x.numpy() for n, x in enumerate(examples)},
             **{f"output_{n}": o for n, o in enumerate(outputs)})


def _probe_outputs(path, module: torch.nn.Module, examples: tuple) -> List[np.ndarray]:
    """The module's float32 outputs on ``examples``: those kept in the entry when it was made for this same
    probe, else (another probe) one PyTorch forward."""
    with np.load(path) as kept:
        inputs = sorted(name for name in kept.files if name.startswith("input_"))
        if len(inputs) == len(examples) and all(np.array_equal(kept[f"input_{n}"], x.numpy())
                                                for n, x in enumerate(examples)):
            return [kept[f"output_{n}"] for n in range(len(kept.files) - len(inputs))]
    with torch.no_grad():
        return [o.float().numpy() for o in _as_tuple(module(*examples))]


def _as_tuple(outputs) -> Sequence[torch.Tensor]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def _export_openvino(module: torch.nn.Module, examples: tuple, folder) -> None:
    import openvino as ov

    example = examples[0] if len(examples) == 1 else examples
    # float32 weights: save_model's default compresses them to float16
    ov.save_model(ov.convert_model(module, example_input=example), folder / "model.xml", compress_to_fp16=False)


def _export_onnx(module: torch.nn.Module, examples: tuple, folder) -> None:
    # with gradients enabled, nn.MultiheadAttention takes its plain path, not the fused kernel ONNX has no op for
    with torch.enable_grad():
        torch.onnx.export(module, examples, folder / "model.onnx", dynamo=False, opset_version=17)


@functools.lru_cache(maxsize=None)
def _openvino_core():
    """The process's one OpenVINO Core: a Core made per model segfaults after some tens of loads in one process
    (ultralytics/ultralytics#25864; seen here as a crash of the test suite at a random later test)."""
    import openvino as ov

    return ov.Core()


def _load_openvino(folder, dtype: Optional[torch.dtype], batched: bool) -> RunSamples:
    import openvino as ov

    precision = {None: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    compiled = _openvino_core().compile_model(folder / "model.xml", "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT" if batched else "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    if not batched:
        request = compiled.create_infer_request()
        # the request lives with its model
        return lambda samples, compiled=compiled: [list(request.infer(inputs).to_tuple()) for inputs in samples]
    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    results: dict = {}
    # a request's output tensors are reused by its next sample: copied out as each one finishes
    queue.set_callback(lambda request, n: results.__setitem__(n, [np.array(t.data) for t in request.output_tensors]))

    def run_samples(samples: List[List[np.ndarray]], compiled=compiled) -> List[List[np.ndarray]]:
        results.clear()
        for n, inputs in enumerate(samples):
            queue.start_async(inputs, userdata=n)
        queue.wait_all()
        return [results[n] for n in range(len(samples))]

    return run_samples


def _load_onnxruntime(folder, dtype: Optional[torch.dtype], batched: bool) -> RunSamples:
    import onnxruntime

    settings = onnxruntime.SessionOptions()
    settings.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), settings, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    return lambda samples: [session.run(None, dict(zip(names, inputs))) for inputs in samples]
