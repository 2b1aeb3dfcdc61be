"""Where serving's forward passes run.

On a CPU, ONNX Runtime runs our backbones markedly faster than eager PyTorch (ResNet18 about
1.3x, MobileNetV2 about 2-3x on the 2-core reference machine; docs/benchmarks.md), so `auto`
exports the model to ONNX when a version is loaded and uses it, provided its outputs agree with
PyTorch's on a probe batch. With a GPU, `auto` keeps PyTorch on CUDA with fp16 autocast. Any
failure to export or to agree falls back to eager PyTorch with a logged reason: a slower model
is better than none.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Literal, Protocol, get_args

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

Runtime = Literal["auto", "onnxruntime", "torch"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)

# Largest probability difference from PyTorch that still counts as the same model: float32
# kernels of both runtimes differ by ~1e-6 in logits on ResNet18; 1e-4 leaves margin for deeper
# backbones while catching any real export error.
AGREEMENT_TOLERANCE = 1e-4

# The legacy (TorchScript) exporter keeps module-level state; one export at a time.
_export_lock = threading.Lock()


class RuntimeUnavailable(RuntimeError):
    """The runtime that was asked for explicitly cannot run this model."""


class Runner(Protocol):
    """Batch of normalised images (N, 3, H, W) float32 -> sigmoid probabilities (N, C);
    `with_features` also gives the head's input (N, d), the backbone embeddings, or None where
    the runtime cannot (then they are computed apart, ml.embeddings)."""

    name: str

    def __call__(self, batch: torch.Tensor) -> np.ndarray: ...

    def with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]: ...


class TorchRunner:
    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.eval().to(self.device)
        self.name = "torch-cuda" if self.device.type == "cuda" else "torch"

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self.model(batch.to(self.device, non_blocking=True))
            else:
                logits = self.model(batch)
            return torch.sigmoid(logits.float()).cpu().numpy()

    def with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, None]:
        # A hook on the shared module would also catch other threads' forward passes (the
        # embedding of annotations runs on the same model): no features from eager PyTorch.
        return self(batch), None


class OnnxRunner:
    name = "onnxruntime"

    def __init__(self, graph: bytes, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Inter-op parallelism only helps branchy graphs; ours are chains, and extra threads
        # would fight the download workers for the cores.
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph, self._features = _with_head_input(graph)
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self._logits = self.session.get_outputs()[0].name

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        logits = self.session.run([self._logits], {self._input: batch.contiguous().numpy()})[0]
        return torch.sigmoid(torch.from_numpy(logits)).numpy()

    def with_features(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if self._features is None:
            return self(batch), None
        logits, features = self.session.run(
            [self._logits, self._features], {self._input: batch.contiguous().numpy()}
        )
        return torch.sigmoid(torch.from_numpy(logits)).numpy(), np.asarray(features, np.float32)


def _with_head_input(graph: bytes) -> tuple[bytes, str | None]:
    """The graph with the head's input (the backbone embedding) as a second output, and that
    output's name; the graph unchanged and None when its logits do not come from a Gemm (a
    Linear) fed by a 2-D tensor. The logits are computed exactly as before: only an output is
    added, so a stored graph's check against PyTorch still holds."""
    import onnx

    try:
        proto = onnx.load_from_string(graph)
        logits = proto.graph.output[0].name
        producer = next((n for n in proto.graph.node if logits in n.output), None)
        if producer is None or producer.op_type != "Gemm":
            return graph, None
        features = producer.input[0]
        if any(o.name == features for o in proto.graph.output):
            return graph, features
        proto.graph.output.append(
            onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None)
        )
        return proto.SerializeToString(), features
    except Exception as exc:  # noqa: BLE001 - features are a bonus; the logits must serve
        logger.debug("No embedding output added to the ONNX graph: %s", exc)
        return graph, None


def export_onnx(model: nn.Module, image_size: int) -> bytes:
    """The model as ONNX bytes with a dynamic batch axis (eval mode, float32, CPU)."""
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    with _export_lock, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs
        # onnxscript and is slower; the legacy one handles every torchvision backbone we offer.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            # The TorchScript exporter (dynamo=False) writes to a file object too; the stubs
            # only list str | PathLike.
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def build_runner(
    model: nn.Module,
    *,
    image_size: int,
    runtime: str = "auto",
    graph: bytes | None = None,
    on_export: Callable[[bytes], None] | None = None,
) -> Runner:
    """The fastest runtime that reproduces `model`'s outputs; see the module docstring.

    runtime: "auto" (CUDA if present, else ONNX Runtime if it agrees, else PyTorch), "torch",
    or "onnxruntime" (raises RuntimeUnavailable instead of falling back).

    `graph`: an ONNX export of this model that was checked against PyTorch when it was stored
    (a version's model.onnx): used as it is, so a load costs no export and no check. Otherwise
    the model is exported and checked here, and `on_export(graph)` may store the result.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    model.eval()
    if runtime == "torch":
        return TorchRunner(model)
    if runtime == "auto" and torch.cuda.is_available():
        return TorchRunner(model, torch.device("cuda"))
    if graph is not None:
        try:
            return OnnxRunner(graph)
        except Exception as exc:  # noqa: BLE001 - a stored graph this runtime cannot read
            logger.warning("The stored ONNX graph cannot be loaded (%s); exporting again", exc)
    try:
        graph = export_onnx(model.cpu(), image_size)
        runner = OnnxRunner(graph)
        difference = _max_difference(runner, model, image_size)
    except Exception as exc:  # noqa: BLE001 - export and session errors come in many types
        # Exporter messages can carry the whole graph; the first line names the problem.
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"{type(exc).__name__}: {first_line}"
        if runtime == "onnxruntime":
            raise RuntimeUnavailable(f"ONNX Runtime cannot run this model ({reason})") from exc
        logger.warning("ONNX Runtime unavailable (%s); serving with eager PyTorch", reason)
        return TorchRunner(model)
    if difference > AGREEMENT_TOLERANCE:
        message = (
            f"ONNX Runtime's outputs differ from PyTorch's by {difference:.2e} "
            f"(tolerance {AGREEMENT_TOLERANCE:.0e})"
        )
        if runtime == "onnxruntime":
            raise RuntimeUnavailable(message)
        logger.warning("%s; serving with eager PyTorch", message)
        return TorchRunner(model)
    logger.debug("ONNX Runtime agrees with PyTorch to %.1e", difference)
    if on_export is not None:
        try:
            on_export(graph)
        except OSError as exc:  # a read-only model folder still serves, it just exports again
            logger.warning("Could not store the ONNX graph (%s); later loads export again", exc)
    return runner


def _max_difference(runner: Runner, model: nn.Module, image_size: int) -> float:
    probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = torch.sigmoid(model(probe)).numpy()
    return float(np.abs(runner(probe) - expected).max())
