"""Forward-pass runtimes: ONNX Runtime must reproduce PyTorch, or step aside."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from labelloop.ml.model import build_model
from labelloop.runtime.inference import (
    AGREEMENT_TOLERANCE,
    RuntimeUnavailable,
    build_runner,
    export_onnx,
)
from labelloop.runtime.predictor import LoadedModel
from labelloop.store import load_bundle


def _torch_probs(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(model.eval()(batch)).numpy()


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_onnx_runtime_reproduces_pytorch(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, 5, dropout=0.2)
    runner = build_runner(model, image_size=64)
    assert runner.name == "onnxruntime"
    # A batch size other than the export's: the batch axis must be dynamic.
    batch = torch.randn(7, 3, 64, 64)
    probs = runner(batch)
    assert probs.shape == (7, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _torch_probs(model, batch), atol=AGREEMENT_TOLERANCE)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_onnx_runtime_gives_the_backbone_embeddings_with_the_probabilities(backbone: str) -> None:
    """The labelling order ranks the pool with these: they must be what ml.embeddings computes
    (the head's input), from the same pass as unchanged probabilities."""
    from labelloop.ml.embeddings import head_module

    torch.manual_seed(0)
    model = build_model(backbone, 5, dropout=0.2).eval()
    runner = build_runner(model, image_size=64)
    batch = torch.randn(3, 3, 64, 64)
    seen: list[torch.Tensor] = []
    hook = head_module(model)[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.inference_mode():
        model(batch)
    hook.remove()
    probs, features = runner.with_features(batch)
    np.testing.assert_array_equal(probs, runner(batch))
    assert features is not None and features.shape == tuple(seen[0].shape)
    np.testing.assert_allclose(features, seen[0].numpy(), atol=1e-4)
    # Eager PyTorch gives none (the order then embeds the images itself).
    assert build_runner(model, image_size=64, runtime="torch").with_features(batch)[1] is None


def test_torch_runtime_when_asked() -> None:
    model = build_model("resnet18", 3)
    runner = build_runner(model, image_size=32, runtime="torch")
    assert runner.name == "torch"
    batch = torch.randn(2, 3, 32, 32)
    np.testing.assert_array_equal(runner(batch), _torch_probs(model, batch))


def test_unknown_runtime_is_rejected() -> None:
    with pytest.raises(ValueError, match="runtime must be one of"):
        build_runner(build_model("resnet18", 2), image_size=32, runtime="tensorrt")


class _Unexportable(nn.Module):
    """Uses an FFT, which the ONNX exporter has no translation for."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(self.head(x.mean(dim=(2, 3)))).abs()


class _TraceDivergent(nn.Module):
    """Branches on data: tracing freezes the branch the zero example took, so ONNX disagrees."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean(dim=(2, 3)))
        if bool(x.abs().sum() > 0):
            return logits + 5.0
        return logits


@pytest.mark.parametrize(
    ("model", "reason"),
    [(_Unexportable(), "unavailable"), (_TraceDivergent(), "differ from PyTorch")],
)
def test_auto_falls_back_to_pytorch_with_a_reason(
    model: nn.Module, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="labelloop.runtime.inference"):
        runner = build_runner(model, image_size=8)
    assert runner.name == "torch"
    assert reason in caplog.text
    batch = torch.randn(2, 3, 8, 8)
    np.testing.assert_array_equal(runner(batch), _torch_probs(model, batch))


@pytest.mark.parametrize("model", [_Unexportable(), _TraceDivergent()])
def test_explicit_onnxruntime_refuses_instead_of_falling_back(model: nn.Module) -> None:
    with pytest.raises(RuntimeUnavailable, match="ONNX Runtime"):
        build_runner(model, image_size=8, runtime="onnxruntime")


def test_export_has_a_dynamic_batch_axis() -> None:
    import onnx

    proto = onnx.load_from_string(export_onnx(build_model("resnet18", 4), 32))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"


def test_served_model_gives_the_same_probabilities_on_either_runtime(trained_model) -> None:
    bundle = load_bundle(trained_model[0])
    size = bundle.preprocess.image_size
    batch = torch.randn(4, 3, size, size)
    fast = LoadedModel.from_bundle(bundle, runtime="auto")
    eager = LoadedModel.from_bundle(bundle, runtime="torch")
    assert fast.runner.name == "onnxruntime"
    np.testing.assert_allclose(fast.runner(batch), eager.runner(batch), atol=AGREEMENT_TOLERANCE)


def test_a_version_is_exported_to_onnx_once_and_later_loads_reuse_it(
    trained_model, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from labelloop.runtime import inference
    from labelloop.store import ONNX_FILE, StoreError

    model_dir = tmp_path / "model"
    shutil.copytree(trained_model[0], model_dir)
    # The session's model may have been loaded (and its graph stored) by an earlier test.
    version_dir = load_bundle(model_dir).path
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["files"].pop(ONNX_FILE, None)
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    (version_dir / ONNX_FILE).unlink(missing_ok=True)
    exports = []
    real_export = inference.export_onnx

    def counting(model, image_size):  # noqa: ANN001, ANN202
        exports.append(image_size)
        return real_export(model, image_size)

    monkeypatch.setattr(inference, "export_onnx", counting)
    first = LoadedModel.from_bundle(load_bundle(model_dir), runtime="auto")
    assert first.runner.name == "onnxruntime" and len(exports) == 1
    bundle = load_bundle(model_dir)  # checksums verified, model.onnx among them
    assert ONNX_FILE in bundle.manifest.files
    again = LoadedModel.from_bundle(bundle, runtime="auto")
    assert len(exports) == 1  # no second export, no second check
    batch = torch.randn(2, 3, bundle.preprocess.image_size, bundle.preprocess.image_size)
    np.testing.assert_allclose(again.runner(batch), first.runner(batch), atol=1e-6)
    # A stored graph that was tampered with is refused like any corrupt file of the version.
    (bundle.path / ONNX_FILE).write_bytes(b"not onnx")
    with pytest.raises(StoreError, match="checksum"):
        load_bundle(model_dir)
