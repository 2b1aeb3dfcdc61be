from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelloop.config import DataConfig, PreprocessConfig, SplitConfig
from labelloop.labelstudio.export import load_labelstudio_export, resolve_export_image
from labelloop.ml.data import (
    DataError,
    UnknownLabelsError,
    check_image,
    load_metadata,
    parse_label_cell,
)
from labelloop.ml.dataset import ImageDataset, collate_skip_none
from labelloop.ml.splits import (
    compute_pos_weight,
    materialize_splits,
    stratified_split,
    write_split_manifest,
)
from labelloop.ml.transforms import eval_transform

# --- cells ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ('["bolt", "nut"]', ["bolt", "nut"]),  # JSON list
        ("['bolt', 'nut']", ["bolt", "nut"]),  # Python literal
        ("('bolt',)", ["bolt"]),  # Python tuple literal
        ("bolt;nut", ["bolt", "nut"]),
        ("bolt, nut", ["bolt", "nut"]),
        ("bolt|nut", ["bolt", "nut"]),
        ("bolt; nut , gear|washer", ["bolt", "nut", "gear", "washer"]),  # mixed separators
        ("  bolt  ", ["bolt"]),  # whitespace
        ("bolt;bolt;nut", ["bolt", "nut"]),  # duplicates
        ("[bolt; nut]", ["bolt", "nut"]),  # bracketed but not a literal
        ('["bolt", null, ""]', ["bolt"]),  # JSON null and empty inside a list
    ],
)
def test_cell_formats(cell: str, expected: list[str]) -> None:
    assert parse_label_cell(cell) == expected


@pytest.mark.parametrize(
    "placeholder", ["", "nan", "NaN", "none", "None", "NULL", "null", "[]", "-", "n/a", "N/A", "  "]
)
def test_placeholders_are_dropped(placeholder: str) -> None:
    assert parse_label_cell(placeholder) == []
    assert parse_label_cell(f"bolt;{placeholder}") == ["bolt"]


def test_non_string_cells() -> None:
    assert parse_label_cell(float("nan")) == []
    assert parse_label_cell(None) == []
    assert parse_label_cell(["bolt", " nut "]) == ["bolt", "nut"]


# --- metadata ---------------------------------------------------------------------------------


def _image(path: Path, color: tuple[int, int, int] = (120, 120, 120)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


def _csv(tmp_path: Path, text: str, images: list[str]) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    for name in images:
        _image(folder / name)
    csv = tmp_path / "meta.csv"
    csv.write_text(text)
    return csv, folder


def test_rows_for_the_same_image_are_merged(tmp_path: Path) -> None:
    csv, folder = _csv(
        tmp_path,
        "image_id,components,defects\na.png,bolt,\na.png,nut,rust\nb.png,[],-\n",
        ["a.png", "b.png"],
    )
    data = load_metadata(csv, folder, DataConfig())
    by_id = {s.image_id: s for s in data.samples}
    assert by_id["a.png"].labels == {"components": ("bolt", "nut"), "defects": ("rust",)}
    assert by_id["a.png"].sources == (2, 3)
    assert by_id["b.png"].all_labels() == []
    assert data.report.merged_rows == 1
    assert data.label_space.as_dict() == {"components": ["bolt", "nut"], "defects": ["rust"]}


def test_case_is_normalised_to_declared_names(tmp_path: Path) -> None:
    csv, folder = _csv(
        tmp_path,
        "image_id,components,defects\na.png,BOLT; Nut,Rust\nb.png,bolt,RUST\n",
        ["a.png", "b.png"],
    )
    config = DataConfig(classes={"components": ("bolt", "nut", "gear"), "defects": ("rust",)})
    data = load_metadata(csv, folder, config)
    assert data.samples[0].labels == {"components": ("bolt", "nut"), "defects": ("rust",)}
    # Declared order is kept, including classes without examples.
    assert data.label_space.classes == ["bolt", "nut", "gear", "rust"]
    assert data.report.class_counts["gear"] == 0


def test_undeclared_case_variants_take_the_most_common_spelling(tmp_path: Path) -> None:
    csv, folder = _csv(
        tmp_path,
        "image_id,components,defects\na.png,Bolt,\nb.png,bolt,\nc.png,bolt,\n",
        ["a.png", "b.png", "c.png"],
    )
    data = load_metadata(csv, folder, DataConfig())
    assert data.label_space.classes == ["bolt"]
    assert all(s.labels["components"] == ("bolt",) for s in data.samples)


def test_unknown_labels_stop_the_run_with_names_counts_and_rows(tmp_path: Path) -> None:
    csv, folder = _csv(
        tmp_path,
        "image_id,components,defects\na.png,bolt;sprocket,\nb.png,sprocket,\nc.png,nut,\n",
        ["a.png", "b.png", "c.png"],
    )
    config = DataConfig(classes={"components": ("bolt", "nut")})
    with pytest.raises(UnknownLabelsError) as info:
        load_metadata(csv, folder, config)
    message = str(info.value)
    assert "'sprocket' x2" in message
    assert "rows 2, 3" in message
    assert "--allow-new-classes" in message


def test_allow_new_classes_appends_them(tmp_path: Path) -> None:
    csv, folder = _csv(tmp_path, "image_id,components,defects\na.png,bolt;sprocket,\n", ["a.png"])
    config = DataConfig(classes={"components": ("bolt", "nut")}, allow_new_classes=True)
    data = load_metadata(csv, folder, config)
    assert data.label_space.as_dict()["components"] == ["bolt", "nut", "sprocket"]
    assert data.report.new_classes == {"components": ["sprocket"]}


def test_missing_and_unreadable_images_are_reported_and_excluded(tmp_path: Path) -> None:
    csv, folder = _csv(
        tmp_path,
        "image_id,components,defects\nok.png,bolt,\ngone.png,nut,\nbad.png,nut,\ntrunc.png,nut,\n",
        ["ok.png"],
    )
    (folder / "bad.png").write_bytes(b"not an image at all")
    good = (folder / "ok.png").read_bytes()
    _image(folder / "big.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "trunc.png")
    (folder / "trunc.png").write_bytes((folder / "trunc.png").read_bytes()[:60])
    data = load_metadata(csv, folder, DataConfig())
    assert [s.image_id for s in data.samples] == ["ok.png"]
    assert [m["image_id"] for m in data.report.missing_images] == ["gone.png"]
    assert sorted(u["image_id"] for u in data.report.unreadable_images) == ["bad.png", "trunc.png"]
    assert (folder / "ok.png").read_bytes() == good


def test_missing_columns_name_what_exists(tmp_path: Path) -> None:
    csv, folder = _csv(tmp_path, "file,labels\na.png,bolt\n", ["a.png"])
    with pytest.raises(
        DataError, match=r"lacks column\(s\) \['image_id', 'components', 'defects'\]"
    ):
        load_metadata(csv, folder, DataConfig())
    data = load_metadata(csv, folder, DataConfig(image_column="file", label_columns=("labels",)))
    assert data.label_space.classes == ["bolt"]


def test_no_usable_images_is_a_clear_error(tmp_path: Path) -> None:
    csv, folder = _csv(tmp_path, "image_id,components,defects\nx.png,bolt,\n", [])
    folder.mkdir(exist_ok=True)
    with pytest.raises(DataError, match="no usable images"):
        load_metadata(csv, folder, DataConfig())


def test_check_image_accepts_real_images(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    assert check_image(tmp_path / "a.png") is None
    assert check_image(tmp_path / "nope.png") == "file not found"


# --- Label Studio export ------------------------------------------------------------------------


def test_labelstudio_export(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    for name in ("one.png", "two.png", "three.png"):
        _image(folder / name)

    def choice(name: str, values: list[str]) -> dict:
        return {
            "from_name": name,
            "to_name": "image",
            "type": "choices",
            "value": {"choices": values},
        }

    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/3/1a2b3c4d-one.png"},
            "annotations": [
                {"id": 10, "updated_at": "2026-01-01", "result": [choice("parts", ["bolt"])]},
                {
                    "id": 11,
                    "updated_at": "2026-02-01",
                    "result": [choice("parts", ["nut"]), choice("damage", ["rust"])],
                },
            ],
        },
        {
            "id": 2,
            "data": {"image": "http://ls:8080/data/local-files/?d=images/two.png"},
            "annotations": [
                {
                    "id": 20,
                    "updated_at": "2026-03-01",
                    "ground_truth": True,
                    "result": [choice("parts", ["gear"])],
                },
                {"id": 21, "updated_at": "2026-04-01", "result": [choice("parts", ["bolt"])]},
            ],
        },
        {  # skipped: no training data
            "id": 3,
            "data": {"image": "/data/upload/3/three.png"},
            "annotations": [{"id": 30, "was_cancelled": True, "result": []}],
        },
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    data = load_labelstudio_export(export, folder, DataConfig())
    by_task = {s.sources[0]: s for s in data.samples}
    assert set(by_task) == {1, 2}
    assert by_task[1].labels == {"parts": ("nut",), "damage": ("rust",)}  # latest wins
    assert by_task[2].labels["parts"] == ("gear",)  # ground truth wins
    assert by_task[2].labels["damage"] == ()  # empty control: none of these
    assert data.label_space.group_names == ["parts", "damage"]
    assert data.report.skipped_rows == [{"row": 3, "reason": "no usable annotation"}]


def test_export_image_resolution(tmp_path: Path) -> None:
    _image(tmp_path / "sub" / "x.png")
    _image(tmp_path / "y.png")
    assert (
        resolve_export_image("/data/local-files/?d=sub/x.png", tmp_path) == tmp_path / "sub/x.png"
    )
    assert resolve_export_image("/data/upload/7/deadbeef-y.png", tmp_path) == tmp_path / "y.png"
    assert (
        resolve_export_image("https://example.com/a/b/y.png?sig=1", tmp_path) == tmp_path / "y.png"
    )


def test_export_that_is_not_json_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "e.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_labelstudio_export(bad, tmp_path, DataConfig())


# --- splits and weights -------------------------------------------------------------------------


def test_stratified_split_keeps_every_class_in_every_split(demo_dataset) -> None:
    data = load_metadata(demo_dataset.metadata_csv, demo_dataset.images_dir, DataConfig())
    targets = data.targets()
    splits = stratified_split(targets, SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=1))
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(len(targets)))  # a partition
    # Iterative stratification trades exact sizes for label balance; sizes stay close.
    assert abs(len(splits["test"]) - 0.2 * len(targets)) <= 0.3 * 0.2 * len(targets)
    for name, idx in splits.items():
        missing = [data.label_space.classes[c] for c in np.flatnonzero(targets[idx].sum(0) == 0)]
        assert not missing, f"{name} lacks {missing}"
    again = stratified_split(targets, SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=1))
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    other = stratified_split(targets, SplitConfig(val_fraction=0.2, test_fraction=0.2, seed=2))
    assert not np.array_equal(splits["test"], other["test"])


def test_split_too_small_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="too few"):
        stratified_split(np.eye(2, dtype=np.float32), SplitConfig())


def test_split_manifest_and_materialized_folders(demo_dataset, tmp_path: Path) -> None:
    data = load_metadata(demo_dataset.metadata_csv, demo_dataset.images_dir, DataConfig())
    splits = stratified_split(data.targets(), SplitConfig())
    write_split_manifest(tmp_path / "splits.csv", data.samples, splits)
    lines = (tmp_path / "splits.csv").read_text().splitlines()
    assert lines[0] == "image_id,split" and len(lines) == len(data.samples) + 1
    out = materialize_splits(data.samples, splits, tmp_path / "layout")
    for name, idx in splits.items():
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == sorted(data.samples[i].image_id for i in idx)


def test_pos_weight_is_sqrt_neg_over_pos_clipped() -> None:
    targets = np.array(
        [[1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float32
    )
    weights, empty = compute_pos_weight(targets, min_weight=1.0, max_weight=1.8)
    # class 0: 4 neg / 1 pos -> 2.0, clipped to 1.8; class 1: 3/2 -> 1.2247;
    # class 2: no positives -> 1 and reported; class 3: 0/5 -> 0, clipped up to 1.0
    assert weights.tolist() == pytest.approx([1.8, np.sqrt(1.5), 1.0, 1.0])
    assert empty == [2]
    unclipped, _ = compute_pos_weight(targets, min_weight=0.01, max_weight=100)
    assert unclipped[0].item() == pytest.approx(2.0)


# --- Dataset ----------------------------------------------------------------------------------


def test_dataset_skips_unreadable_items(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"garbage")
    dataset = ImageDataset(
        [tmp_path / "a.png", tmp_path / "b.png"],
        np.array([[1.0], [0.0]], dtype=np.float32),
        eval_transform(PreprocessConfig(image_size=32)),
    )
    batch = collate_skip_none([dataset[0], dataset[1]])
    assert batch is not None
    images, targets, indices = batch
    assert images.shape == (1, 3, 32, 32)
    assert indices.tolist() == [0]
    assert collate_skip_none([dataset[1]]) is None


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from labelloop.ml.images import decode_image

    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(tmp_path / "r.jpg").size == (20, 40)


def test_load_rgb_decodes_jpeg_at_a_reduced_scale_only_when_asked(tmp_path: Path) -> None:
    from labelloop.ml.images import decode_image

    Image.new("RGB", (1000, 800), (10, 120, 200)).save(tmp_path / "big.jpg", quality=90)
    Image.new("RGB", (1000, 800), (10, 120, 200)).save(tmp_path / "big.png")
    assert decode_image(tmp_path / "big.jpg").size == (1000, 800)
    # DCT scaling picks the smallest 1/2, 1/4, 1/8 scale that keeps both sides >= min_side.
    assert decode_image(tmp_path / "big.jpg", min_side=300).size == (500, 400)
    assert decode_image((tmp_path / "big.jpg").read_bytes(), min_side=90).size == (125, 100)
    assert decode_image(tmp_path / "big.png", min_side=300).size == (1000, 800)  # not a JPEG

    dataset = ImageDataset(
        [tmp_path / "big.jpg"],
        None,
        lambda image: torch.tensor(image.size),
        min_side=300,
    )
    assert dataset[0][0].tolist() == [500, 400]


def test_train_transform_augments_pil_images_into_normalised_tensors() -> None:
    from labelloop.ml.transforms import train_decode_side, train_transform

    config = PreprocessConfig(image_size=32, min_scale=0.6)
    # The smallest crop of a square image this side (area 0.6, aspect 3:4) is still >= 32 px.
    side = train_decode_side(config)
    assert side == 48 and side * (0.6 * 3 / 4) ** 0.5 >= 32
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = train_transform(config)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Normalised with the ImageNet statistics: roughly zero-centred, unit-ish spread.
    assert -1.0 < float(out.mean()) < 1.0 and 0.5 < float(out.std()) < 2.0


def test_to_normalized_tensor_matches_torchvision_for_pil_and_tensor_input() -> None:
    from torchvision.transforms import v2

    from labelloop.ml.transforms import ToNormalizedTensor, eval_transform, resize_size

    config = PreprocessConfig(image_size=32)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    reference = v2.Compose(
        [
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )
    ours = ToNormalizedTensor(config.mean, config.std)
    for item in (image, v2.PILToTensor()(image)):
        out = ours(item)
        assert out.dtype == torch.float32 and out.shape == (3, 40, 50) and out.is_contiguous()
        torch.testing.assert_close(out, reference(image), atol=1e-5, rtol=0)
    # Serving's preset gives the numbers it gave with torchvision's ToDtype + Normalize.
    torchvision_eval = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(resize_size(config), antialias=True),
            v2.CenterCrop(config.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )
    torch.testing.assert_close(
        eval_transform(config)(image), torchvision_eval(image), atol=1e-5, rtol=0
    )
