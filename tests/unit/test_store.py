from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from labelloop.config import PreprocessConfig
from labelloop.labels import LabelSpace
from labelloop.ml.model import build_model
from labelloop.store import (
    ModelStore,
    StoreError,
    load_bundle,
    manifest_for,
    write_model_files,
)

SPACE = LabelSpace.from_mapping({"components": ["bolt", "nut"], "defects": ["rust"]})


def _publish(store: ModelStore, thresholds=(0.3, 0.4, 0.5), seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = build_model("resnet18", len(SPACE))
    version = store.next_version_name()
    with store.staging() as staged:
        write_model_files(staged, model, SPACE, list(thresholds))
        manifest = manifest_for(
            version=version,
            backbone="resnet18",
            dropout=0.0,
            label_space=SPACE,
            preprocess=PreprocessConfig(image_size=48),
            metrics={"test": {"f1_macro": 0.5}},
        )
        store.publish(staged, manifest)
    return version


def test_round_trip(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    version = _publish(store)
    assert store.current_version() == version
    assert version.startswith("v1-")
    bundle = load_bundle(tmp_path)
    assert bundle.version == version
    assert bundle.classes == ["bolt", "nut", "rust"]
    assert bundle.label_space.as_dict() == SPACE.as_dict()
    assert bundle.thresholds == [0.3, 0.4, 0.5]
    assert bundle.preprocess.image_size == 48
    files = tmp_path / "versions" / version
    assert json.loads((files / "classes.json").read_text()) == ["bolt", "nut", "rust"]
    assert json.loads((files / "thresholds.json").read_text()) == [0.3, 0.4, 0.5]
    manifest = json.loads((files / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pth", "classes.json", "thresholds.json"}
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "versions").iterdir())


def test_versions_are_monotonic_and_rollback_switches(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = _publish(store, seed=0)
    second = _publish(store, seed=1)
    assert store.versions() == [first, second]
    assert second.startswith("v2-")
    assert store.current_version() == second
    store.set_current(first)
    assert load_bundle(tmp_path).version == first
    with pytest.raises(StoreError, match="no version 'v9-20200101T000000'"):
        store.set_current("v9-20200101T000000")
    assert store.current_version() == first


def test_a_crash_while_staging_leaves_current_untouched(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    good = _publish(store)
    with pytest.raises(RuntimeError), store.staging() as staged:
        (staged / "model.pth").write_bytes(b"half a model")
        raise RuntimeError("killed mid-write")
    assert store.current_version() == good
    assert store.versions() == [good]
    assert load_bundle(tmp_path).version == good


def test_a_corrupt_version_is_refused_as_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    good = _publish(store, seed=0)
    bad = _publish(store, seed=1)
    store.set_current(good)
    weights = tmp_path / "versions" / bad / "model.pth"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(StoreError, match="checksum"):
        store.set_current(bad)
    assert store.current_version() == good


def test_publish_refuses_an_incomplete_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with store.staging() as staged:
        (staged / "model.pth").write_bytes(b"x")
        manifest = manifest_for(
            version=store.next_version_name(),
            backbone="resnet18",
            dropout=0.0,
            label_space=SPACE,
            preprocess=PreprocessConfig(),
        )
        with pytest.raises(StoreError, match="classes.json was not written"):
            store.publish(staged, manifest)
    assert store.current_version() is None


def test_current_switch_is_atomic_under_concurrent_reads(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    versions = {_publish(store, seed=0), _publish(store, seed=1)}
    seen: list[str | None] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.current_version())

    thread = threading.Thread(target=reader)
    thread.start()
    ordered = sorted(versions)
    for i in range(200):
        store.set_current(ordered[i % 2])
    stop.set()
    thread.join(timeout=10)
    assert seen and set(seen) <= versions  # never empty, never a partial name


# --- the old loose-files layout -----------------------------------------------------------------


def _legacy(
    folder: Path, n_classes: int = 3, classes_text: str | None = None, thresholds: str | None = None
) -> torch.nn.Module:
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model("resnet18", n_classes)
    torch.save(model.state_dict(), folder / "model.pth")
    (folder / "classes.json").write_text(classes_text or json.dumps(["bolt", "nut", "rust"]))
    if thresholds is not None:
        (folder / "thresholds.json").write_text(thresholds)
    return model


def test_legacy_loose_files_load(tmp_path: Path) -> None:
    model = _legacy(tmp_path, thresholds="[0.2, 0.3, 0.9]")
    bundle = load_bundle(tmp_path)
    assert bundle.classes == ["bolt", "nut", "rust"]
    assert bundle.thresholds == [0.2, 0.3, 0.9]
    assert bundle.manifest.backbone == "resnet18"
    assert torch.equal(bundle.model.fc.weight, model.fc.weight)


def test_legacy_whitespace_text_lists(tmp_path: Path) -> None:
    _legacy(tmp_path, classes_text="bolt\nnut rust\n", thresholds="0.2\n0.3\n0.4\n")
    bundle = load_bundle(tmp_path)
    assert bundle.classes == ["bolt", "nut", "rust"]
    assert bundle.thresholds == [0.2, 0.3, 0.4]


def test_thresholds_are_padded_or_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _legacy(tmp_path / "short", thresholds="[0.2]")
    assert load_bundle(tmp_path / "short").thresholds == [0.2, 0.5, 0.5]
    _legacy(tmp_path / "long", thresholds="[0.2, 0.3, 0.4, 0.9]")
    assert load_bundle(tmp_path / "long").thresholds == [0.2, 0.3, 0.4]
    assert "padding" in caplog.text and "ignoring the extra" in caplog.text


def test_head_size_mismatch_is_refused(tmp_path: Path) -> None:
    _legacy(tmp_path, n_classes=4)
    with pytest.raises(StoreError, match="head of 4 outputs but classes.json lists 3 classes"):
        load_bundle(tmp_path)


def test_an_empty_folder_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="holds no model"):
        load_bundle(tmp_path)
