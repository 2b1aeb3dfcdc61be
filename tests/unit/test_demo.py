from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelloop.dev.demo import (
    COMPONENTS,
    DEFECTS,
    LABEL_GROUPS,
    DemoDataset,
    generate_demo_dataset,
    render_image,
    render_label_config,
)


def _read_rows(ds: DemoDataset) -> list[dict[str, str]]:
    with ds.metadata_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["image_id", "components", "defects"]
        return list(reader)


def _split(cell: str) -> list[str]:
    return cell.split(";") if cell else []


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    return generate_demo_dataset(tmp_path_factory.mktemp("small"), n=12, seed=3, size=64)


@pytest.fixture(scope="module")
def large_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    ds = generate_demo_dataset(tmp_path_factory.mktemp("large"), n=300, seed=1, size=32)
    return _read_rows(ds)


def test_layout_and_images(small: DemoDataset) -> None:
    assert small.images_dir == small.root / "images"
    assert small.metadata_csv == small.root / "metadata.csv"
    assert small.label_config == small.root / "label_config.xml"
    assert small.n_images == 12
    rows = _read_rows(small)
    assert [r["image_id"] for r in rows] == [f"img_{i:05d}.png" for i in range(12)]
    assert sorted(p.name for p in small.images_dir.iterdir()) == [r["image_id"] for r in rows]
    for row in rows:
        with Image.open(small.images_dir / row["image_id"]) as im:
            assert im.format == "PNG"
            assert im.mode == "RGB"
            assert im.size == (64, 64)
            # Textured backgrounds and parts: an image is never a flat colour.
            assert np.asarray(im, dtype=np.float32).std() > 3.0


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_demo_dataset(tmp_path / "a", n=6, seed=5, size=48)
    b = generate_demo_dataset(tmp_path / "b", n=6, seed=5, size=48)
    c = generate_demo_dataset(tmp_path / "c", n=6, seed=6, size=48)
    assert a.metadata_csv.read_bytes() == b.metadata_csv.read_bytes()
    assert a.label_config.read_bytes() == b.label_config.read_bytes()
    names = sorted(p.name for p in a.images_dir.iterdir())
    for name in names:
        assert (a.images_dir / name).read_bytes() == (b.images_dir / name).read_bytes()
    assert any(
        (a.images_dir / name).read_bytes() != (c.images_dir / name).read_bytes() for name in names
    )
    assert all(
        (a.images_dir / name).read_bytes() != (c.images_dir / name).read_bytes() for name in names
    )


def test_image_i_does_not_depend_on_n(tmp_path: Path) -> None:
    five = generate_demo_dataset(tmp_path / "five", n=5, seed=2, size=40)
    ten = generate_demo_dataset(tmp_path / "ten", n=10, seed=2, size=40)
    assert _read_rows(ten)[:5] == _read_rows(five)
    for i in range(5):
        name = f"img_{i:05d}.png"
        assert (five.images_dir / name).read_bytes() == (ten.images_dir / name).read_bytes()


def test_regenerating_overwrites_and_drops_stale_images(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, n=6, seed=0, size=32)
    (tmp_path / "images" / "notes.txt").write_text("keep me")
    ds = generate_demo_dataset(tmp_path, n=3, seed=1, size=32)
    assert sorted(p.name for p in ds.images_dir.iterdir()) == [
        "img_00000.png",
        "img_00001.png",
        "img_00002.png",
        "notes.txt",
    ]
    assert len(_read_rows(ds)) == 3
    with Image.open(ds.images_dir / "img_00002.png") as im:
        assert im.size == (32, 32)


def test_labels_are_known_and_classes_are_balanced(large_rows: list[dict[str, str]]) -> None:
    assert len(large_rows) == 300
    for group, classes in LABEL_GROUPS.items():
        cells = [_split(r[group]) for r in large_rows]
        for labels in cells:
            assert set(labels) <= set(classes)
            assert len(labels) == len(set(labels))
            assert labels == sorted(labels, key=classes.index)  # canonical order
        for cls in classes:
            prevalence = sum(cls in labels for labels in cells) / len(cells)
            assert 0.08 <= prevalence <= 0.6, (cls, prevalence)
    clean = sum(r["defects"] == "" for r in large_rows) / len(large_rows)
    assert 0.1 <= clean <= 0.4
    n_components = [len(_split(r["components"])) for r in large_rows]
    assert max(n_components) == 3
    assert min(len(_split(r["defects"])) for r in large_rows) == 0


def test_label_config_matches_label_groups(small: DemoDataset) -> None:
    root = ET.fromstring(small.label_config.read_text(encoding="utf-8"))
    assert root.tag == "View"
    images = root.findall("Image")
    assert len(images) == 1
    assert images[0].get("name") == "image"
    assert images[0].get("value") == "$image"
    choices = root.findall("Choices")
    assert [c.get("name") for c in choices] == list(LABEL_GROUPS)
    assert len(root.findall("Header")) == len(LABEL_GROUPS)
    for block, classes in zip(choices, LABEL_GROUPS.values(), strict=True):
        assert block.get("choice") == "multiple"
        assert block.get("toName") == images[0].get("name")
        assert [c.get("value") for c in block.findall("Choice")] == list(classes)


def test_render_label_config_escapes_attribute_values() -> None:
    nasty = 'nuts & "bolts" <M8>'
    xml = render_label_config({"parts": [nasty, "it's"]}, image_name="img", image_value="$url")
    root = ET.fromstring(xml)
    assert root.find("Image").get("name") == "img"  # type: ignore[union-attr]
    assert root.find("Image").get("value") == "$url"  # type: ignore[union-attr]
    assert [c.get("value") for c in root.iter("Choice")] == [nasty, "it's"]
    assert root.find("Choices").get("toName") == "img"  # type: ignore[union-attr]


def test_render_label_config_rejects_empty_or_duplicate_groups() -> None:
    with pytest.raises(ValueError, match="no classes"):
        render_label_config({"parts": []})
    with pytest.raises(ValueError, match="duplicate"):
        render_label_config({"parts": ["a", "a"]})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n": 0}, "n must be"), ({"size": 8}, "size must be"), ({"seed": -1}, "seed must be")],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo_dataset(tmp_path, **kwargs)
    assert not (tmp_path / "metadata.csv").exists()


def test_render_image_rejects_unknown_labels() -> None:
    with pytest.raises(ValueError, match="unknown labels"):
        render_image(np.random.default_rng(0), 64, ["sprocket"], [])


def test_render_image_is_rgb_of_requested_size() -> None:
    im = render_image(np.random.default_rng(0), 50, list(COMPONENTS), list(DEFECTS))
    assert im.mode == "RGB"
    assert im.size == (50, 50)


@pytest.mark.parametrize("seed", range(8))
def test_rust_adds_an_orange_brown_patch(seed: int) -> None:
    # Render stages draw from separate streams, so the same seed with and
    # without rust differs only where the rust was painted.
    clean = np.asarray(render_image(np.random.default_rng(seed), 64, ["nut"], []), np.float32)
    rusty = np.asarray(render_image(np.random.default_rng(seed), 64, ["nut"], ["rust"]), np.float32)
    changed = np.abs(rusty - clean).max(axis=2) > 25
    assert changed.mean() > 0.01
    r, g, b = (rusty[..., k][changed].mean() for k in range(3))
    assert r > g > b
    assert r - b > 30


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_visibly_changes_the_image(defect: str) -> None:
    diffs = []
    for seed in range(6):
        clean = render_image(np.random.default_rng(seed), 64, ["gear"], [])
        marked = render_image(np.random.default_rng(seed), 64, ["gear"], [defect])
        diffs.append(
            np.abs(np.asarray(marked, np.float32) - np.asarray(clean, np.float32)).max(axis=2)
        )
    changed = [int((d > 25).sum()) for d in diffs]
    # Every defect leaves a mark, and a typical one covers dozens of pixels.
    assert min(changed) >= 8, changed
    assert np.median(changed) >= 30, changed


def test_labels_are_the_metadata_rows_by_image(small: DemoDataset) -> None:
    labels = small.labels()
    rows = _read_rows(small)
    assert list(labels) == [row["image_id"] for row in rows]
    for row in rows:
        assert labels[row["image_id"]] == {
            "components": _split(row["components"]),
            "defects": _split(row["defects"]),
        }
