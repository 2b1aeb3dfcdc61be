from __future__ import annotations

from pathlib import Path

import pytest

from labelloop.config import ConfigError, TrainConfig, load_config


def test_defaults() -> None:
    config = load_config(None)
    assert config.model.backbone == "auto"  # resolved when training starts (ml.model)
    assert config.data.label_columns == ("components", "defects")
    assert config.optim.monitor == "map"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.toml", '[optim]\nepochs = 3\n[data]\nclasses = {components = ["bolt"]}\n'),
        ("c.yaml", "optim:\n  epochs: 3\ndata:\n  classes:\n    components: [bolt]\n"),
        ("c.json", '{"optim": {"epochs": 3}, "data": {"classes": {"components": ["bolt"]}}}'),
    ],
)
def test_file_formats(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    config = load_config(path)
    assert config.optim.epochs == 3
    assert config.data.classes == {"components": ("bolt",)}


def test_flags_override_the_file_and_none_means_unset(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nepochs = 3\nlr = 0.01\n")
    config = load_config(path).with_overrides({"optim": {"epochs": 7, "lr": None}})
    assert config.optim.epochs == 7
    assert config.optim.lr == 0.01


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[optim]\nepochs = 0\n", "optim.epochs"),
        ("[optim]\nepoch = 3\n", "optim.epoch: Extra inputs are not permitted"),
        ('[model]\nbackbone = "vgg"\n', "backbone must be auto or one of"),
        ("[split]\nval_fraction = 0.6\ntest_fraction = 0.5\n", "must leave data to train on"),
        ('[data]\nclasses = {colour = ["red"]}\n', "not among label_columns"),
        ("[thresholds]\nmin_threshold = 0.9\nmax_threshold = 0.1\n", "min_threshold"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="must end in"):
        load_config(tmp_path / "c.ini")


def test_override_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="command-line flags"):
        TrainConfig().with_overrides({"optim": {"batch_size": 0}})
