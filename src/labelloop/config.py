"""Typed training configuration: defaults, then a config file, then command-line flags.

The resolved config is saved in every model's manifest, so a model always says how it was made.
"""

from __future__ import annotations

import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labelloop.errors import ConfigError

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
)


class LoadMode(StrEnum):
    """How `--init-from` loads an earlier model (ml.checkpoints.load_into)."""

    strict = "strict"
    compatible = "compatible"
    backbone_only = "backbone-only"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    image_column: str = "image_id"
    label_columns: tuple[str, ...] = ("components", "defects")
    # Declared class names per label column. Labels outside them stop the run unless
    # allow_new_classes; columns not listed here accept whatever the data holds.
    classes: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    allow_new_classes: bool = False

    @model_validator(mode="after")
    def _check_columns(self) -> DataConfig:
        if not self.label_columns:
            raise ValueError("label_columns must name at least one column")
        if len(set(self.label_columns)) != len(self.label_columns):
            raise ValueError(f"label_columns has duplicates: {list(self.label_columns)}")
        unknown = sorted(set(self.classes) - set(self.label_columns))
        if unknown:
            raise ValueError(
                f"classes are declared for {unknown}, which are not among label_columns "
                f"{list(self.label_columns)}"
            )
        return self


class SplitConfig(_Section):
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_sum(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave data to train on, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        return self


class PreprocessConfig(_Section):
    image_size: int = Field(224, ge=32, le=1024)
    # Eval resizes the short side to image_size / crop_ratio, then centre-crops image_size.
    crop_ratio: float = Field(0.875, gt=0.0, le=1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Inspection photos have no canonical orientation, so flips are safe augmentations.
    hflip: bool = True
    vflip: bool = False
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    min_scale: float = Field(0.6, gt=0.0, le=1.0)


class ModelConfig(_Section):
    # "auto": the best backbone whose ImageNet weights are available offline (ml.model).
    backbone: str = "auto"
    # "imagenet": torchvision weights (downloaded or already cached); a path: a local checkpoint;
    # "none": random init.
    weights: str = "imagenet"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_backbone(self) -> ModelConfig:
        if self.backbone not in (*BACKBONES, "auto"):
            raise ValueError(
                f"backbone must be auto or one of {list(BACKBONES)}, got {self.backbone!r}"
            )
        return self


class OptimConfig(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    patience: int = Field(5, ge=1)
    monitor: Literal["map", "loss"] = "map"
    pos_weight_min: float = Field(1.0, gt=0.0)
    pos_weight_max: float = Field(10.0, gt=0.0)
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    amp: bool = True

    @model_validator(mode="after")
    def _check_pos_weight(self) -> OptimConfig:
        if self.pos_weight_min > self.pos_weight_max:
            raise ValueError(
                f"pos_weight_min ({self.pos_weight_min}) exceeds pos_weight_max "
                f"({self.pos_weight_max})"
            )
        return self


class ThresholdConfig(_Section):
    beta: float = Field(1.0, gt=0.0)
    default: float = Field(0.5, ge=0.0, le=1.0)
    min_positives: int = Field(2, ge=0)
    min_threshold: float = Field(0.05, ge=0.0, le=1.0)
    max_threshold: float = Field(0.95, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_range(self) -> ThresholdConfig:
        if self.min_threshold > self.max_threshold:
            raise ValueError("min_threshold must not exceed max_threshold")
        return self


class TrainConfig(_Section):
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    thresholds: ThresholdConfig = ThresholdConfig()

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> TrainConfig:
        """Return a copy with `{section: {field: value}}` applied; None values are ignored."""
        merged = self.model_dump()
        for section, fields in overrides.items():
            for key, value in fields.items():
                if value is not None:
                    merged[section][key] = value
        return _validate(merged, source="command-line flags")


def _validate(raw: dict[str, Any], *, source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration in {source}: {problems}") from None


def load_config(path: Path | None) -> TrainConfig:
    """Read a TOML, YAML or JSON config file; None gives the defaults."""
    if path is None:
        return TrainConfig()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw)}")
    return _validate(raw, source=str(path))
