"""The real-image benchmark: labels true to the pixels, splits that share no source, determinism.

Components come from scikit-learn's handwritten digits here (shipped in the wheel, no
download); the benchmark uses Fashion-MNIST, whose Debian download is tested in
tests/integration/test_realdata_download.py.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelloop.config import DataConfig
from labelloop.ml.data import load_metadata
from labelloop.realdata import (
    DEFECT_TEXTURES,
    SPLITS,
    ComponentPool,
    RealDataError,
    RealDataset,
    build_realdata,
    fetch_fashion_mnist,
    load_fashion_mnist,
    load_sklearn_digits,
    skimage_photo,
)

SIZE = 64


@pytest.fixture(scope="module")
def pool() -> ComponentPool:
    return load_sklearn_digits()


@pytest.fixture(scope="module")
def dataset(pool: ComponentPool, tmp_path_factory: pytest.TempPathFactory) -> RealDataset:
    return build_realdata(
        tmp_path_factory.mktemp("real"), pool, n_train=40, n_test=20, seed=5, size=SIZE
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), np.float32) / 255.0


def _resized(grey: np.ndarray, side: int) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(grey)).resize((side, side), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def _box(row: dict[str, str], prefix: str = "") -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(row[f"{prefix}{k}"]) for k in ("x0", "y0", "x1", "y1"))
    return x0, y0, x1, y1


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_labels_name_exactly_what_was_pasted_and_it_is_visible(
    dataset: RealDataset, pool: ComponentPool
) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    seen: set[str] = set()
    for split in SPLITS:
        data = dataset.split(split)
        layers: dict[str, list[dict[str, str]]] = {}
        for row in _rows(data.root / "sources.csv"):
            layers.setdefault(row["image_id"], []).append(row)
        for meta in _rows(data.metadata_csv):
            placed = layers[meta["image_id"]]
            for group, layer in (("components", "component"), ("defects", "defect")):
                labelled = {x for x in meta[group].split(";") if x}
                assert labelled == {r["class"] for r in placed if r["layer"] == layer}
                seen |= labelled
            image = _grey(data.images_dir / meta["image_id"])
            for row in placed:
                x0, y0, x1, y1 = _box(row)
                region = image[y0:y1, x0:x1]
                if row["layer"] == "component":
                    # The scan's own label (from scikit-learn, not from the builder) is the class.
                    assert f"digit_{digits.target[int(row['item'])]}" == row["class"]
                    scan = _resized(scans[int(row["item"])], x1 - x0)
                    scan = scan[:, ::-1] if row["flipped"] == "1" else scan
                    # Lighter or darker than the surface, but there: |r| is high either way.
                    assert abs(_correlation(region, scan)) > 0.5, row
                elif row["layer"] == "defect":
                    sx0, sy0, sx1, sy1 = _box(row, "src_")
                    crop = _resized(skimage_photo(row["class"])[sy0:sy1, sx0:sx1], x1 - x0)
                    core = slice((x1 - x0) * 3 // 10, (x1 - x0) * 7 // 10)
                    assert _correlation(region[core, core], crop[core, core]) > 0.5, row
    assert seen == set(pool.classes) | set(DEFECT_TEXTURES)


def test_train_and_test_share_no_source_pixels(dataset: RealDataset, pool: ComponentPool) -> None:
    items = {}
    for split in SPLITS:
        rows = _rows(dataset.split(split).root / "sources.csv")
        items[split] = {(r["source"], r["item"]) for r in rows if r["layer"] == "component"}
        for row in rows:
            if row["layer"] in ("surface", "defect"):
                width = skimage_photo(row["class"]).shape[1]
                x0, _, x1, _ = _box(row, "src_")
                # Train crops the left half of every photo, test the right half.
                assert (x1 <= width // 2) if split == "train" else (x0 >= width // 2), row
    assert items["train"] and items["test"]
    assert not items["train"] & items["test"]
    # And no identical scan sits on both sides of the pool under different ids.
    digest = {
        split: {
            hashlib.sha1(image.tobytes()).hexdigest()
            for name in pool.classes
            for image in pool.items[split][name][1]
        }
        for split in SPLITS
    }
    assert not digest["train"] & digest["test"]


def test_same_seed_same_bytes_other_seed_other_images(pool: ComponentPool, tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    build_realdata(tmp_path / "a", pool, n_train=6, n_test=3, seed=1, size=SIZE)
    build_realdata(tmp_path / "b", pool, n_train=6, n_test=3, seed=1, size=SIZE)
    build_realdata(tmp_path / "c", pool, n_train=6, n_test=3, seed=2, size=SIZE)
    build_realdata(tmp_path / "d", pool, n_train=3, n_test=2, seed=1, size=SIZE)

    a, b, c, d = (files(tmp_path / x) for x in "abcd")
    assert a == b
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 9
    assert all(a[k] != c[k] for k in pngs)
    # Image i depends on (seed, split, i) only: fewer images are a prefix of more.
    assert all(a[k] == d[k] for k in d if k.endswith(".png"))


def test_the_training_pipeline_reads_it(dataset: RealDataset) -> None:
    data = dataset.train
    config = DataConfig(classes={g: tuple(c) for g, c in dataset.groups.items()})

    loaded = load_metadata(data.metadata_csv, data.images_dir, config)

    assert len(loaded.samples) == data.n_images == 40
    assert not loaded.report.unreadable_images
    config_xml = data.label_config.read_text()
    assert all(f'value="{name}"' in config_xml for name in ("digit_0", *DEFECT_TEXTURES))


def test_fashion_mnist_without_apt_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-deb on it

    with pytest.raises(RealDataError, match="apt-get and dpkg-deb"):
        fetch_fashion_mnist(tmp_path / "cache")
    with pytest.raises(RealDataError, match="fetch_fashion_mnist"):
        load_fashion_mnist(tmp_path)
